"""Faults in the backing store: the client gets the right errno, the server keeps
serving, and the image stays consistent."""

import errno

import pytest

from tests.conftest import nbd_backing, nbdcrypt_luks1, serving, tmpfs
from tests.tools import require

nbd = pytest.importorskip("nbd", reason="needs python3-libnbd")


@pytest.fixture
def small_tmpfs(tmp_path):
    with tmpfs(tmp_path / "tmpfs", "6m") as mnt:
        yield mnt


def test_full_filesystem_gives_enospc_and_keeps_serving(small_tmpfs, key_file, nbd_handle):
    image = small_tmpfs / "img"
    nbdcrypt_luks1(image, key_file, "16M")  # sparse: 2 MiB header on a 6 MiB filesystem
    with serving(image, key_file, socket_path=small_tmpfs.parent / "s.sock") as uri:
        h = nbd_handle(uri)
        with pytest.raises(nbd.Error) as full:
            for offset in range(0, 16 << 20, 1 << 20):
                h.pwrite(bytes([offset >> 20]) * (1 << 20), offset)
        assert full.value.errnum == errno.ENOSPC
        h.pwrite(b"\x07" * 4096, 0)  # space already allocated still takes writes
        h.flush()
        assert h.pread(4096, 0) == b"\x07" * 4096
        assert h.pread(1 << 20, 1 << 20) == b"\x01" * (1 << 20)


def test_io_errors_reach_the_client_as_eio_and_pass(tmp_path, key_file, nbd_handle):
    require("nbdkit")
    image = tmp_path / "img"
    nbdcrypt_luks1(image, key_file, "8M")
    trigger = tmp_path / "fail-now"
    with nbd_backing(image, "--filter=error", "file", str(image), "error=EIO", "error-rate=100%",
                     f"error-file={trigger}") as backing:
        with serving(backing, key_file, socket_path=tmp_path / "s.sock") as uri:
            h = nbd_handle(uri)
            h.pwrite(b"a" * 65536, 0)
            trigger.touch()
            for operation in (lambda: h.pread(4096, 0), lambda: h.pwrite(b"b" * 4096, 8192)):
                with pytest.raises(nbd.Error) as failed:
                    operation()
                assert failed.value.errnum == errno.EIO
            trigger.unlink()
            assert h.pread(65536, 0) == b"a" * 65536  # the same connection keeps working
            h.flush()
