"""The servers under test, as one table, and what they serve.

Every target is an argv template whose ``{placeholders}`` name the images made by
:func:`make_images`, the key file and the target's own socket.  Adding a queueing mode
of ``nbdcrypt serve`` is one more line in :data:`TARGETS`.
"""

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from statistics import median

IMAGES = ("raw", "luks1", "qcow2")
PASSPHRASE = b"nbdcrypt benchmark"  # no trailing newline: every tool reads the whole file
SECRET = ["--object", "secret,id=s0,file={key}"]
NBDCRYPT_SERVE = ["{nbdcrypt}", "serve", "--key-file", "{key}", "--socket", "{sock}"]
# qemu-nbd: default cache (writeback, the host page cache, as nbdkit and nbdcrypt use);
# -t keeps it up between clients; -e 8 admits more than one client at a time.
QEMU_NBD = ["qemu-nbd", *SECRET, "-k", "{sock}", "-t", "-e", "8", "--image-opts"]


@dataclass(frozen=True)
class Target:
    name: str
    label: str
    argv: list
    subject: bool = False  # nbdcrypt itself, compared against every other target
    colour: str = "tab:gray"  # the same in every chart, whichever targets ran
    default: bool = True  # run unless --targets names others

    def command(self, paths):
        return [arg.format(**paths) for arg in self.argv]

    def skip_reason(self, paths):
        tool = self.argv[0].format(**paths)
        return f"{tool} is not installed" if shutil.which(tool) is None else None


def nbdcrypt(name, label, colour, image, *flags, default=True):
    """``nbdcrypt serve`` on ``image`` with queueing ``flags``."""
    return Target(name, label, [*NBDCRYPT_SERVE, image, *flags], subject=True, colour=colour, default=default)


TARGETS = (
    # nbdcrypt, one line per queueing mode of `serve`.
    nbdcrypt("nbdcrypt", "nbdcrypt (default queueing)", "tab:blue", "{luks1}"),
    nbdcrypt("nbdcrypt-inline", "nbdcrypt inline", "tab:cyan", "{luks1}",
             "--perf-no_read_workqueue", "--perf-no_write_workqueue"),
    # Opt-in: crypt workers as processes instead of threads (docs/queueing.md).
    nbdcrypt("nbdcrypt-processes", "nbdcrypt worker processes", "tab:purple", "{luks1}", "--worker-type", "process",
             default=False),
    nbdcrypt("nbdcrypt-qcow2", "nbdcrypt qcow2+LUKS", "tab:green", "{qcow2}"),
    Target("plaintext", "nbdkit file (plaintext)", ["nbdkit", "-f", "-U", "{sock}", "file", "{raw}"],
           colour="dimgray"),
    # The reference: what nbdkit's Python plugin costs with no crypto at all.
    Target("python-floor", "nbdkit python passthrough", ["nbdkit", "-f", "-U", "{sock}", "python",
           str(Path(__file__).with_name("passthrough_plugin.py")), "file={raw}"], colour="silver"),
    Target("nbdkit-luks", "nbdkit luks filter",
           ["nbdkit", "-f", "-U", "{sock}", "--filter=luks", "file", "{luks1}", "passphrase=+{key}"], colour="tab:red"),
    Target("qemu-nbd-luks", "qemu-nbd LUKS1", [*QEMU_NBD, "driver=luks,key-secret=s0,file.filename={luks1}"],
           colour="tab:orange"),
    Target("qemu-nbd-qcow2", "qemu-nbd qcow2+LUKS",
           [*QEMU_NBD, "driver=qcow2,encrypt.key-secret=s0,file.filename={qcow2}"], colour="tab:brown"),
)


def make_images(workdir, size, fill, iter_time):
    """The key and the three images, each with its first ``fill`` bytes holding data.

    LUKS1 and qcow2 are made by qemu-img (aes-xts-plain64, 512-bit key, 512-byte sectors)
    so no target reads an image of its own making.  Returns the template placeholders.
    """
    paths = {"key": workdir / "key", "raw": workdir / "plain.raw", "luks1": workdir / "luks1.img",
             "qcow2": workdir / "luks.qcow2", "nbdcrypt": Path(sys.executable).with_name("nbdcrypt")}
    paths["key"].write_bytes(PASSPHRASE)
    secret = [a.format(**paths) for a in SECRET]
    _write_random(paths["raw"], 0, fill, size)
    _qemu_img_create(["-f", "luks", *secret, "-o", f"key-secret=s0,iter-time={iter_time}", paths["luks1"]], size)
    # Random ciphertext decrypts to random plaintext: the reads decrypt real data.
    _write_random(paths["luks1"], _luks1_payload_offset(paths["luks1"]), fill)
    _qemu_img_create(["-f", "qcow2", *secret, "-o",
                      f"encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time={iter_time}", paths["qcow2"]], size)
    # Allocate (and encrypt) the working set so no write in the benchmark allocates a cluster.
    opts = f"driver=qcow2,encrypt.key-secret=s0,file.filename={paths['qcow2']}"
    subprocess.run(["qemu-io", *secret, "--image-opts", opts, "-c", f"write -P 0xa5 0 {fill}"],
                   check=True, capture_output=True)
    return {k: str(v) for k, v in paths.items()}


def _write_random(path, offset, length, size=None):
    with open(path, "r+b" if Path(path).exists() else "wb") as f:
        if size is not None:
            f.truncate(size)
        f.seek(offset)
        for start in range(0, length, 16 << 20):
            f.write(os.urandom(min(16 << 20, length - start)))


def _luks1_payload_offset(path):
    with open(path, "rb") as f:
        header = f.read(108)
    return struct.unpack(">I", header[104:108])[0] * 512  # payload-offset, in sectors


def _qemu_img_create(args, size):
    # QEMU's PBKDF2 calibration now and then fails with "Unable to get accurate CPU usage"
    # (it times too few iterations to read as nonzero CPU time); another try succeeds.
    cmd = ["qemu-img", "create", "-q", *map(str, args), str(size)]
    for _ in range(30):
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode == 0:
            return
    raise RuntimeError(f"{' '.join(cmd)}: {result.stderr.strip()}")


@contextmanager
def serving(target, paths, workdir, timeout=60):
    """Run ``target`` until the block ends; yield (URI, process).

    The server gets its own session, so a Ctrl-C reaches only us and we stop the whole
    group (nbdcrypt's nbdkit child included) ourselves: SIGTERM, then SIGKILL.
    """
    sock = workdir / f"{target.name}.sock"
    command = target.command({**_own_images(target, paths, workdir), "sock": sock})
    log = workdir / f"{target.name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _await_socket(proc, sock, timeout, log)
        yield f"nbd+unix:///?socket={sock}", proc
    finally:
        _stop_group(proc)


def _own_images(target, paths, workdir):
    """A copy of each image the target serves: servers lock their images (as QEMU does),
    and this way every target starts from the same bytes whatever the others wrote."""
    own = dict(paths)
    for key in IMAGES:
        if any(f"{{{key}}}" in arg for arg in target.argv):
            own[key] = str(workdir / f"{target.name}.{Path(paths[key]).name}")
            subprocess.run(["cp", "--sparse=always", paths[key], own[key]], check=True)
    return own


def _await_socket(proc, sock, timeout, log):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited {proc.returncode}: {log.read_text().strip()}")
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(sock))
                return
            except OSError:
                time.sleep(0.05)
    raise RuntimeError(f"{proc.args[0]} did not listen on {sock} within {timeout} s")


def _stop_group(proc, grace=30):
    """SIGTERM the server's process group; SIGKILL whatever outlives the grace period."""
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(proc, signal.SIGKILL)  # a hung leader, or children that outlived it
    proc.wait()


def _signal_group(proc, sig):
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def cpu_seconds(pid):
    """User and system CPU seconds of a server so far: the process, all its threads and every
    descendant (nbdcrypt serve's nbdkit child and worker processes), exited ones included
    through their parent's cutime and cstime."""
    ticks = [0, 0]
    for member in _process_tree(pid):
        stat = _read(f"/proc/{member}/stat")
        if stat:  # else exited since listed: its parent counts it once it has reaped it
            fields = stat.rsplit(")", 1)[1].split()
            ticks[0] += int(fields[11]) + int(fields[13])  # utime + cutime
            ticks[1] += int(fields[12]) + int(fields[14])  # stime + cstime
    return tuple(t / os.sysconf("SC_CLK_TCK") for t in ticks)


def _process_tree(pid):
    """``pid`` and its live descendants; each thread lists the children it forked."""
    tree = [pid]
    for member in tree:  # grows as it goes: breadth first
        for children in Path(f"/proc/{member}/task").glob("*/children"):
            tree += map(int, _read(children).split())
    return tree


def _read(path):
    """A /proc file's text, or "" once its process or thread has gone."""
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def connect_ms(uri, tries=5, block=4096):
    """Median milliseconds for a new client to connect and read one block."""
    import nbd  # python3-libnbd (a system package, seen through --system-site-packages)

    times = []
    for _ in range(tries):
        start = time.perf_counter()
        h = nbd.NBD()
        h.connect_uri(uri)
        h.pread(block, 0)
        times.append((time.perf_counter() - start) * 1e3)
        h.shutdown()
    return median(times)
