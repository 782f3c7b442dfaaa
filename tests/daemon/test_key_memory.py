"""Key material in the memory of serve, nbdkit and crypt worker processes: locked in RAM
(VmLck in /proc/PID/status)."""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import _await_line
from tests.daemon.conftest import daemon, descendants
from tests.tools import nbdcrypt_cmd, require, run


def locked_kb(pid):
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmLck:\s+(\d+) kB", status, re.M).group(1))


def test_passphrase_and_master_key_are_locked_in_ram(image, tmp_path):
    """serve locks the passphrase while it reads it; nbdkit and its worker process the key."""
    require("nbdkit")
    read_end, write_end = os.pipe()
    cmd = [*nbdcrypt_cmd(), "serve", str(image), "--passphrase-fd", str(read_end),
           "--socket", str(tmp_path / "s.sock"), "--worker-type", "process", "--workers", "1"]
    with subprocess.Popen(cmd, pass_fds=(read_end,), stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        os.close(read_end)
        try:
            os.write(write_end, b"correct horse")  # half a line: serve waits, holding it
            deadline = time.monotonic() + 30
            while locked_kb(proc.pid) == 0 and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.05)
            assert locked_kb(proc.pid) > 0
            os.write(write_end, b" battery staple\n")
            os.close(write_end)
            assert _await_line(proc, b"serving", 60), proc.stderr.read().decode()
            nbdkit, *workers = descendants(proc.pid)[1:]
            assert workers and all(locked_kb(pid) > 0 for pid in [nbdkit, *workers])
        finally:
            proc.send_signal(signal.SIGTERM)
            stderr = proc.communicate(timeout=30)[1].decode()
    assert "cannot lock" not in stderr


def test_a_memlock_limit_is_one_line_and_serving_goes_on(image, key_file, tmp_path):
    """Without CAP_IPC_LOCK and with RLIMIT_MEMLOCK 0 nothing can be locked: each process says
    so once, without the key, and serves anyway."""
    require("nbdinfo", "prlimit", "setpriv")
    if os.geteuid() != 0:
        pytest.skip("dropping CAP_IPC_LOCK for the test needs root")
    launcher = ["prlimit", "--memlock=0:0", "setpriv", "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock"]
    with daemon(image, "--key-file", key_file, "--socket", tmp_path / "s.sock", launcher=launcher) as (proc, uri):
        assert run(["nbdinfo", "--size", uri]).stdout.strip() == str(8 << 20)
    warnings = [line for line in proc.stderr_text.splitlines() if "cannot lock key material" in line]
    assert len(warnings) == 2, proc.stderr_text  # serve's and nbdkit's
    assert all("RLIMIT_MEMLOCK is 0 bytes" in line for line in warnings)
