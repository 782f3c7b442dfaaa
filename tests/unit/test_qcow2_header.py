"""qcow2 header checks: every hostile or unsupported field gets one clear error."""

import struct

import pytest

from nbdcrypt.errors import BadPassphraseError, FormatError, InputError, UnsupportedError
from nbdcrypt.formats.qcow2 import Qcow2Image, create, probe
from nbdcrypt.formats.qcow2.header import aes_key
from nbdcrypt.formats.qcow2.tables import COMPRESSED, COPIED
from nbdcrypt.storage.store import FileStore

PASSPHRASE = b"correct horse battery staple"
MiB = 1 << 20


@pytest.fixture
def image(tmp_path):
    """A new 4 MiB legacy-AES image with 4 KiB clusters (no PBKDF: fast)."""
    path = tmp_path / "img.qcow2"
    create(path, 4 * MiB, PASSPHRASE, encrypt="aes", cluster_size=4096, allow_aes=True)
    return path


def patch(path, offset, fmt, *values):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def read_header(path):
    with open(path, "rb") as f:
        return Qcow2Image.read(f, str(path))


def open_volume(path, readonly=False):
    header = read_header(path)
    return header.open_volume(FileStore(path, readonly=readonly), aes_key(PASSPHRASE))


def test_new_image_reads_back(image):
    header = read_header(image)
    info = header.info()
    assert (info["format"], info["version"], info["virtual_size"], info["cluster_size"]) == \
        ("qcow2", 3, 4 * MiB, 4096)
    assert (info["encryption"], info["cipher"], info["refcount_bits"]) == ("aes", "aes-cbc-plain64", 16)
    with open(image, "rb") as f:
        assert probe(f) == "qcow2"
    volume = open_volume(image)
    volume.write(b"x" * 10000, 3000)
    buf = bytearray(12000)
    volume.read(buf, 2000)
    assert buf == bytes(1000) + b"x" * 10000 + bytes(1000)


def test_legacy_aes_key_is_the_passphrase():
    assert aes_key(b"abc") == b"abc" + bytes(13)
    assert aes_key(b"0123456789abcdefXYZ") == b"0123456789abcdef"
    assert aes_key(b"ab\0cd") == b"ab" + bytes(14)  # a C string, as QEMU reads it


@pytest.mark.parametrize("offset,fmt,value,error,message", [
    (0, ">4s", b"QFI\0", FormatError, "not a qcow2"),
    (4, ">I", 4, UnsupportedError, "version 4"),
    (20, ">I", 30, FormatError, "cluster bits"),
    (20, ">I", 8, FormatError, "cluster bits"),
    (36, ">I", 1 << 30, FormatError, "L1 table"),
    (40, ">Q", 1 << 40, FormatError, "L1 table"),
    (40, ">Q", 0, FormatError, "L1 table"),
    (48, ">Q", 1 << 40, FormatError, "refcount table"),
    (56, ">I", 1 << 20, FormatError, "refcount table"),
    (96, ">I", 7, FormatError, "refcount order"),
    (32, ">I", 3, UnsupportedError, "encryption method"),
    (32, ">I", 2, FormatError, "crypto header extension"),
    (72, ">Q", 1 << 40, UnsupportedError, "unknown incompatible"),
    (72, ">Q", 1 << 2, UnsupportedError, "external data"),
    (72, ">Q", 1 << 4, UnsupportedError, "extended L2"),
    (100, ">I", 100, FormatError, "header length"),
    (8, ">QI", (4000, 500), FormatError, "backing file name"),
])
def test_hostile_header_fields(image, offset, fmt, value, error, message):
    patch(image, offset, fmt, *(value if isinstance(value, tuple) else (value,)))
    with pytest.raises(error, match=message):
        read_header(image)


def l1_offset(path):
    with open(path, "rb") as f:
        f.seek(40)
        return struct.unpack(">Q", f.read(8))[0]


@pytest.mark.parametrize("entry", [0x100 | COPIED, (1 << 40) | COPIED, 4096 * 3 | (1 << 60)])
def test_hostile_l1_entries(image, entry):
    """An L1 entry inside the header, past the end of the file, or with reserved bits."""
    patch(image, l1_offset(image), ">Q", entry)
    with pytest.raises(FormatError, match="L1 entry 0"):
        open_volume(image, readonly=True).read(bytearray(512), 0)


@pytest.mark.parametrize("entry", [COPIED | 0, COPIED | (1 << 40), COMPRESSED | 100, COPIED | 4096 + 512])
def test_hostile_l2_entries(image, entry):
    """L2 entries pointing into the header, past the end, or misaligned."""
    with open_volume(image) as volume:
        volume.write(b"a" * 512, 0)  # allocates an L2 table and one data cluster
    with open(image, "rb") as f:
        f.seek(l1_offset(image))
        l2 = struct.unpack(">Q", f.read(8))[0] & ~COPIED
    patch(image, l2, ">Q", entry)
    if entry == COPIED:  # offset 0 is "unallocated" in QEMU too
        assert open_volume(image, readonly=True).extents(4096, 0) == [(0, 4096, 3)]
        return
    with pytest.raises(FormatError, match="guest cluster 0"):
        open_volume(image, readonly=True).read(bytearray(512), 0)


@pytest.mark.parametrize("bit,what", [(1, "dirty"), (2, "corrupt")])
def test_dirty_or_corrupt_images_are_read_only(image, bit, what):
    patch(image, 72, ">Q", bit)
    with open_volume(image, readonly=True) as volume:
        volume.read(bytearray(512), 0)
    with pytest.raises(UnsupportedError, match=what):
        open_volume(image)


def test_luks_wrong_passphrase(tmp_path):
    path = tmp_path / "img.qcow2"
    header = create(path, MiB, PASSPHRASE, iter_time_ms=10)
    assert header.info()["luks"]["cipher"] == "aes-xts-plain64"
    with open(path, "rb") as f:
        key = header.unlock(PASSPHRASE, f)
        header.check_master_key(key)
        with pytest.raises(BadPassphraseError):
            header.unlock(b"wrong", f)


def test_a_key_slot_is_refused_in_one_line(image):
    """Every format's unlock takes a keyslot (the Image contract); qcow2's embedded
    LUKS header is not the user's to name one of."""
    with open(image, "rb") as f, pytest.raises(InputError, match=r"img.qcow2: --key-slot is for LUKS images"):
        read_header(image).unlock(PASSPHRASE, f, 0)


@pytest.mark.parametrize("kwargs,message", [
    (dict(cluster_size=1000), "cluster size"),
    (dict(cluster_size=4 * MiB), "cluster size"),
    (dict(compat="2"), "compat"),
    (dict(encrypt="aes"), "legacy AES"),
    (dict(encrypt="none"), "encryption"),
])
def test_create_refuses_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(InputError, match=message):
        create(tmp_path / "img.qcow2", MiB, PASSPHRASE, **kwargs)
    assert not (tmp_path / "img.qcow2").exists()


# -- zstd clusters, the snapshot table, the metadata cache ------------------------------------

def zstd_frame(data, content_size=True):
    import zstandard

    return zstandard.ZstdCompressor(write_content_size=content_size).compress(data)


def test_zstd_clusters_decode_as_qemu_does():
    """Frames until the cluster is full, whatever padding follows (here the start of
    the next cluster's frame); skippable frames are stepped over."""
    from nbdcrypt.formats.qcow2.compress import ZSTD, decompress

    plain = bytes(range(256)) * 16
    skippable = struct.pack("<II", 0x184D2A50, 3) + b"abc"
    for data in (zstd_frame(plain) + zstd_frame(b"next cluster"),
                 zstd_frame(plain[:1000]) + zstd_frame(plain[1000:], content_size=False) + bytes(7),
                 skippable + zstd_frame(plain)):
        assert decompress(data, 4096, ZSTD) == plain


@pytest.mark.parametrize("data,message", [
    (lambda: zstd_frame(bytes(4097)), "does not fit"),
    (lambda: zstd_frame(bytes(1 << 30), content_size=False), "corrupt"),  # never inflated whole
    (lambda: zstd_frame(bytes(4096))[:-2], "corrupt"),
    (lambda: zstd_frame(bytes(100)), "holds 100 of 4096"),
    (lambda: bytes(64), "corrupt"),
])
def test_bad_zstd_clusters(data, message):
    from nbdcrypt.formats.qcow2.compress import ZSTD, decompress

    with pytest.raises(FormatError, match=message):
        decompress(data(), 4096, ZSTD)


def add_snapshot(path, *, l1_offset=3 * 4096, l1_size=1, extra=None, count=1, ident=b"1", name=b"snap"):
    """Append a snapshot table entry (4 KiB clusters: at the cluster after the file's end)."""
    from nbdcrypt.formats.qcow2.snapshots import ENTRY_FIELDS

    extra = struct.pack(">QQQ", 5000, 4 * MiB, 7) if extra is None else extra
    entry = ENTRY_FIELDS.pack(l1_offset, l1_size, len(ident), len(name), 1700000000, 5, 61_234_000_000,
                              0, len(extra)) + extra + ident + name
    table = -(-path.stat().st_size // 4096) * 4096
    with open(path, "r+b") as f:
        f.seek(table)
        f.write(entry.ljust(-(-len(entry) // 8) * 8, b"\0"))
    patch(path, 60, ">IQ", count, table)


def test_snapshot_table_is_read(image):
    add_snapshot(image)
    (snapshot,) = read_header(image).snapshots
    info = snapshot.info()
    assert (info["id"], info["name"], info["vm_size"], info["icount"]) == ("1", "snap", 5000, 7)
    assert info["vm_clock"] == "00:01:01.234"
    assert read_header(image).info()["snapshots"] == [info]


@pytest.mark.parametrize("kwargs,message", [
    (dict(extra=bytes(2000)), "extra data"),
    (dict(l1_offset=1 << 40), "snapshot 1 L1 table"),
    (dict(l1_offset=100), "snapshot 1 L1 table"),
    (dict(l1_size=1 << 30), "snapshot 1 L1 table"),
    (dict(count=2), "runs past the end"),
])
def test_hostile_snapshot_entries(image, kwargs, message):
    add_snapshot(image, **kwargs)
    with pytest.raises(FormatError, match=message):
        read_header(image)


def test_lru_cache_writes_back_before_it_drops():
    from nbdcrypt.formats.qcow2.tables import LruCache

    written = []
    cache = LruCache(2, lambda key, value: written.append((key, value)))
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # now b is the least recently used
    cache.put("c", 3)
    assert written == [("b", 2)] and cache.get("b") is None and len(cache) == 2

    def failing(key, value):
        raise OSError("disk full")

    cache = LruCache(1, failing)
    cache.put("a", 1)
    with pytest.raises(OSError):
        cache.put("b", 2)
    assert cache.get("a") == 1  # not written: still cached, nothing lost
