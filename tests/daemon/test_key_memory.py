"""Key material in the memory of serve, nbdkit and crypt worker processes: locked in RAM
(VmLck in /proc/PID/status), and no copies left behind (a scan of /proc/PID/mem)."""

import os
import re
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import _await_line
from tests.daemon.conftest import daemon, descendants
from tests.tools import nbdcrypt_cmd, require, run, write_key

# What docs/security.md promises: nbdkit holds the master key at most twice (the numpy
# engine's cipher copy, and the one kept to start worker processes), a worker process at
# most once (the native kernel keeps none: only OpenSSL's key schedules), serve not at all.
NBDKIT_KEY_COPIES = 2
WORKER_KEY_COPIES = 1


def locked_kb(pid):
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmLck:\s+(\d+) kB", status, re.M).group(1))


def copies(pid, needle):
    """How often ``needle`` occurs in the readable memory of process ``pid``."""
    found = 0
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            start, end = (int(x, 16) for x in span.split("-"))
            if perms[0] != "r":
                continue
            try:
                mem.seek(start)
                found += mem.read(end - start).count(needle)
            except (OSError, OverflowError, ValueError):  # [vvar], [vsyscall]
                continue
    return found


@pytest.fixture
def known_key_image(tmp_path):
    """(image, key file, passphrase, master key): a LUKS1 aes-xts-plain64 image made by
    cryptsetup with a random master key and passphrase we know."""
    require("cryptsetup")
    passphrase, master_key = secrets.token_hex(16).encode(), secrets.token_bytes(64)
    key_file = write_key(tmp_path / "key", passphrase)
    (tmp_path / "mk").write_bytes(master_key)
    image = tmp_path / "img"
    image.write_bytes(bytes(8 << 20))
    run(["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks1", "--cipher", "aes-xts-plain64",
         "--key-size", "512", "--hash", "sha256", "--pbkdf-force-iterations", "1000",
         "--volume-key-file", str(tmp_path / "mk"), "--key-file", str(key_file), str(image)])
    return image, key_file, passphrase, master_key


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


def test_after_ready_serve_holds_no_secret_and_nbdkit_only_the_documented_copies(known_key_image, tmp_path):
    image, key_file, passphrase, master_key = known_key_image
    with daemon(image, "--key-file", key_file, "--socket", tmp_path / "s.sock",
                "--worker-type", "process", "--workers", "1") as (proc, _):
        serve, nbdkit, worker = descendants(proc.pid)
        assert (copies(serve, passphrase), copies(serve, master_key)) == (0, 0)
        assert copies(nbdkit, passphrase) == copies(worker, passphrase) == 0
        assert 0 < copies(nbdkit, master_key) <= NBDKIT_KEY_COPIES
        assert copies(worker, master_key) <= WORKER_KEY_COPIES
