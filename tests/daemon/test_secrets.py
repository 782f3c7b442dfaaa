"""Key sources, and where the passphrase must never show: argv, environment, logs, core dumps."""

import os
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.conftest import PASSPHRASE
from tests.daemon.conftest import daemon, descendants, failing, one_line_exit_2
from tests.tools import require, run


def assert_no_leak(proc):
    """serve and nbdkit: the passphrase on neither argv nor environment; no core dumps."""
    pids = descendants(proc.pid)
    assert len(pids) >= 2  # serve and nbdkit (through nothing else)
    for pid in pids:
        for leak in ("cmdline", "environ"):
            assert PASSPHRASE not in Path(f"/proc/{pid}/{leak}").read_bytes(), (pid, leak)
        limits = Path(f"/proc/{pid}/limits").read_text()
        assert any(line.startswith("Max core file size") and line.split()[4:6] == ["0", "0"]
                   for line in limits.splitlines()), limits


def serve_and_check(image, tmp_path, *source, env=None):
    with daemon(image, "--socket", tmp_path / "s.sock", *source, env=env) as (proc, uri):
        assert_no_leak(proc)
        assert run(["nbdinfo", "--size", uri]).stdout.strip() == str(8 << 20)
    assert PASSPHRASE.decode() not in proc.stderr_text


def test_key_file(image, key_file, tmp_path):
    require("nbdinfo")
    serve_and_check(image, tmp_path, "--key-file", key_file)


def test_systemd_credential(image, key_file, tmp_path):
    require("nbdinfo")
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    (credentials / "vol1").write_bytes(PASSPHRASE)
    serve_and_check(image, tmp_path, "--key-credential", "vol1", env={"CREDENTIALS_DIRECTORY": str(credentials)})


def test_kernel_keyring(image, tmp_path):
    require("nbdinfo", "keyctl")
    description = f"nbdcrypt-test:{uuid.uuid4()}"
    added = subprocess.run(["keyctl", "padd", "user", description, "@u"], input=PASSPHRASE, capture_output=True)
    if added.returncode != 0:
        pytest.skip(f"no kernel keyring here: {added.stderr.decode().strip()}")
    try:
        serve_and_check(image, tmp_path, "--key-keyring", description)
    finally:
        run(["keyctl", "unlink", added.stdout.decode().strip(), "@u"], check=False)


def test_missing_credential_and_key_are_one_line(image, tmp_path):
    one_line_exit_2(failing(image, "--key-credential", "vol1", env={"CREDENTIALS_DIRECTORY": ""}),
                    "CREDENTIALS_DIRECTORY")
    one_line_exit_2(failing(image, "--key-credential", "nope", env={"CREDENTIALS_DIRECTORY": str(tmp_path)}),
                    "key file not found")


def test_nbdkit_dying_unasked_is_one_line_exit_1_without_secrets(image, key_file, tmp_path):
    with daemon(image, "--key-file", key_file, "--socket", tmp_path / "s.sock") as (proc, _):
        nbdkit = descendants(proc.pid)[1]
        os.kill(nbdkit, signal.SIGKILL)
        assert proc.wait(30) == 1
    assert proc.stderr_text.strip().splitlines() == ["nbdcrypt: nbdkit exited unexpectedly (killed by SIGKILL)"]
    assert not (tmp_path / "s.sock").exists()
