"""Helpers for the daemon tests: run ``nbdcrypt serve`` with any arguments and environment."""

import os
import signal
import socket
import subprocess
from contextlib import contextmanager

import pytest

from tests.conftest import _await_line, qemu_luks_create
from tests.tools import nbdcrypt_cmd, require


@pytest.fixture
def image(tmp_path, key_file):
    return qemu_luks_create(tmp_path / "img", key_file, "8M")


@contextmanager
def daemon(*args, env=None, launcher=(), timeout=60, **popen):
    """``[launcher...] nbdcrypt serve ARGS``; yields ``(proc, uri)`` once it prints that it
    serves; SIGTERM at the end.  ``proc.stderr_text`` holds its stderr afterwards."""
    require("nbdkit")
    cmd = [*launcher, *nbdcrypt_cmd(), "serve", *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **(env or {})}, **popen)
    with proc:
        try:
            line = _await_line(proc, b"serving", timeout)
            assert line, f"nbdcrypt serve did not become ready: {proc.stderr.read().decode()}"
            yield proc, line.decode().rsplit(" at ", 1)[1].strip()
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=30)
            proc.stderr_text = stderr.decode()


def failing(*args, env=None, **popen):
    """``nbdcrypt serve ARGS`` expected to fail: the CompletedProcess."""
    return subprocess.run(nbdcrypt_cmd() + ["serve", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120, **popen)


def one_line_exit_2(result, pattern):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("nbdcrypt: ") and pattern in lines[0], result.stderr


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid):
    """``pid`` and every process below it."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid] + [p for child in children for p in descendants(int(child))]
