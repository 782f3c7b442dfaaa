"""Helpers shared by the test suite: finding real tools, running them, making key files."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

VENV_BIN = Path(__file__).resolve().parent.parent / ".venv" / "bin"


def require(*tools):
    """Skip the calling test, with the reason printed, unless every tool is on PATH."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (not installed)")


def run(cmd, check=True, **kwargs):
    """Run a command, capturing text output; on failure show its stderr in the assertion."""
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd!r} exited {result.returncode}:\n{result.stderr}{result.stdout}")
    return result


def nbdcrypt_cmd():
    """The installed console script, so tests start nbdcrypt exactly as a user would."""
    exe = VENV_BIN / "nbdcrypt"
    return [str(exe)] if exe.exists() else ["nbdcrypt"]


def write_key(path, passphrase=b"correct horse battery staple"):
    """A passphrase file without a trailing newline, readable by qemu, cryptsetup and nbdcrypt."""
    Path(path).write_bytes(passphrase)
    os.chmod(path, 0o600)
    return Path(path)
