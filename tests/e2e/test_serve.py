"""nbdcrypt serve against images and readers nobody here wrote: qemu-img and nbdkit's luks filter."""

import errno
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import (
    PASSPHRASE,
    nbdcrypt_luks1,
    qemu_luks_create,
    qemu_luks_opts,
    qemu_write,
    random_file,
    serving,
    sha256_file,
)
from tests.tools import nbdcrypt_cmd, require, run

QEMU_SPECS = {
    "aes-xts-plain64-256": dict(cipher_alg="aes-128", cipher_mode="xts", ivgen_alg="plain64"),
    "aes-xts-plain64-512": dict(cipher_alg="aes-256", cipher_mode="xts", ivgen_alg="plain64"),
    "aes-xts-plain": dict(cipher_alg="aes-256", cipher_mode="xts", ivgen_alg="plain"),
    "aes-cbc-essiv:sha256": dict(cipher_alg="aes-256", cipher_mode="cbc", ivgen_alg="essiv", ivgen_hash_alg="sha256"),
    "aes-cbc-plain64": dict(cipher_alg="aes-128", cipher_mode="cbc", ivgen_alg="plain64"),
    "aes-cbc-plain": dict(cipher_alg="aes-256", cipher_mode="cbc", ivgen_alg="plain", hash_alg="sha512"),
    "aes-ecb-plain64": dict(cipher_alg="aes-256", cipher_mode="ecb", hash_alg="sha256"),
}
SIZE = 8 << 20


# Every spec on a local file; a few also through a second nbdkit (an NBD backing store).
BACKENDS = [(spec, "file") for spec in QEMU_SPECS] + [
    ("aes-xts-plain64-512", "nbd"), ("aes-cbc-essiv:sha256", "nbd"), ("aes-cbc-plain", "nbd")]


@pytest.mark.parametrize("spec, backend", BACKENDS)
def test_reads_qemu_written_data(tmp_path, key_file, spec, backend):
    require("nbdcopy")
    image = qemu_luks_create(tmp_path / "img", key_file, f"{SIZE}", **QEMU_SPECS[spec])
    raw = random_file(tmp_path / "raw", SIZE, seed=1)
    qemu_write(image, key_file, raw)
    out = tmp_path / "out"
    with serving(image, key_file, backend=backend) as uri:
        run(["nbdcopy", uri, str(out)])
    assert out.read_bytes() == raw.read_bytes()


@pytest.mark.parametrize("spec, backend", BACKENDS)
def test_qemu_reads_nbdcrypt_written_data(tmp_path, key_file, spec, backend):
    require("nbdcopy")
    image = qemu_luks_create(tmp_path / "img", key_file, f"{SIZE}", **QEMU_SPECS[spec])
    raw = random_file(tmp_path / "raw", SIZE, seed=2)
    with serving(image, key_file, backend=backend) as uri:
        run(["nbdcopy", "--flush", str(raw), uri])
    result = run(["qemu-img", "compare", "--object", f"secret,id=s0,file={key_file}", "--image-opts",
                  f"driver=raw,file.filename={raw}", f"driver=luks,key-secret=s0,file.filename={image}"])
    assert "Images are identical" in result.stdout


# nbdkit 1.32's luks filter knows only the plain and plain64 IV generators.
@pytest.mark.parametrize("spec", ["aes-xts-plain64-512", "aes-xts-plain", "aes-cbc-plain64"])
def test_nbdkit_luks_filter_reads_nbdcrypt_written_data(tmp_path, key_file, spec):
    require("nbdkit", "nbdcopy")
    image = qemu_luks_create(tmp_path / "img", key_file, f"{SIZE}", **QEMU_SPECS[spec])
    raw = random_file(tmp_path / "raw", SIZE, seed=3)
    with serving(image, key_file) as uri:
        run(["nbdcopy", "--flush", str(raw), uri])
    out = tmp_path / "out"
    run(["nbdkit", "-U", "-", "--filter=luks", "file", str(image), f"passphrase=+{key_file}",
         "--run", f'nbdcopy "$uri" {out}'])
    assert out.read_bytes() == raw.read_bytes()


@pytest.fixture
def image(tmp_path, key_file):
    return qemu_luks_create(tmp_path / "img", key_file, f"{SIZE}")


def test_export_geometry(image, key_file, nbd_handle):
    nbd = pytest.importorskip("nbd")
    with serving(image, key_file) as uri:
        h = nbd_handle(uri)
        assert h.get_size() == SIZE  # the payload, not the file
        assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
        assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
        assert h.can_multi_conn() and h.can_flush() and h.can_fua() and h.can_zero()
        assert not h.can_trim()  # declared by the LUKS volume: nothing to discard
        assert not h.is_read_only()


def test_unaligned_io_matches_a_plain_model(image, key_file, nbd_handle, tmp_path):
    import random

    rnd = random.Random(5)
    model = bytearray(SIZE)
    with serving(image, key_file) as uri:
        h = nbd_handle(uri)
        h.zero(SIZE, 0)
        for _ in range(200):
            offset = rnd.randrange(SIZE - 70000)
            data = rnd.randbytes(rnd.randrange(1, 70000))
            h.pwrite(data, offset)
            model[offset:offset + len(data)] = data
            r_off = rnd.randrange(SIZE - 9000)
            r_len = rnd.randrange(1, 9000)
            assert h.pread(r_len, r_off) == model[r_off:r_off + r_len]
        h.flush()
    out = tmp_path / "qemu.raw"
    run(["qemu-img", "convert", "-O", "raw"] + qemu_luks_opts(image, key_file) + [str(out)])
    assert out.read_bytes() == model


def test_concurrent_partial_writes_to_one_sector_all_land(image, key_file, nbd_handle):
    """Sixteen clients each patch their own 32 bytes of the same sectors: no update is lost."""
    with serving(image, key_file) as uri:
        handles = [nbd_handle(uri) for _ in range(16)]

        def patch(i, h):
            for round_ in range(20):
                h.pwrite(bytes([i * 16 + round_ % 16]) * 32, 4096 + i * 32)

        threads = [threading.Thread(target=patch, args=(i, h)) for i, h in enumerate(handles)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        got = handles[0].pread(512, 4096)
        assert got == b"".join(bytes([i * 16 + 19 % 16]) * 32 for i in range(16))


def test_zero_fua_and_flush(image, key_file, nbd_handle, tmp_path):
    nbd = pytest.importorskip("nbd")
    with serving(image, key_file) as uri:
        h = nbd_handle(uri)
        h.pwrite(b"\xaa" * SIZE, 0, nbd.CMD_FLAG_FUA)
        h.zero(1 << 20, 12345)
        h.zero(100, 3 << 20, nbd.CMD_FLAG_FUA)
        h.flush()
        assert h.pread(1 << 20, 12345) == bytes(1 << 20)
    expected = bytearray(b"\xaa" * SIZE)
    expected[12345:12345 + (1 << 20)] = bytes(1 << 20)
    expected[3 << 20:(3 << 20) + 100] = bytes(100)
    out = tmp_path / "qemu.raw"
    run(["qemu-img", "convert", "-O", "raw"] + qemu_luks_opts(image, key_file) + [str(out)])
    assert out.read_bytes() == expected


def test_readonly_export_refuses_writes_and_leaves_image_alone(image, key_file, nbd_handle):
    nbd = pytest.importorskip("nbd")
    before = sha256_file(image)
    with serving(image, key_file, "--readonly") as uri:
        h = nbd_handle(uri)
        assert h.is_read_only()
        with pytest.raises(nbd.Error) as failure:
            h.pwrite(b"x" * 512, 0)
        assert failure.value.errnum in (errno.EPERM, errno.EROFS)
        assert len(h.pread(4096, 0)) == 4096
    assert sha256_file(image) == before


def test_key_derived_once_per_daemon_not_per_connection(tmp_path, key_file, nbd_handle):
    """An image whose PBKDF2 takes ~2 s to unlock still accepts new clients at once."""
    image = tmp_path / "slow.img"
    nbdcrypt_luks1(image, key_file, "4M", iter_time=2000)
    with serving(image, key_file) as uri:
        nbd_handle(uri)
        start = time.monotonic()
        for _ in range(5):
            nbd_handle(uri).pread(512, 0)
        per_connection = (time.monotonic() - start) / 5
    print(f"new connection + first read: {per_connection * 1000:.1f} ms")
    assert per_connection < 0.5  # a re-derivation would cost about 2 s each


def test_passphrase_from_fd_and_stdin(image, key_file, tmp_path):
    """--passphrase-fd and piped stdin both unlock; neither puts the secret on argv."""
    require("nbdinfo")
    import os
    import subprocess

    for how in ("fd", "stdin"):
        sock = tmp_path / f"{how}.sock"
        read_end, write_end = os.pipe()
        os.write(write_end, PASSPHRASE + b"\n")
        os.close(write_end)
        extra = ["--passphrase-fd", str(read_end)] if how == "fd" else []
        with subprocess.Popen(nbdcrypt_cmd() + ["serve", str(image), "--socket", str(sock), *extra],
                              stdin=read_end if how == "stdin" else subprocess.DEVNULL, pass_fds=(read_end,),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
            os.close(read_end)
            try:
                line = proc.stdout.readline().decode()
                assert "serving" in line, proc.stderr.read().decode()
                for pid in [proc.pid] + [int(p) for p in run(["pgrep", "-P", str(proc.pid)]).stdout.split()]:
                    for leak in ("cmdline", "environ"):
                        assert PASSPHRASE not in Path(f"/proc/{pid}/{leak}").read_bytes()
                assert str(SIZE) in run(["nbdinfo", "--size", f"nbd+unix:///?socket={sock}"]).stdout
            finally:
                proc.terminate()
                proc.communicate(timeout=30)
        assert proc.returncode == 0
