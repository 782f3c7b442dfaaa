"""Faults in the backing store: the client gets the right errno, the server keeps
serving, and the image stays consistent."""

import errno
import os

import pytest

from tests.conftest import nbd_backing, serving
from tests.tools import nbdcrypt_cmd, require, run

nbd = pytest.importorskip("nbd", reason="needs python3-libnbd")


@pytest.fixture
def small_tmpfs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], check=False).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    run(["umount", str(mnt)])


def test_full_filesystem_gives_enospc_and_keeps_serving(small_tmpfs, key_file, nbd_handle):
    image = small_tmpfs / "img"
    run(nbdcrypt_cmd() + ["format", "--type", "luks1", str(image), "16M", "--key-file", str(key_file),
                          "--iter-time", "10"])  # sparse: 2 MiB header on a 6 MiB filesystem
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
    run(nbdcrypt_cmd() + ["format", "--type", "luks1", str(image), "8M", "--key-file", str(key_file),
                          "--iter-time", "10"])
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
