"""Legacy AES qcow2 has no key check, so a mistyped passphrase would write under the
wrong key: serve warns, and writes only with --insecure-legacy-aes (as format does)."""

import pytest

from tests.conftest import PASSPHRASE, qemu_img_create, sha256_file
from tests.daemon.conftest import daemon, failing, one_line_exit_2
from tests.tools import read_all, require, run

SIZE = 1 << 20


@pytest.fixture
def image(tmp_path, key_file):
    require("qemu-img", "qemu-io")
    path = tmp_path / "aes.qcow2"
    qemu_img_create("-f", "qcow2", "--object", f"secret,id=s0,file={key_file}", "-o",
                    "encrypt.format=aes,encrypt.key-secret=s0", path, SIZE)
    run(["qemu-io", *qemu_opts(path, key_file), "-c", "write -P 0x61 0 64k"])
    return path


def qemu_opts(image, key_file):
    return ["--object", f"secret,id=s0,file={key_file}", "--image-opts",
            f"driver=qcow2,encrypt.key-secret=s0,file.filename={image}"]


def warning(stderr):
    """The one warning line; the passphrase is nowhere in stderr."""
    lines = [line for line in stderr.splitlines() if "legacy" in line]
    assert len(lines) == 1 and lines[0].startswith("nbdcrypt: warning: "), stderr
    assert PASSPHRASE.decode() not in stderr
    return lines[0]


def test_read_write_needs_the_flag(tmp_path, image, key_file):
    before = sha256_file(image)
    result = failing(image, "--key-file", key_file, "--socket", tmp_path / "s.sock")
    one_line_exit_2(result, "--insecure-legacy-aes")
    assert "--readonly" in result.stderr
    assert sha256_file(image) == before


def test_readonly_serves_with_a_warning(tmp_path, image, key_file):
    with daemon(image, "--key-file", key_file, "--socket", tmp_path / "s.sock", "--readonly") as (proc, uri):
        assert read_all(uri)[:65536] == b"\x61" * 65536
    assert "no key check" in warning(proc.stderr_text)


def test_the_flag_allows_writes_with_a_warning(tmp_path, image, key_file, nbd_handle):
    config = tmp_path / "serve.toml"
    config.write_text("insecure-legacy-aes = true\n")  # the config key, as the flag
    with daemon(image, "--key-file", key_file, "--socket", tmp_path / "s.sock", "--config", config) as (proc, uri):
        nbd_handle(uri).pwrite(b"\x62" * 4096, 8192)
    warning(proc.stderr_text)
    out = run(["qemu-io", *qemu_opts(image, key_file), "-c", "read -P 0x62 8192 4096"]).stdout
    assert "read 4096/4096" in out and "fail" not in out.lower()
