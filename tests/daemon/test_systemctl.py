"""`systemctl start nbdcrypt@vol1` for real, following docs/operations.md step by step.

systemd runs as PID 1 of its own PID and mount namespace, on an overlay of this machine's
root with a tmpfs on top: `make install`, /etc/nbdcrypt, the image and systemd's own
housekeeping (tmpfiles empties /tmp at boot) all land in the tmpfs, never on the real
filesystem.  `container=` tells systemd not to touch the real machine's devices or sysctls.
"""

import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import random_file
from tests.tools import require, run

REPO = Path(__file__).resolve().parents[2]
PASSPHRASE = "correct horse battery staple 7"

# $1: a scratch directory; $2: the checkout, bind-mounted read-only at /src.
BOOT = r"""
set -e
mount -t tmpfs tmpfs "$1"
mkdir "$1/upper" "$1/work" "$1/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$1/upper,workdir=$1/work" "$1/root"
mount -t proc proc "$1/root/proc"
mount --rbind /sys "$1/root/sys"
mount --rbind /dev "$1/root/dev"
mount -t tmpfs tmpfs "$1/root/run"
mount -t tmpfs tmpfs "$1/root/tmp"
mkdir "$1/root/src"
mount --bind -o ro "$2" "$1/root/src"
# systemd makes / shared only outside containers; services see credentials through it.
mount --make-rshared "$1/root"
cd "$1/root"
export container=nbdcrypt-test
exec chroot . /lib/systemd/systemd --system --unit=basic.target
"""

# docs/operations.md, "One export under systemd", with the passphrase file made first.
SETUP = f"""
mkdir /root/nbdcrypt
tar -C /src --exclude=./.venv --exclude=./.git --exclude=./.state -cf - . | tar -C /root/nbdcrypt -xf -
make -C /root/nbdcrypt install >/dev/null
umask 077
printf '%s' '{PASSPHRASE}' > /root/vol1.passphrase
/opt/nbdcrypt/bin/nbdcrypt format --type luks2 --pbkdf pbkdf2 --iter-time 10 --key-file /root/vol1.passphrase \\
    /var/lib/nbdcrypt/vol1.img 16M
cat > /etc/nbdcrypt/vol1.toml <<'TOML'
image = "/var/lib/nbdcrypt/vol1.img"
key-credential = "vol1"
socket = "/run/nbdcrypt/vol1/nbd.sock"
control = "/run/nbdcrypt/vol1/control.sock"
TOML
systemd-creds encrypt --name=vol1 /root/vol1.passphrase /etc/nbdcrypt/vol1.cred 2>/dev/null
mkdir -p /etc/systemd/system/nbdcrypt@vol1.service.d
printf '[Service]\\nLoadCredentialEncrypted=vol1:/etc/nbdcrypt/vol1.cred\\n' \\
    > /etc/systemd/system/nbdcrypt@vol1.service.d/override.conf
systemctl daemon-reload
"""
EXPORT = "nbd+unix:///?socket=/run/nbdcrypt/vol1/nbd.sock"
ACTIVATED = "nbd+unix:///?socket=/run/nbdcrypt/vol1.sock"


class Machine:
    """systemd booted in namespaces; ``sh`` runs a script inside (on stdin, so nothing
    in it shows in a command line)."""

    def __init__(self, pid):
        self.pid = pid
        self.root = Path(f"/proc/{pid}/root")

    def sh(self, script, check=True):
        return run(["nsenter", "-t", str(self.pid), "-m", "-p", "-r", "-w", "sh", "-es"], input=script,
                   check=check)

    def _booted(self):
        deadline = time.monotonic() + 60
        while (state := self.sh("systemctl is-system-running --wait", check=False)).stdout.strip() == "":
            assert time.monotonic() < deadline, f"systemd did not answer: {state.stderr}"
            time.sleep(0.2)  # its private bus is not up yet
        assert state.stdout.strip() in ("running", "degraded"), f"systemd did not boot: {state.stdout}"
        return self

    def show(self, unit, prop):
        return self.sh(f"systemctl show -P {prop} {unit}").stdout.strip()


@contextmanager
def booted_systemd(scratch):
    require("unshare", "nsenter", "systemctl")
    if os.geteuid() != 0:
        pytest.skip("booting systemd in a namespace needs root")
    scratch.mkdir()
    proc = subprocess.Popen(["unshare", "--mount", "--pid", "--fork", "--propagation", "private",
                             "sh", "-c", BOOT, "boot", str(scratch), str(REPO)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        machine = Machine(_init_pid(proc))
        yield machine._booted()
    finally:
        for child in run(["pgrep", "-P", str(proc.pid)], check=False).stdout.split():
            os.kill(int(child), 9)  # PID 1 of the namespace: everything in it goes too
        proc.kill()
        proc.communicate()


def _init_pid(proc):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"could not boot systemd: {proc.stdout.read().decode()}")
        child = run(["pgrep", "-P", str(proc.pid)], check=False).stdout.split()
        if child and Path(f"/proc/{child[0]}/comm").read_text().strip() == "systemd":
            return int(child[0])
        time.sleep(0.1)
    pytest.fail("systemd did not start within 30 s")


def test_systemctl_start_serves_a_volume_keyed_by_a_credential(tmp_path):
    require("nbdcopy", "nbdinfo", "systemd-creds")
    data = random_file(tmp_path / "data", 16 << 20, seed=11)
    with booted_systemd(tmp_path / "machine") as machine:
        machine.sh(SETUP)
        (machine.root / "root/data").write_bytes(data.read_bytes())

        machine.sh("systemctl start nbdcrypt@vol1")  # Type=notify: returns once the export answers
        assert machine.show("nbdcrypt@vol1", "StatusText") == f"serving at {EXPORT}"
        machine.sh(f"nbdcopy /root/data '{EXPORT}'")
        _no_passphrase_in_processes(machine)
        machine.sh("systemctl restart nbdcrypt@vol1")
        machine.sh(f"nbdcopy '{EXPORT}' /root/back")
        assert (machine.root / "root/back").read_bytes() == data.read_bytes()
        machine.sh("systemctl stop nbdcrypt@vol1")
        assert machine.show("nbdcrypt@vol1", "Result") == "success"
        assert machine.show("nbdcrypt@vol1", "ExecMainStatus") == "0"

        # Socket activation: the first client starts the service.
        machine.sh("systemctl start nbdcrypt@vol1.socket")
        assert machine.show("nbdcrypt@vol1.service", "ActiveState") == "inactive"
        assert machine.sh(f"nbdinfo --size '{ACTIVATED}'").stdout.strip() == str(16 << 20)
        assert machine.show("nbdcrypt@vol1.service", "ActiveState") == "active"
        machine.sh(f"nbdcopy '{ACTIVATED}' /root/activated")
        assert (machine.root / "root/activated").read_bytes() == data.read_bytes()

        journal = machine.sh("journalctl --no-pager -o cat").stdout
        assert "nbdcrypt: serving /var/lib/nbdcrypt/vol1.img" in journal
        assert PASSPHRASE not in journal


def _no_passphrase_in_processes(machine):
    """Every process of the booted machine, nbdkit and serve among them."""
    cmdlines = {}
    for proc in (machine.root / "proc").glob("[0-9]*"):
        try:
            cmdlines[proc.name] = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited meanwhile
        assert PASSPHRASE.encode() not in cmdlines[proc.name] + environ, f"passphrase in process {proc.name}"
    assert any(b"nbdkit_plugin.py" in c for c in cmdlines.values()), "nbdkit not found"
    assert any(b"nbdcrypt\0serve" in c for c in cmdlines.values()), "nbdcrypt serve not found"
