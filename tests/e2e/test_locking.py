"""Image locks that QEMU honours, and that nbdcrypt honours back."""

import subprocess
import time

from tests.conftest import serving
from tests.tools import nbdcrypt_cmd, require, run


def qemu_write_fails(image):
    result = run(["qemu-io", "-f", "raw", "-c", "write 0 512", str(image)], check=False)
    return result.returncode != 0 and 'Failed to get "write" lock' in result.stderr


def serve_fails(image, key_file, tmp_path, *extra):
    result = subprocess.run(nbdcrypt_cmd() + ["serve", str(image), "--key-file", str(key_file),
                                              "--socket", str(tmp_path / "second.sock"), *extra],
                            capture_output=True, text=True, timeout=60)
    return result.returncode == 2 and "image is in use" in result.stderr and "Traceback" not in result.stderr


def test_qemu_and_a_second_server_cannot_write_a_served_image(image, key_file, tmp_path):
    require("qemu-io", "qemu-nbd", "qemu-img")
    before = image.read_bytes()
    with serving(image, key_file):
        assert qemu_write_fails(image)
        nbd = run(["qemu-nbd", "-f", "raw", "-k", str(tmp_path / "qemu.sock"), str(image)], check=False)
        assert nbd.returncode != 0 and "lock" in nbd.stderr
        assert serve_fails(image, key_file, tmp_path)
        assert serve_fails(image, key_file, tmp_path, "--readonly")
        assert "virtual size" in run(["qemu-img", "info", "-U", str(image)]).stdout  # read-only sharing
    assert image.read_bytes()[:4096] == before[:4096]


def test_readers_share_and_keep_writers_out(image, key_file, tmp_path):
    require("qemu-io")
    with serving(image, key_file, "--readonly"):
        with serving(image, key_file, "--readonly", socket_path=tmp_path / "two.sock"):
            assert qemu_write_fails(image)
            assert serve_fails(image, key_file, tmp_path)
        assert run(["qemu-io", "-r", "-f", "raw", "-c", "read 0 512", str(image)]).returncode == 0


def test_nbdcrypt_refuses_an_image_qemu_is_writing(image, key_file, tmp_path):
    require("qemu-nbd")
    sock = tmp_path / "qemu.sock"
    with subprocess.Popen(["qemu-nbd", "-f", "raw", "-k", str(sock), str(image)]) as qemu:
        try:
            while not sock.exists():
                assert qemu.poll() is None
                time.sleep(0.02)
            assert serve_fails(image, key_file, tmp_path)
            assert serve_fails(image, key_file, tmp_path, "--readonly")
        finally:
            qemu.terminate()
