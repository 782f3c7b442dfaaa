"""LUKS2 and detached headers against cryptsetup itself, which runs here without
device-mapper: ``cryptsetup reencrypt --encrypt/--decrypt --force-offline-reencrypt``
encrypts and decrypts files in userspace, ``luksDump``, ``open --test-passphrase``,
``repair`` and ``convert`` check headers.  Data goes through ``nbdcrypt serve``.
QEMU is the oracle where cryptsetup cannot be: non-AES ciphers, data past 2 TiB.
"""

import os

import pytest

from tests.conftest import qemu_luks_create, qemu_luks_opts, random_file, serving, sha256_file
from tests.tools import (
    FAST_PBKDF,
    cryptsetup,
    cryptsetup_decrypt,
    cryptsetup_encrypt,
    cryptsetup_opens,
    nbdcrypt,
    read_all,
    require,
    run,
    write_all,
    write_key,
)

SIZE = 1 << 20

# (cipher, key bits, sector size, pbkdf): every cipher with both sector sizes would
# double the runtime for little; sector sizes and pbkdfs rotate through the ciphers.
CASES = [
    ("aes-xts-plain64", 256, 512, "pbkdf2"),
    ("aes-xts-plain64", 512, 4096, "argon2id"),
    ("aes-xts-plain64", 512, 1024, "argon2i"),
    ("aes-cbc-essiv:sha256", 256, 4096, "pbkdf2"),
    ("aes-cbc-essiv:sha256", 128, 512, "argon2id"),
    ("aes-xts-plain", 256, 2048, "pbkdf2"),
    ("aes-cbc-plain64", 192, 4096, "argon2i"),
    ("aes-xts-plain64be", 512, 512, "pbkdf2"),
    ("aes-cbc-benbi", 256, 4096, "pbkdf2"),
    ("aes-ctr-plain64", 256, 512, "pbkdf2"),
    ("aes-ecb", 256, 4096, "pbkdf2"),
]






@pytest.mark.parametrize("cipher, key_bits, sector_size, pbkdf", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[3]}" for c in CASES])
def test_cryptsetup_data_both_ways(tmp_path, key_file, cipher, key_bits, sector_size, pbkdf):
    """cryptsetup encrypts, nbdcrypt reads it back; nbdcrypt writes, cryptsetup decrypts."""
    plain = random_file(tmp_path / "plain", SIZE, seed=1).read_bytes()
    data, header = random_file(tmp_path / "data", SIZE, seed=1), tmp_path / "hdr"
    cryptsetup_encrypt(data, header, key_file, "--cipher", cipher, "--key-size", key_bits,
                       "--sector-size", sector_size, *FAST_PBKDF[pbkdf])
    assert data.read_bytes() != plain
    new = random_file(tmp_path / "new", SIZE, seed=2)
    with serving(data, key_file, "--header", header) as uri:
        assert read_all(uri) == plain
        write_all(uri, new)
    cryptsetup_decrypt(data, header, key_file)
    assert data.read_bytes() == new.read_bytes()


def test_luksformat_defaults_serve(tmp_path, key_file):
    """An image luksFormat made with its defaults (LUKS2, argon2id, aes-xts-plain64 512,
    4096-byte sectors; Argon2 costs lowered only for speed) serves the right plaintext.
    Without device-mapper its payload is written by reencrypting a plain copy under the
    same volume key with a detached header, then copying it to the image's data offset."""
    image = tmp_path / "image"
    image.write_bytes(b"")
    os.truncate(image, 17 * SIZE)
    cryptsetup("luksFormat", "--key-file", key_file, "--pbkdf-memory", 32, "--pbkdf-force-iterations", 4,
               image)
    dump = cryptsetup("luksDump", image).stdout
    assert "sector: 4096" in dump and "argon2id" in dump and "cipher: aes-xts-plain64" in dump
    volume_key = tmp_path / "vk"
    cryptsetup("luksDump", "--dump-volume-key", "--volume-key-file", volume_key, "--key-file", key_file,
               image)
    plain = random_file(tmp_path / "plain", SIZE, seed=3).read_bytes()
    data = random_file(tmp_path / "data", SIZE, seed=3)
    cryptsetup_encrypt(data, tmp_path / "hdr", key_file, "--volume-key-file", volume_key,
                       "--key-size", 512, "--sector-size", 4096, *FAST_PBKDF["pbkdf2"])
    with open(image, "r+b") as f:
        f.seek(16 * SIZE)
        f.write(data.read_bytes())
    with serving(image, key_file) as uri:
        assert read_all(uri) == plain


@pytest.mark.parametrize("pbkdf", ["pbkdf2", "argon2id"])
@pytest.mark.parametrize("detached", [False, True], ids=["attached", "detached"])
def test_nbdcrypt_headers_pass_cryptsetup(tmp_path, key_file, pbkdf, detached):
    """Headers nbdcrypt writes (format, keyslot add/change/remove) satisfy luksDump,
    open --test-passphrase (live passphrases only) and repair; its data decrypts."""
    image, header = tmp_path / "image", tmp_path / "hdr"
    where = ["--header", header] if detached else []
    fast = FAST_PBKDF[pbkdf]
    nbdcrypt("format", image, "4M", "--key-file", key_file, "--label", "lbl", *where, *fast)
    keys = [write_key(tmp_path / f"k{i}", f"pass {i}".encode()) for i in range(3)]
    nbdcrypt("keyslot", "add", image, "--key-file", key_file, "--new-key-file", keys[0], *where, *fast)
    nbdcrypt("keyslot", "add", image, "--key-file", keys[0], "--new-key-file", keys[1], *where, *fast)
    nbdcrypt("keyslot", "change", image, "--key-file", keys[1], "--new-key-file", keys[2], *where, *fast)
    nbdcrypt("keyslot", "remove", image, "--key-file", key_file, *where)
    target = header if detached else image
    dump = cryptsetup("luksDump", target).stdout
    assert "Label:          \tlbl" in dump or "lbl" in dump
    assert "repair" not in cryptsetup("repair", target).stdout.lower()
    assert cryptsetup("repair", target).returncode == 0
    opts = ["--header", header] if detached else []
    assert [cryptsetup_opens(image, k, *opts) for k in (key_file, *keys)] == [False, True, False, True]
    new = random_file(tmp_path / "new", 4 << 20, seed=4)
    with serving(image, keys[2], *where) as uri:
        write_all(uri, new)
    if detached:
        cryptsetup_decrypt(image, header, keys[0])
        assert image.read_bytes() == new.read_bytes()


def test_convert_to_luks1_opens_in_qemu(tmp_path, key_file):
    """cryptsetup convert --type luks1 of an nbdcrypt LUKS2 header (pbkdf2, 512-byte
    sectors) gives an image QEMU's own LUKS driver reads as nbdcrypt wrote it."""
    require("qemu-img")
    image = tmp_path / "image"
    nbdcrypt("format", image, "2M", "--key-file", key_file, "--sector-size", "512", "--key-size", "256",
             *FAST_PBKDF["pbkdf2"])
    plain = random_file(tmp_path / "plain", 2 << 20, seed=5)
    with serving(image, key_file) as uri:
        write_all(uri, plain)
    cryptsetup("convert", "--type", "luks1", image)
    assert cryptsetup("luksDump", image).stdout.startswith("LUKS header information for")
    result = run(["qemu-img", "compare", "--object", f"secret,id=s0,file={key_file}", "--image-opts",
                  f"driver=raw,file.filename={plain}", f"driver=luks,key-secret=s0,file.filename={image}"])
    assert "Images are identical" in result.stdout


DAMAGE = {
    "primary binary": (0x100, "primary LUKS2 header is damaged"),
    "primary JSON": (4096 + 10, "primary LUKS2 header is damaged"),
    "secondary binary": (16384 + 0x100, "secondary LUKS2 header is damaged"),
    "secondary JSON": (16384 + 4096 + 10, "secondary LUKS2 header is damaged"),
}


@pytest.fixture
def luks2_image(tmp_path, key_file):
    image = tmp_path / "image"
    nbdcrypt("format", image, "1M", "--key-file", key_file, *FAST_PBKDF["pbkdf2"])
    return image


@pytest.mark.parametrize("where", DAMAGE)
def test_damaged_copy_opens_from_the_other(tmp_path, key_file, luks2_image, where):
    """One flipped byte in either copy: info and serve use the other copy, say which,
    and write nothing; `repair` rewrites it, after which cryptsetup agrees."""
    offset, message = DAMAGE[where]
    flip(luks2_image, offset)
    before = sha256_file(luks2_image)
    info = nbdcrypt("info", luks2_image)
    assert message in info.stderr and info.stderr.count("\n") == 1
    with serving(luks2_image, key_file, "--readonly") as uri:
        assert len(read_all(uri)) == SIZE
    assert sha256_file(luks2_image) == before
    nbdcrypt("repair", luks2_image)
    assert nbdcrypt("info", luks2_image).stderr == ""
    assert "No known problems" in cryptsetup("repair", "-v", luks2_image).stdout


@pytest.mark.parametrize("damage", [
    ([0x100, 16384 + 0x100], "both LUKS2 header copies are damaged"),
    ([32768 + 1000], "no key available with this passphrase"),
], ids=["both copies", "keyslot area"])
def test_damage_that_cannot_be_worked_around(tmp_path, key_file, luks2_image, damage):
    offsets, message = damage
    for offset in offsets:
        flip(luks2_image, offset)
    before = sha256_file(luks2_image)
    result = nbdcrypt("serve", luks2_image, "--key-file", key_file, "--socket", tmp_path / "s", check=False)
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert sha256_file(luks2_image) == before


def test_plain_iv_wraps_past_sector_2_32(tmp_path, key_file, nbd_handle):
    """``plain`` IVs are the sector number mod 2^32: data QEMU's LUKS driver wrote just
    past 2 TiB of a sparse LUKS1 image (aes-cbc-plain) reads back through nbdcrypt."""
    require("qemu-io")
    image = tmp_path / "big.img"
    nbdcrypt("format", "--type", "luks1", image, "2049G", "--cipher", "aes-cbc-plain", "--key-file", key_file,
             *FAST_PBKDF["pbkdf2"])
    offset = (1 << 32) * 512 - 4096  # straddles the wrap
    run(["qemu-io", *qemu_luks_opts(image, key_file), "-c", f"write -P 0xa5 {offset} 8192"])
    with serving(image, key_file, "--readonly") as uri:
        h = nbd_handle(uri)
        assert h.pread(8192, offset) == b"\xa5" * 8192
        h.shutdown()  # before serve stops, or it waits out its grace period


def flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))




# cryptsetup here processes AES only in userspace; QEMU's LUKS1 driver (nettle) knows
# serpent, twofish and cast5, so it is the oracle for the non-AES ciphers.
QEMU_CIPHERS = {
    "serpent-xts-plain64": dict(cipher_alg="serpent-256", cipher_mode="xts", ivgen_alg="plain64"),
    "twofish-cbc-essiv:sha256": dict(cipher_alg="twofish-256", cipher_mode="cbc", ivgen_alg="essiv",
                                     ivgen_hash_alg="sha256"),
}


@pytest.mark.parametrize("cipher", ["serpent-xts-plain64", "twofish-cbc-essiv:sha256"])
def test_non_aes_ciphers_against_qemu(tmp_path, key_file, cipher):
    """QEMU writes, nbdcrypt reads; nbdcrypt writes, QEMU reads."""
    require("qemu-io", "qemu-img")
    image = qemu_luks_create(tmp_path / "image", key_file, size="1M", **QEMU_CIPHERS[cipher])
    run(["qemu-io", *qemu_luks_opts(image, key_file), "-c", "write -P 0x5a 4096 65536"])
    plain = random_file(tmp_path / "plain", SIZE, seed=9)
    with serving(image, key_file) as uri:
        assert read_all(uri)[4096:4096 + 65536] == b"\x5a" * 65536
        write_all(uri, plain)
    result = run(["qemu-img", "compare", "--object", f"secret,id=s0,file={key_file}", "--image-opts",
                  f"driver=raw,file.filename={plain}", f"driver=luks,key-secret=s0,file.filename={image}"])
    assert "Images are identical" in result.stdout
