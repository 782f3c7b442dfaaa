"""The sector-cipher engine against a per-sector reference and known answers, every test
under both engines (the native kernel runs AES specs, numpy the rest)."""

import hashlib
import json
import random
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdcrypt.crypto import native
from nbdcrypt.crypto.engine import CHUNK, SectorCipher
from nbdcrypt.crypto.spec import CipherSpec
from nbdcrypt.errors import InputError
from tests import reference_cipher

VECTORS = Path(__file__).resolve().parent.parent / "vectors"


@pytest.fixture(autouse=True, scope="module", params=[
    pytest.param("native", marks=pytest.mark.skipif(native.Kernel is None, reason="native kernel not built")),
    "numpy"])
def engine(request):
    """The engine SectorCipher runs AES in by default (module-scoped: hypothesis
    refuses function-scoped fixtures)."""
    default, native.ENGINE = native.ENGINE, request.param
    yield request.param
    native.ENGINE = default


def test_aes_runs_in_the_engine_under_test(engine):
    assert SectorCipher(CipherSpec.parse("aes-xts-plain64"), bytes(range(64))).engine == engine

SPECS = [
    "aes-xts-plain64", "aes-xts-plain", "aes-xts-plain64be", "aes-xts-essiv:sha256",
    "aes-xts-benbi", "aes-xts-null", "aes-cbc-essiv:sha256", "aes-cbc-essiv:md5",
    "aes-cbc-plain64", "aes-cbc-plain", "aes-cbc-plain64be", "aes-cbc-benbi", "aes-cbc-null",
    "aes-ctr-plain64", "aes-ctr-plain", "aes-ecb",
]

# Around the 32-bit wrap of "plain", the 64-bit wrap of plain64, and plain places.
EDGE_SECTORS = st.sampled_from([0, 1, 2**32 - 3, 2**32, 2**61 - 3, 2**64 // 8 - 2, 2**64 - 3])
SECTORS = st.one_of(EDGE_SECTORS, st.integers(0, 2**64 - 1))


@st.composite
def cases(draw, spec_text):
    spec = CipherSpec.parse(spec_text)
    key_size = draw(st.sampled_from([32, 64] if spec.mode == "xts" else [16, 24, 32]))
    sector_size = draw(st.sampled_from([512, 1024, 4096]))
    # Up to 40 sectors crosses both the per-sector and the batched paths.
    count = draw(st.integers(1, 40 if sector_size == 512 else 12))
    return dict(spec=spec, key=draw(st.binary(min_size=key_size, max_size=key_size)),
                sector=draw(SECTORS), sector_size=sector_size,
                data=random.Random(draw(st.integers())).randbytes(count * sector_size),
                iv_large_sectors=draw(st.booleans()),
                iv_tweak=draw(st.sampled_from([0, 1, 2**40])))


def xts_halves_differ(case):
    """OpenSSL refuses XTS keys whose halves are equal."""
    key = case["key"]
    return case["spec"].mode != "xts" or key[:len(key) // 2] != key[len(key) // 2:]


@pytest.mark.parametrize("spec_text", SPECS)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_engine_matches_reference(spec_text, data):
    case = data.draw(cases(spec_text).filter(xts_halves_differ))
    spec, key, plaintext = case["spec"], case["key"], case["data"]
    options = dict(sector_size=case["sector_size"], iv_large_sectors=case["iv_large_sectors"],
                   iv_tweak=case["iv_tweak"])
    cipher = SectorCipher(spec, key, **options)
    buf = bytearray(plaintext)
    cipher.encrypt(buf, case["sector"])
    assert bytes(buf) == reference_cipher.crypt(spec, key, plaintext, case["sector"],
                                                encrypt=True, **options)
    cipher.decrypt(memoryview(buf), case["sector"])
    assert buf == plaintext


@pytest.mark.parametrize("spec_text", ["aes-xts-plain64", "aes-cbc-essiv:sha256", "aes-ctr-plain"])
@pytest.mark.parametrize("sector_size", [512, 4096])
def test_requests_longer_than_a_chunk(spec_text, sector_size):
    spec = CipherSpec.parse(spec_text)
    key = bytes(range(64 if spec.mode == "xts" else 32))
    plaintext = bytes(range(256)) * ((2 * CHUNK + 3 * sector_size) // 256)
    buf = bytearray(plaintext)
    SectorCipher(spec, key, sector_size).encrypt(buf, 2**32 - 700)
    assert buf == reference_cipher.crypt(spec, key, plaintext, 2**32 - 700, encrypt=True,
                                         sector_size=sector_size)


@pytest.mark.parametrize("sector_size", [1024, 2048])
def test_xts_sectors_of_several_mask_groups(sector_size):
    """XTS spreads masks over groups of 32 blocks; OpenSSL's tweak starts over in each chunk."""
    spec, key = CipherSpec.parse("aes-xts-plain64"), bytes(range(64))
    plaintext = random.Random(sector_size).randbytes(CHUNK + 3 * sector_size)
    cipher = SectorCipher(spec, key, sector_size)
    buf = bytearray(plaintext)
    cipher.encrypt(buf, 2**61 - 5)
    assert buf == reference_cipher.crypt(spec, key, plaintext, 2**61 - 5, encrypt=True,
                                         sector_size=sector_size)
    cipher.decrypt(buf, 2**61 - 5)
    assert buf == plaintext


def test_botan_xts_across_chunks():
    botan2 = pytest.importorskip("botan2", reason="needs python3-botan")
    key, sector = bytes(range(64)), 2**32 - 3
    plaintext = random.Random(1).randbytes(CHUNK + 5 * 512)
    expected = b""
    for i in range(len(plaintext) // 512):
        context = botan2.SymmetricCipher("Serpent/XTS", encrypt=True)
        context.set_key(key)
        context.start((sector + i).to_bytes(16, "little"))
        expected += bytes(context.finish(plaintext[i * 512:(i + 1) * 512]))
    buf = bytearray(plaintext)
    SectorCipher(CipherSpec.parse("serpent-xts-plain64"), key).encrypt(buf, sector)
    assert buf == expected


def test_threads_share_xts_scratch_safely():
    """Concurrent requests: no two calls may share a set of contexts and buffers."""
    cipher = SectorCipher(CipherSpec.parse("aes-xts-plain64"), bytes(range(64)))
    plaintexts = [random.Random(i).randbytes(CHUNK // 4 + 512 * i) for i in range(4)]
    expected = [reference_cipher.crypt(cipher.spec, bytes(range(64)), p, 100 * i, encrypt=True)
                for i, p in enumerate(plaintexts)]
    results, start = [], threading.Barrier(4)

    def work(i):
        start.wait()
        for _ in range(25):
            buf = bytearray(plaintexts[i])
            cipher.encrypt(buf, 100 * i)
            results.append(buf == expected[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 100


def test_short_lived_threads_reuse_contexts():
    """nbdkit's Python plugin runs every request in a new Python thread state: the
    cipher contexts and scratch buffers must outlive it, not be made per request."""
    cipher = SectorCipher(CipherSpec.parse("aes-xts-plain64"), bytes(range(64)), engine="numpy")
    for _ in range(10):
        t = threading.Thread(target=cipher.encrypt, args=(bytearray(4096), 0))
        t.start()
        t.join()
    assert len(cipher._idle) == 1


def test_a_request_equals_its_sectors_one_by_one():
    cipher = SectorCipher(CipherSpec.parse("aes-xts-plain64"), bytes(range(64)))
    whole = bytearray(range(256)) * 2 * 64
    pieces = bytearray(whole)
    cipher.encrypt(whole, 10)
    for i in range(64):
        cipher.encrypt(memoryview(pieces)[i * 512:(i + 1) * 512], 10 + i)
    assert whole == pieces


def test_threads_share_one_cipher():
    cipher = SectorCipher(CipherSpec.parse("aes-cbc-essiv:sha256"), bytes(32))
    plaintext = bytes(range(256)) * 256
    expected = reference_cipher.crypt(cipher.spec, bytes(32), plaintext, 5, encrypt=True)
    results = []

    def work():
        for _ in range(20):
            buf = bytearray(plaintext)
            cipher.encrypt(buf, 5)
            results.append(buf == expected)
            cipher.decrypt(buf, 5)
            results.append(buf == plaintext)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 160


def vectors(name):
    return json.loads((VECTORS / name).read_text())


@pytest.mark.parametrize("vector", vectors("ieee1619_xts.json")["vectors"], ids=lambda v: v["name"])
def test_ieee1619_xts_vectors(vector):
    check_known_answer("aes-xts-plain64", vector["key"], vector["data_unit_sequence_number"],
                       vector["plaintext"], vector["ciphertext"])


@pytest.mark.parametrize("vector", vectors("luks1_vectors.json"),
                         ids=lambda v: f"{v['spec']}-{len(v['key']) * 4}-{v['sector']}")
def test_qemu_luks1_vectors(vector):
    check_known_answer(vector["spec"], vector["key"], vector["sector"],
                       vector["plaintext"], vector["ciphertext"])


def test_fips197_aes_ecb():
    check_known_answer("aes-ecb", "000102030405060708090a0b0c0d0e0f", 0,
                       "00112233445566778899aabbccddeeff" * 32,
                       "69c4e0d86a7b0430d8cdb78070b4c55a" * 32)


def check_known_answer(spec_text, key_hex, sector, plaintext_hex, ciphertext_hex):
    cipher = SectorCipher(CipherSpec.parse(spec_text), bytes.fromhex(key_hex))
    buf = bytearray.fromhex(plaintext_hex)
    cipher.encrypt(buf, sector)
    assert buf.hex() == ciphertext_hex
    cipher.decrypt(buf, sector)
    assert buf.hex() == plaintext_hex


def test_rejects_bad_arguments():
    spec = CipherSpec.parse("aes-xts-plain64")
    with pytest.raises(InputError, match="key size 128 bits does not fit aes-xts-plain64 \\(256 or 512 bits\\)"):
        SectorCipher(spec, bytes(16))
    with pytest.raises(InputError, match="halves are equal"):
        SectorCipher(spec, bytes(64))
    with pytest.raises(InputError, match="sector size 8192"):
        SectorCipher(spec, bytes(range(64)), sector_size=8192)
    cipher = SectorCipher(spec, bytes(range(64)))
    with pytest.raises(ValueError, match="not a multiple"):
        cipher.encrypt(bytearray(1000), 0)
    with pytest.raises(TypeError, match="writable"):
        cipher.encrypt(bytes(512), 0)


# -- cast5: 64-bit blocks, so 8-byte IVs (dm-crypt's iv_size is the block size) ---------

CAST5_IVS = {  # dm-crypt's definitions for an 8-byte IV; benbi counts 8-byte blocks
    "plain64": lambda n, key: n.to_bytes(8, "little"),
    "plain": lambda n, key: (n % (1 << 32)).to_bytes(8, "little"),
    "plain64be": lambda n, key: n.to_bytes(8, "big"),
    "benbi": lambda n, key: (((n << 6) + 1) % (1 << 64)).to_bytes(8, "big"),
    "null": lambda n, key: bytes(8),
    "essiv:md5": lambda n, key: _cast5(hashlib.md5(key).digest()).encrypt(n.to_bytes(8, "little")),
}


def _cast5(key):
    botan2 = pytest.importorskip("botan2", reason="needs python3-botan")
    block_cipher = botan2.BlockCipher("CAST-128")
    block_cipher.set_key(key)
    return block_cipher


def test_rfc2144_cast5_known_answer():
    """RFC 2144 B.1, 128-bit key, in every block of a sector."""
    check_known_answer("cast5-ecb", "0123456712345678234567893456789a", 0,
                       "0123456789abcdef" * 64, "238b4fe5847e44b2" * 64)


@pytest.mark.parametrize("iv", CAST5_IVS)
@pytest.mark.parametrize("sector_size", [512, 4096])
def test_cast5_cbc_matches_botan_per_sector(iv, sector_size):
    botan2 = pytest.importorskip("botan2", reason="needs python3-botan")
    key, sector, count = bytes(range(1, 17)), 2**32 - 3, 9
    plaintext = random.Random(7).randbytes(count * sector_size)
    expected = b""
    for i in range(count):
        context = botan2.SymmetricCipher("CAST-128/CBC/NoPadding", encrypt=True)
        context.set_key(key)
        context.start(bytes(CAST5_IVS[iv]((sector + i) * (sector_size // 512), key)))
        expected += bytes(context.finish(plaintext[i * sector_size:(i + 1) * sector_size]))
    cipher = SectorCipher(CipherSpec.parse(f"cast5-cbc-{iv}"), key, sector_size)
    buf = bytearray(plaintext)
    cipher.encrypt(buf, sector)
    assert bytes(buf) == expected
    cipher.decrypt(buf, sector)
    assert buf == plaintext
