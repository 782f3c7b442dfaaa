"""The data path without nbdkit: a real file store and the real cipher engine."""

import errno
import os
import random
import threading

import pytest

from nbdcrypt.crypto.engine import SectorCipher
from nbdcrypt.crypto.spec import CipherSpec
from nbdcrypt.datapath import sectors
from nbdcrypt.datapath.volume import RangeLock, Volume
from nbdcrypt.errors import InputError, ReadOnlyError, UnsupportedError
from nbdcrypt.storage.store import FileStore

OFFSET = 4096
SIZE = 256 << 10


def make_volume(path, sector_size=512, readonly=False):
    if not path.exists():
        path.write_bytes(os.urandom(OFFSET + SIZE))
    cipher = SectorCipher(CipherSpec.parse("aes-xts-plain64"), bytes(range(64)), sector_size=sector_size)
    return Volume(FileStore(path, readonly=readonly), cipher, OFFSET, SIZE)


@pytest.mark.parametrize("sector_size", [512, 4096])
def test_random_unaligned_io_matches_model(tmp_path, sector_size):
    volume = make_volume(tmp_path / "img", sector_size)
    model = bytearray(SIZE)
    volume.zero(SIZE, 0)
    rnd = random.Random(sector_size)
    for _ in range(300):
        offset, length = rnd.randrange(SIZE), rnd.randrange(1, 20000)
        length = min(length, SIZE - offset)
        data = rnd.randbytes(length)
        volume.write(data, offset)
        model[offset:offset + length] = data
        buf = bytearray(length)
        volume.read(buf, offset)
        assert buf == model[offset:offset + length]
    whole = bytearray(SIZE)
    volume.read(whole, 0)
    assert whole == model


def test_ciphertext_is_per_sector_and_payload_relative(tmp_path):
    """Writing sector n of the payload stores E(n) at payload_offset + n*512, nothing else."""
    path = tmp_path / "img"
    volume = make_volume(path)
    before = path.read_bytes()
    volume.write(b"A" * 512, 1024)
    after = path.read_bytes()
    changed = [i for i in range(len(after)) if after[i] != before[i]]
    assert OFFSET + 1024 <= min(changed) and max(changed) < OFFSET + 1536
    expected = bytearray(b"A" * 512)
    SectorCipher(CipherSpec.parse("aes-xts-plain64"), bytes(range(64))).encrypt(expected, 2)
    assert after[OFFSET + 1024:OFFSET + 1536] == expected


def test_concurrent_partial_writes_to_one_sector(tmp_path):
    volume = make_volume(tmp_path / "img")
    volume.zero(512, 0)

    def patch(i):
        for _ in range(50):
            volume.write(bytes([i + 1]) * 16, i * 16)

    threads = [threading.Thread(target=patch, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    buf = bytearray(512)
    volume.read(buf, 0)
    assert buf == b"".join(bytes([i + 1]) * 16 for i in range(32))


def test_range_lock_excludes_overlapping_writers_only():
    lock = RangeLock()
    with lock(0, 512, exclusive=False), lock(0, 512, exclusive=False), lock(512, 1024, exclusive=True):
        blocked = threading.Event()
        entered = threading.Event()

        def writer():
            blocked.set()
            with lock(100, 600, exclusive=True):
                entered.set()

        t = threading.Thread(target=writer)
        t.start()
        blocked.wait()
        assert not entered.wait(0.2)
    t.join(5)
    assert entered.is_set()


def test_readonly_store_refuses_writes(tmp_path):
    with make_volume(tmp_path / "img") as volume:
        assert not volume.readonly
    with make_volume(tmp_path / "img", readonly=True) as ro:
        assert ro.readonly
        with pytest.raises(ReadOnlyError):
            ro.write(b"x", 0)


def test_luks_volume_declares_no_trim_and_no_extents(tmp_path):
    """Declared, so nbdkit advertises neither; called anyway, each says ENOTSUP."""
    assert (Volume.can_trim, Volume.can_extents) == (False, False)
    with make_volume(tmp_path / "img") as volume:
        for call in (lambda: volume.trim(512, 0), lambda: volume.extents(512, 0)):
            with pytest.raises(UnsupportedError) as raised:
                call()
            assert raised.value.errno == errno.ENOTSUP


def test_one_writer_at_a_time(tmp_path):
    """QEMU-style image locks: a second writer, or a reader beside a writer, is refused."""
    with make_volume(tmp_path / "img"):
        for readonly in (False, True):
            with pytest.raises(InputError, match="image is in use"):
                make_volume(tmp_path / "img", readonly=readonly)
    with make_volume(tmp_path / "img", readonly=True), make_volume(tmp_path / "img", readonly=True):
        with pytest.raises(InputError, match="image is in use"):
            make_volume(tmp_path / "img")


def test_missing_image_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        FileStore(tmp_path / "absent")


def test_concurrent_writes_each_get_their_own_buffer(tmp_path):
    """Writes encrypt in scratch buffers borrowed per request: concurrent requests (from
    read-only buffers, as nbdkit passes them) must never share one."""
    volume = make_volume(tmp_path / "img")
    regions = 8
    span = SIZE // regions
    start = threading.Barrier(regions)

    def writer(i):
        rnd = random.Random(i)
        start.wait()
        for _ in range(20):
            offset = i * span + rnd.randrange(0, span - 8192, 512)
            volume.write(memoryview(bytes([i + 1]) * 8192).toreadonly(), offset)

    volume.zero(SIZE, 0)
    threads = [threading.Thread(target=writer, args=(i,)) for i in range(regions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    whole = bytearray(SIZE)
    volume.read(whole, 0)
    for i in range(regions):
        assert set(whole[i * span:(i + 1) * span]) <= {0, i + 1}


def test_requests_larger_than_a_kept_buffer(tmp_path, monkeypatch):
    monkeypatch.setattr(sectors, "KEEP_BUFFER", 4096)
    volume = make_volume(tmp_path / "img")
    model = bytearray(SIZE)
    volume.zero(SIZE, 0)
    for offset, length in [(100, 3000), (0, 20000), (513, 9000), (4096, 4096), (1000, 70000)]:
        data = random.Random(offset).randbytes(length)
        volume.write(data, offset)
        model[offset:offset + length] = data
        buf = bytearray(length + 300)
        volume.read(buf, offset - 100 if offset >= 100 else offset)
        assert buf == model[max(0, offset - 100):][:length + 300]
    assert all(len(b) <= 4096 for b in volume._io._buffers.idle)
