"""Fixtures that start real tools the way a user would."""

import hashlib
import os
import select
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from tests.tools import nbdcrypt_cmd, require, run, write_key

PASSPHRASE = b"correct horse battery staple"


@pytest.fixture
def key_file(tmp_path):
    return write_key(tmp_path / "key", PASSPHRASE)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def qemu_luks_create(image, key_file, size="16M", **opts):
    """A LUKS1 image made by qemu-img; opts are qemu's luks options (cipher_alg=aes-256 ...)."""
    options = ",".join(["key-secret=s0", "iter-time=10"] + [f"{k.replace('_', '-')}={v}" for k, v in opts.items()])
    qemu_img_create("-f", "luks", "--object", f"secret,id=s0,file={key_file}", "-o", options, image, size)
    return Path(image)


def qemu_img_create(*args):
    """``qemu-img create -q ARGS``, retried while QEMU's PBKDF2 calibration fails with
    "Unable to get accurate CPU usage": it times 2^15 iterations by thread CPU time, which
    can read as 0 ms on a fast CPU (most often with sha1). Running it again succeeds."""
    require("qemu-img")
    for _ in range(30):
        result = run(["qemu-img", "create", "-q", *map(str, args)], check=False)
        if "Unable to get accurate CPU usage" not in result.stderr:
            break
    assert result.returncode == 0, result.stderr


def nbdcrypt_luks1(image, key_file, size, iter_time=10):
    """A LUKS1 image made by ``nbdcrypt format``, cheap to unlock unless told otherwise."""
    run(nbdcrypt_cmd() + ["format", "--type", "luks1", str(image), str(size), "--key-file", str(key_file),
                          "--iter-time", str(iter_time)])
    return Path(image)


@contextmanager
def tmpfs(mountpoint, size):
    """A tmpfs of ``size`` at ``mountpoint`` (skips the test where it cannot be mounted)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    Path(mountpoint).mkdir(exist_ok=True)
    if run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)], check=False).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield Path(mountpoint)
    finally:
        run(["umount", str(mountpoint)])


def qemu_write(image, key_file, raw):
    """Encrypt the raw file into ``image`` with QEMU's LUKS driver."""
    run(["qemu-img", "convert", "-n", "-f", "raw", str(raw), "--target-image-opts",
         f"driver=luks,key-secret=s0,file.filename={image}", "--object", f"secret,id=s0,file={key_file}"])


def qemu_luks_opts(image, key_file):
    """qemu-img/qemu-io arguments that open ``image`` through QEMU's own LUKS driver."""
    return ["--object", f"secret,id=s0,file={key_file}", "--image-opts",
            f"driver=luks,key-secret=s0,file.filename={image}"]


def random_file(path, size, seed=0):
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    Path(path).write_bytes(data)
    return Path(path)


@contextmanager
def nbd_backing(image, *plugin, socket_path=None, tls_psk=None):
    """A second nbdkit exporting the encrypted image as it is (default: the file
    plugin), so nbdcrypt reads and writes it over NBD; yields that URI.  With
    ``tls_psk`` (a psktool file for user alice) it requires TLS: an nbds+unix URI."""
    require("nbdkit")
    socket_path = socket_path or Path(image).with_suffix(".backing.sock")
    plugin = plugin or ("file", str(image))
    tls = ["--tls=require", f"--tls-psk={tls_psk}"] if tls_psk else []
    with subprocess.Popen(["nbdkit", "--foreground", "--unix", str(socket_path), *tls, *plugin]) as proc:
        try:
            deadline = time.monotonic() + 30
            while not socket_path.exists():
                assert proc.poll() is None and time.monotonic() < deadline, "backing nbdkit did not start"
                time.sleep(0.02)
            if tls_psk:
                yield f"nbds+unix://alice@/?socket={socket_path}&tls-psk-file={tls_psk}"
            else:
                yield f"nbd+unix:///?socket={socket_path}"
        finally:
            proc.terminate()


@contextmanager
def serving(image, key_file, *extra, socket_path=None, timeout=60, backend="file", killed=False):
    """Run ``nbdcrypt serve`` in the background; yield its NBD URI; stop it with SIGTERM
    and check it exits 0 (unless the test ``killed`` it).  With ``backend="nbd"`` the
    image is reached through a second nbdkit."""
    if backend == "nbd":
        with nbd_backing(image) as uri, serving(uri, key_file, *extra, timeout=timeout,
                                                socket_path=socket_path or Path(image).with_suffix(".sock")) as url:
            yield url
        return
    require("nbdkit")
    socket_path = socket_path or Path(image).with_suffix(".sock")
    cmd = nbdcrypt_cmd() + ["serve", str(image), "--key-file", str(key_file), "--socket", str(socket_path), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with proc:
        try:
            line = _await_line(proc, b"serving", timeout)
            assert line, f"nbdcrypt serve did not become ready: {proc.stderr.read().decode()}"
            yield line.decode().rsplit(" at ", 1)[1].strip()
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                _, stderr = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
    assert killed or proc.returncode == 0, f"nbdcrypt serve exited {proc.returncode}: {stderr.decode()}"


def _await_line(proc, marker, timeout):
    deadline = time.monotonic() + timeout
    buffered = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                return None
            buffered += chunk
            for line in buffered.splitlines():
                if marker in line:
                    return line
        elif proc.poll() is not None:
            return None
    return None


@pytest.fixture
def nbd_handle():
    """Open libnbd handles to a URI; all are closed at the end of the test."""
    nbd = pytest.importorskip("nbd", reason="needs python3-libnbd")
    handles = []

    def connect(uri):
        h = nbd.NBD()
        h.connect_uri(uri)
        handles.append(h)
        return h

    yield connect
    for h in handles:
        try:
            h.shutdown()
        except nbd.Error:
            pass  # the server is already gone
