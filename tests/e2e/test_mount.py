"""As a user would: serve, attach through nbdfuse + a loop device, mkfs, mount, restart, check files."""

import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from tests.conftest import nbdcrypt_luks1, serving
from tests.tools import require, run


@contextmanager
def attached(uri, workdir):
    """nbdfuse exposes the export as a file; a loop device makes it a block device."""
    sock = parse_qs(urlparse(uri).query)["socket"][0]
    fuse_dir = Path(workdir, "fuse")
    fuse_dir.mkdir(exist_ok=True)
    pidfile = Path(workdir, "nbdfuse.pid")
    pidfile.unlink(missing_ok=True)
    log = Path(workdir, "nbdfuse.log")
    with open(log, "wb") as stderr:
        fuse = subprocess.Popen(["nbdfuse", "-P", str(pidfile), f"{fuse_dir}/disk", "--unix", sock], stderr=stderr)
    deadline = time.monotonic() + 20
    while not pidfile.exists() and fuse.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not pidfile.exists():
        fuse.kill()
        fuse.wait()
        pytest.skip(f"nbdfuse could not mount here: {log.read_text().strip()}")
    try:
        loop = run(["losetup", "-f", "--show", f"{fuse_dir}/disk"], check=False)
        if loop.returncode != 0:
            pytest.skip(f"no loop device available: {loop.stderr.strip()}")
        device = loop.stdout.strip()
        try:
            yield device
        finally:
            run(["losetup", "-d", device])
    finally:
        run(["fusermount3", "-u", str(fuse_dir)])
        fuse.wait(timeout=30)


@contextmanager
def mounted(device, mountpoint):
    Path(mountpoint).mkdir(exist_ok=True)
    run(["mount", device, str(mountpoint)])
    try:
        yield Path(mountpoint)
    finally:
        run(["umount", str(mountpoint)])


def test_filesystem_survives_a_restart(tmp_path, key_file):
    require("nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "mount", "umount")
    if os.geteuid() != 0:
        pytest.skip("loop devices and mount need root")
    if not Path("/dev/fuse").exists():
        pytest.skip("no /dev/fuse on this machine")
    image = tmp_path / "disk.img"
    nbdcrypt_luks1(image, key_file, "64M")
    files = {f"dir{i}/file{i}.bin": os.urandom(100_000 * (i + 1)) for i in range(5)}

    with serving(image, key_file) as uri, attached(uri, tmp_path) as device:
        run(["mkfs.ext4", "-q", device])
        with mounted(device, tmp_path / "mnt") as mnt:
            for name, data in files.items():
                (mnt / name).parent.mkdir(exist_ok=True)
                (mnt / name).write_bytes(data)

    assert b"lost+found" not in image.read_bytes()  # the filesystem is encrypted on disk

    with serving(image, key_file) as uri, attached(uri, tmp_path) as device:
        run(["fsck.ext4", "-n", device])
        with mounted(device, tmp_path / "mnt") as mnt:
            for name, data in files.items():
                assert (mnt / name).read_bytes() == data
