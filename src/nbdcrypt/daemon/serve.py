"""``nbdcrypt serve``: unlock once, then run nbdkit with the plugin until told to stop.

The master key travels to nbdkit through a pipe inherited as a file descriptor:
never argv, never the environment.  nbdkit runs in the foreground as our child
(``--exit-with-parent``); SIGTERM and SIGINT are forwarded so in-flight requests
finish, clients still connected after a grace period are dropped, and the image
is fsynced before serve reports a clean stop.
"""

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .. import plugin
from ..errors import InputError, NbdcryptError
from ..formats import open_header
from ..plugin.export import header_file
from ..plugin.queueing import Settings
from ..plugin.store import is_uri, open_store

PLUGIN_SCRIPT = Path(plugin.__file__).parent / "nbdkit_plugin.py"
READY_TIMEOUT = 30.0
STOP_GRACE = 5.0
NBD_FLAG_C_FIXED_NEWSTYLE = 1
NBD_OPT_ABORT = 2


def unlock(image, header_path, passphrase, readonly):
    """Check the image opens as it will be served (exists, writable unless ``readonly``)
    and return ``(header, master_key, payload_size)``."""
    store = open_store(image, readonly)
    try:
        with header_file(image, header_path, store) as f:
            header = open_header(f, header_path or image)
            return header, bytearray(header.unlock(passphrase, f)), header.payload_size(store.size())
    finally:
        store.close()


def default_socket(image):
    """A per-image socket path in the runtime directory (0700)."""
    base = os.environ.get("RUNTIME_DIRECTORY") or os.environ.get("XDG_RUNTIME_DIR")
    directory = Path(base, "nbdcrypt") if base else Path("/run/nbdcrypt" if os.geteuid() == 0 else f"/tmp/nbdcrypt-{os.getuid()}")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    name = re.sub(r"[^\w.-]", "_", Path(image).name)  # a URI's last part may hold anything
    return directory / f"{name}.sock"


def nbdkit_command(image, header, key_fd, listener, readonly, params):
    nbdkit = shutil.which("nbdkit")
    if nbdkit is None:
        raise NbdcryptError("nbdkit is not installed (apt-get install nbdkit nbdkit-plugin-python)")
    cmd = [nbdkit, "--foreground", "--exit-with-parent", *listener]
    if readonly:
        cmd.append("--readonly")
    cmd += ["python", str(PLUGIN_SCRIPT), f"image={image}", f"master-key-fd={key_fd}"]
    if header:
        cmd.append(f"header={header}")
    if readonly:
        cmd.append("readonly=true")
    cmd += [f"{name}={value}" for name, value in params.items()]
    return cmd


def plugin_environment():
    """nbdkit embeds the system Python: let it import what this interpreter imports."""
    env = dict(os.environ)
    paths = [p for p in sys.path if p and Path(p).is_dir()]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def serve(image, passphrase, header=None, socket_path=None, port=None, bind="127.0.0.1", readonly=False,
          settings=None, control=None, log=print):
    """Serve ``image`` until SIGTERM/SIGINT; return nbdkit's exit status.

    ``settings`` are queueing-layer settings (name -> value, checked here so a typo is
    a usage error, not a dead nbdkit); ``control`` is the control socket's path."""
    params = {name: str(value) for name, value in (settings or {}).items()}
    Settings().updated(params)
    if control:
        params["control"] = os.path.abspath(control)
    image = image if is_uri(image) else os.path.abspath(image)
    header = os.path.abspath(header) if header else None
    hdr, key, size = unlock(image, header, passphrase, readonly)
    if port is None:
        socket_path = Path(os.path.abspath(socket_path)) if socket_path else default_socket(image)
        if socket_path.exists():
            raise InputError(f"{socket_path}: socket already exists (another server running?)")
        listener, uri = ["--unix", str(socket_path)], f"nbd+unix:///?socket={socket_path}"
    else:
        listener, uri = ["--port", str(port), "--ipaddr", bind], f"nbd://{bind}:{port}/"

    child = _spawn_nbdkit(image, header, key, listener, readonly, params)
    try:
        with _forwarded_signals(child) as stopping:
            if _wait_ready(child, socket_path, bind, port):
                log(f"nbdcrypt: serving {image} ({hdr.info()['format']}, {hdr.cipher_spec}, "
                    f"{size} bytes) at {uri}", flush=True)
            status = _supervise(child, stopping)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if socket_path is not None:
            Path(socket_path).unlink(missing_ok=True)
    if not readonly and not is_uri(image):
        _sync(image)
    return status


def _spawn_nbdkit(image, header, key, listener, readonly, params):
    """Start nbdkit with the master key in a pipe it inherits; wipe our copy."""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, key)
    finally:
        os.close(write_end)
        key[:] = bytes(len(key))
    cmd = nbdkit_command(image, header, read_end, listener, readonly, params)
    old_umask = os.umask(0o077)  # the socket is for its owner only
    try:
        return subprocess.Popen(cmd, pass_fds=(read_end,), env=plugin_environment())
    finally:
        os.umask(old_umask)
        os.close(read_end)


@contextmanager
def _forwarded_signals(child):
    """Forward SIGTERM/SIGINT/SIGHUP to nbdkit; yield a list that records when the first came."""
    stopping = []

    def forward(signum, frame):
        stopping.append(time.monotonic())
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        yield stopping
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _supervise(child, stopping):
    """Wait for nbdkit to exit.  Told to stop, nbdkit finishes in-flight requests but
    then waits for idle clients to hang up; after STOP_GRACE seconds we stop waiting."""
    while True:
        try:
            return child.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            if stopping and time.monotonic() - stopping[0] > STOP_GRACE:
                child.kill()
                child.wait()
                return 0


def _sync(image):
    """Make everything nbdkit wrote durable before we report a clean stop."""
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _wait_ready(child, socket_path, bind, port):
    """Wait until the listener answers NBD; False if nbdkit died first."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if child.poll() is not None:
            return False
        try:
            if socket_path is not None:
                sock = socket.socket(socket.AF_UNIX)
                sock.connect(str(socket_path))
            else:
                sock = socket.create_connection((bind, port))
            with sock:
                sock.settimeout(5)
                if _nbd_greeting_then_abort(sock):
                    return True
        except OSError:
            pass
        time.sleep(0.02)
    child.terminate()
    raise NbdcryptError(f"nbdkit did not start answering within {READY_TIMEOUT:.0f} s")


def _nbd_greeting_then_abort(sock):
    """Read the fixed-newstyle greeting, then leave politely with NBD_OPT_ABORT."""
    greeting = b""
    while len(greeting) < 18:
        chunk = sock.recv(18 - len(greeting))
        if not chunk:
            return False
        greeting += chunk
    if greeting[:16] != b"NBDMAGICIHAVEOPT":
        return False
    sock.sendall(struct.pack(">I", NBD_FLAG_C_FIXED_NEWSTYLE) + b"IHAVEOPT" + struct.pack(">II", NBD_OPT_ABORT, 0))
    return True
