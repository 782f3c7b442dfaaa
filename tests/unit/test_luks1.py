"""LUKS1 header parse/pack, sanity checks, keyslots and format_luks1, without outside tools."""

import io
import json
import os
import struct

import pytest

from nbdcrypt.errors import BadPassphraseError, FormatError, InputError, UnsupportedError
from nbdcrypt.formats import luks1, open_header, probe
from nbdcrypt.formats.luks1 import Luks1Header, format_luks1, layout

PASSPHRASE = b"correct horse battery staple"
PAYLOAD = 1 << 20

# Field offsets from the LUKS1 on-disk format specification, not from the code under test.
PAYLOAD_OFFSET, KEY_BYTES, MK_ITER = 104, 108, 164
CIPHER_NAME, CIPHER_MODE, HASH_SPEC, UUID = 8, 40, 72, 168


def slot_field(i, offset):
    return 208 + 48 * i + offset


ACTIVE, ITERATIONS, MATERIAL_OFFSET, STRIPES = 0, 4, 40, 44


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """One formatted image (path, header, bytes), shared because formatting costs a benchmark."""
    path = tmp_path_factory.mktemp("luks1") / "disk.img"
    header = format_luks1(path, PAYLOAD, PASSPHRASE, iter_time_ms=10)
    return path, header, path.read_bytes()


def read(buf, name="disk.img"):
    return Luks1Header.read(io.BytesIO(buf), name)


def patched(buf, offset, value):
    out = bytearray(buf)
    if isinstance(value, int):
        value = struct.pack(">I", value)
    out[offset : offset + len(value)] = value
    return bytes(out)


def test_layout_matches_cryptsetup():
    assert layout(32) == ([8 + 256 * i for i in range(8)], 4096)
    assert layout(64) == ([8 + 504 * i for i in range(8)], 4096)
    assert layout(16) == ([8 + 128 * i for i in range(8)], 2048)


def test_format_writes_what_it_returns(image):
    path, header, data = image
    assert read(data) == header
    assert header.pack() == data[:592]
    assert data[:6] == b"LUKS\xba\xbe" and data[6:8] == b"\0\1"
    assert data[CIPHER_NAME:CIPHER_NAME + 4] == b"aes\0" and data[CIPHER_MODE:CIPHER_MODE + 12] == b"xts-plain64\0"
    assert header.payload_offset == 4096 * 512 and len(data) == header.payload_offset + PAYLOAD
    assert [s.active for s in header.keyslots] == [True] + [False] * 7
    assert all(s.iterations >= 1000 for s in header.keyslots[:1]) and header.mk_digest_iterations >= 1000


def test_parse_pack_round_trip(image):
    _, header, data = image
    assert Luks1Header.parse(header.pack(), len(data)).pack() == data[:592]


def test_image_is_sparse(tmp_path):
    path = tmp_path / "big.img"
    format_luks1(path, 1 << 30, PASSPHRASE, iter_time_ms=10)
    assert path.stat().st_size == 4096 * 512 + (1 << 30)
    assert path.stat().st_blocks * 512 < 4 << 20


def test_unlock_and_master_key(image):
    path = image[0]
    with open(path, "rb") as f:
        header = open_header(f, "disk.img")
        key = header.unlock(PASSPHRASE, f)
        assert isinstance(key, bytearray) and len(key) == 32
        header.check_master_key(key)
        with pytest.raises(BadPassphraseError, match="^disk.img: no key available with this passphrase$"):
            header.unlock(b"wrong", f)
    with pytest.raises(BadPassphraseError, match="does not match"):
        header.check_master_key(bytes(32))
    with pytest.raises(InputError, match="32"):
        header.check_master_key(bytes(16))
    sector = bytearray(os.urandom(1024))
    cipher = header.payload_cipher(key)
    original = bytes(sector)
    cipher.encrypt(sector, 7)
    assert sector != original
    cipher.decrypt(sector, 7)
    assert sector == original


def test_damaged_keyslot_material_is_no_key(image):
    path, header, data = image
    damaged = patched(data, 8 * 512 + 1000, bytes(16))
    with pytest.raises(BadPassphraseError):
        header.unlock(PASSPHRASE, io.BytesIO(damaged))


@pytest.mark.parametrize(
    "cipher, key_bits, hash_name",
    [("aes-cbc-essiv:sha256", 128, "sha1"), ("aes-xts-plain64", 512, "sha512"), ("aes-cbc-plain64", 256, "ripemd160")],
)
def test_format_and_unlock_other_specs(tmp_path, cipher, key_bits, hash_name):
    path = tmp_path / "disk.img"
    header = format_luks1(path, 0, PASSPHRASE, cipher=cipher, key_bits=key_bits, hash_name=hash_name, iter_time_ms=10)
    with open(path, "rb") as f:
        opened = open_header(f, "disk.img")
        assert opened == header and str(opened.cipher_spec) == cipher and opened.hash_name == hash_name
        assert len(opened.unlock(PASSPHRASE, f)) == key_bits // 8


def test_info_has_no_secrets(image):
    _, header, _ = image
    info = header.info()
    text = json.dumps(info)
    assert info["cipher"] == "aes-xts-plain64" and info["key_bits"] == 256 and info["hash"] == "sha256"
    assert info["payload_offset"] == 4096 * 512 and info["sector_size"] == 512
    assert [s["state"] for s in info["keyslots"]] == ["enabled"] + ["disabled"] * 7
    assert info["keyslots"][1]["offset"] == 264 * 512
    for secret in (header.mk_digest, header.mk_digest_salt, header.keyslots[0].salt):
        assert secret.hex() not in text


CORRUPTIONS = [
    ("bad magic", lambda d: patched(d, 0, b"LUKS\xba\xbf"), FormatError, "^disk.img: not a LUKS image$"),
    ("empty file", lambda d: b"", FormatError, "not a LUKS image"),
    ("truncated header", lambda d: d[:300], FormatError, "truncated LUKS header"),
    ("unknown version", lambda d: patched(d, 6, b"\0\3"), FormatError, "unknown LUKS version 3"),
    ("unterminated string", lambda d: patched(d, CIPHER_NAME, b"a" * 32),
     FormatError, "cipher name field is not a NUL-terminated"),
    ("binary in string", lambda d: patched(d, UUID, b"\x01\0"), FormatError, "uuid field"),
    ("unsupported hash", lambda d: patched(d, HASH_SPEC, b"whirlpool\0"),
     UnsupportedError, "^disk.img: unsupported hash whirlpool$"),
    ("unsupported cipher", lambda d: patched(d, CIPHER_NAME, b"cast5\0"),
     UnsupportedError, "unsupported cipher cast5-xts-plain64"),
    ("unsupported mode", lambda d: patched(d, CIPHER_MODE, b"xts-bogus\0"),
     UnsupportedError, "unsupported cipher"),
    ("key bytes mismatch", lambda d: patched(d, KEY_BYTES, 24),
     FormatError, "key size of 24 bytes does not fit aes-xts-plain64"),
    ("no mk digest iterations", lambda d: patched(d, MK_ITER, 0),
     FormatError, "master key digest has 0 PBKDF2 iterations"),
    ("absurd mk digest iterations", lambda d: patched(d, MK_ITER, 0xFFFFFFFF),
     FormatError, "master key digest has 4294967295"),
    ("payload over keyslots", lambda d: patched(d, PAYLOAD_OFFSET, 1000),
     FormatError, "keyslot 3 material .* overlaps the payload at sector 1000"),
    ("slot past EOF of a detached header", lambda d: patched(d, PAYLOAD_OFFSET, 0)[:1024 * 512],
     FormatError, "keyslot 3 material .* is past the end of the file"),
    ("invalid slot state", lambda d: patched(d, slot_field(2, ACTIVE), 0x12345678),
     FormatError, "keyslot 2 has an invalid state 0x12345678"),
    ("bad stripes", lambda d: patched(d, slot_field(0, STRIPES), 3999),
     FormatError, "keyslot 0 has 3999 anti-forensic stripes"),
    ("active slot without iterations", lambda d: patched(d, slot_field(0, ITERATIONS), 0),
     FormatError, "keyslot 0 has 0 PBKDF2 iterations"),
    ("slot over header", lambda d: patched(d, slot_field(0, MATERIAL_OFFSET), 1),
     FormatError, "keyslot 0 material at sector 1 overlaps the header"),
    ("slots overlapping", lambda d: patched(d, slot_field(5, MATERIAL_OFFSET), 8 + 256 * 4 + 100),
     FormatError, "keyslot 5 material at sector 1132 overlaps keyslot 4"),
    ("slot past payload", lambda d: patched(d, slot_field(7, MATERIAL_OFFSET), 4000),
     FormatError, "keyslot 7 material .* overlaps the payload"),
]


@pytest.mark.parametrize("mutate, error, message", [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_sanity_checks(image, mutate, error, message):
    with pytest.raises(error, match=message) as caught:
        read(mutate(image[2]))
    assert type(caught.value) is error
    assert str(caught.value).startswith("disk.img: ")


def test_probe_and_open_header(image):
    data = image[2]
    assert probe(io.BytesIO(data)) == "luks1"
    assert probe(io.BytesIO(patched(data, 6, b"\0\2"))) == "luks2"
    assert probe(io.BytesIO(b"LUKS\xba")) is None
    assert probe(io.BytesIO(b"QFI\xfb" + bytes(100))) == "qcow2"
    assert open_header(io.BytesIO(data), "x") == image[1]
    with pytest.raises(FormatError, match="^x: both LUKS2 header copies are damaged"):
        open_header(io.BytesIO(patched(data, 6, b"\0\2")), "x")
    with pytest.raises(FormatError, match="^x: not a LUKS or qcow2 image$"):
        open_header(io.BytesIO(bytes(4096)), "x")


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"cipher": "cast5-xts-plain64"}, UnsupportedError, "unsupported cipher"),
        ({"cipher": "aes-xts-plain64", "key_bits": 128}, InputError, "key size 128 bits does not fit"),
        ({"key_bits": 255}, InputError, "multiple of 8"),
        ({"hash_name": "whirlpool"}, UnsupportedError, "unsupported hash whirlpool"),
        ({"payload_size": 1000}, InputError, "multiple of 512"),
        ({"iter_time_ms": 0}, InputError, "iteration time"),
    ],
)
def test_format_rejects_bad_arguments_before_touching_files(tmp_path, kwargs, error, message):
    args = {"payload_size": PAYLOAD, "iter_time_ms": 10, **kwargs}
    with pytest.raises(error, match=message):
        format_luks1(tmp_path / "disk.img", passphrase=PASSPHRASE, **args)
    assert list(tmp_path.iterdir()) == []


def test_format_never_overwrites_or_leaves_debris(tmp_path, monkeypatch):
    existing = tmp_path / "disk.img"
    existing.write_bytes(b"precious")
    with pytest.raises(InputError, match="already exists"):
        format_luks1(existing, PAYLOAD, PASSPHRASE, iter_time_ms=10)
    assert existing.read_bytes() == b"precious"
    with pytest.raises(InputError, match="no such directory"):
        format_luks1(tmp_path / "missing" / "disk.img", PAYLOAD, PASSPHRASE, iter_time_ms=10)

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(luks1.os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        format_luks1(tmp_path / "new.img", PAYLOAD, PASSPHRASE, iter_time_ms=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.img"]


def test_payload_is_checked_against_the_data_file(image):
    """A header file that ends before its payload reads: it may be detached, with a
    data offset (cryptsetup --header --offset).  The payload must fit the data file."""
    header = read(image[2][: 4096 * 512 - 512])
    assert header.payload_size(4096 * 512 + 1024) == 1024
    with pytest.raises(FormatError, match=r"^disk.img: payload offset 2097152 is past the end of the "
                                          r"file \(2096640 bytes\)$"):
        header.payload_size(4096 * 512 - 512)
