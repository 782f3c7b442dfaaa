"""Non-AES ciphers (Botan): the engine against Botan's own per-sector modes, whose
XTS, CBC and CTR code is independent of the engine's masks and interleaving."""

import os

import pytest

from nbdcrypt.crypto.engine import SectorCipher
from nbdcrypt.crypto.spec import CipherSpec
from nbdcrypt.errors import InputError, UnsupportedError

botan2 = pytest.importorskip("botan2", reason="needs python3-botan")

BOTAN_NAMES = {"serpent": "Serpent", "twofish": "Twofish", "sm4": "SM4", "camellia": "Camellia-256"}
BOTAN_MODES = {"xts": "XTS", "cbc": "CBC/NoPadding", "ctr": "CTR-BE"}
IVS = {"plain64": lambda n: n.to_bytes(16, "little"), "plain64be": lambda n: n.to_bytes(16, "big"),
       "plain": lambda n: (n % (1 << 32)).to_bytes(16, "little"), "null": lambda n: bytes(16),
       "benbi": lambda n: ((n << 5) + 1).to_bytes(16, "big")}
CASES = [(c, m, iv, ss) for c in BOTAN_NAMES for m, iv, ss in
         [("xts", "plain64", 4096), ("xts", "plain", 512), ("cbc", "plain64be", 512),
          ("cbc", "benbi", 1024), ("ctr", "plain64", 512), ("cbc", "null", 2048)]]


def reference(cipher, mode, iv, key, data, sector, sector_size, encrypt=True):
    out = b""
    for i in range(0, len(data), sector_size):
        iv_sector = (sector + i // sector_size) * (sector_size // 512)
        ctx = botan2.SymmetricCipher(f"{BOTAN_NAMES[cipher]}/{BOTAN_MODES[mode]}", encrypt=encrypt)
        ctx.set_key(key)
        ctx.start(IVS[iv](iv_sector))
        out += ctx.finish(data[i:i + sector_size])
    return out


@pytest.mark.parametrize("cipher, mode, iv, sector_size", CASES)
def test_engine_matches_botan(cipher, mode, iv, sector_size):
    key_bytes = 16 if cipher == "sm4" else 32
    key = os.urandom(2 * key_bytes if mode == "xts" else key_bytes)
    data = os.urandom(sector_size * 9)
    engine = SectorCipher(CipherSpec.parse(f"{cipher}-{mode}-{iv}"), key, sector_size)
    buf = bytearray(data)
    engine.encrypt(buf, (1 << 32) - 3)
    assert bytes(buf) == reference(cipher, mode, iv, key, data, (1 << 32) - 3, sector_size)
    engine.decrypt(buf, (1 << 32) - 3)
    assert bytes(buf) == data


def test_essiv_and_ecb_use_the_same_cipher():
    key, data = os.urandom(32), os.urandom(1024)
    salt = botan2.BlockCipher("Serpent")
    salt.set_key(_sha256(key))
    ivs = [bytes(salt.encrypt(n.to_bytes(16, "little"))) for n in (3, 4)]
    expected = b""
    for i, iv in enumerate(ivs):
        ctx = botan2.SymmetricCipher("Serpent/CBC/NoPadding", encrypt=True)
        ctx.set_key(key)
        ctx.start(iv)
        expected += ctx.finish(data[i * 512:(i + 1) * 512])
    buf = bytearray(data)
    SectorCipher(CipherSpec.parse("serpent-cbc-essiv:sha256"), key).encrypt(buf, 3)
    assert bytes(buf) == expected
    ecb = botan2.BlockCipher("Twofish")
    ecb.set_key(key)
    buf = bytearray(data)
    SectorCipher(CipherSpec.parse("twofish-ecb"), key).encrypt(buf, 0)
    assert bytes(buf) == bytes(ecb.encrypt(data))


def _sha256(data):
    h = botan2.HashFunction("SHA-256")
    h.update(data)
    return h.final()


def test_key_sizes_and_refusals():
    assert CipherSpec.parse("serpent-xts-plain64").key_sizes == (32, 48, 64)
    assert CipherSpec.parse("sm4-cbc-plain64").key_sizes == (16,)
    with pytest.raises(InputError, match="sha256 digest is not a sm4 key"):
        SectorCipher(CipherSpec.parse("sm4-cbc-essiv:sha256"), os.urandom(16))
    for text in ("blowfish-cbc-plain", "des3_ede-cbc-plain"):
        with pytest.raises(UnsupportedError, match=f"unsupported cipher {text}$"):
            CipherSpec.parse(text)
