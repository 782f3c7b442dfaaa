"""``nbdcrypt serve``: unlock once, then supervise nbdkit with the plugin until told to stop.

The master key travels to nbdkit through a pipe inherited as a file descriptor:
never argv, never the environment.  nbdkit is our child (``--exit-with-parent``),
supervised by one trio nursery: a readiness probe (an NBD greeting, then
NBD_OPT_ABORT) that reports "serving" and READY=1, a signal receiver that turns
SIGTERM/SIGINT/SIGHUP into a graceful stop, and the wait for nbdkit's exit.  On a
stop nbdkit finishes in-flight requests but would wait for idle clients forever:
after STOP_GRACE seconds (or on a second stop signal) they are dropped.  The image is fsynced before a clean
stop is reported.  If nbdkit dies unasked, serve exits 1 with the reason.
"""

import argparse
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from .. import plugin
from ..crypto import native
from ..crypto.secrets import Secret
from ..datapath.settings import SETTINGS, Settings
from ..errors import InputError, NbdcryptError
from ..formats.image import Image, Passphrase
from ..formats.qcow2 import Qcow2Header
from ..plugin.control_server import remove_stale_socket
from ..plugin.export import header_file, unlock_all
from ..plugin.metrics import absolute_address, parse_address
from ..storage.store import is_uri, open_store
from . import config, keys
from .headers import read_header
from .listener import Listener, choose_listener
from .notify import Notifier

PLUGIN_SCRIPT = Path(plugin.__file__).parent / "nbdkit_plugin.py"
READY_TIMEOUT = 30.0
STOP_GRACE = 5.0
NBD_FLAG_C_FIXED_NEWSTYLE = 1
NBD_OPT_ABORT = 2
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def main(args: argparse.Namespace) -> int:
    """``nbdcrypt serve`` from parsed arguments, completed by ``--config``; the exit status."""
    keys.protect_process()
    notify = Notifier.from_environment()
    if args.config:
        config.merge(args, config.load(args.config, args.config_keys))
    if not args.image:
        raise InputError("no IMAGE; usage: nbdcrypt serve IMAGE [OPTIONS] | nbdcrypt serve --config FILE")
    settings = queueing_settings(args)
    image = args.image if is_uri(args.image) else os.path.abspath(args.image)
    listener = choose_listener(args, image)  # refuse a bad listener before asking for a passphrase
    _clear_socket_paths(args)
    notify(f"STATUS=unlocking {image}")
    passphrase = keys.read_passphrase(args.key_file, args.passphrase_fd, prompt=f"Enter passphrase for {image}: ",
                                      credential=args.key_credential, keyring=args.key_keyring)
    backing_passphrases = []
    try:
        for path in args.backing_key_file or ():
            backing_passphrases.append(keys.read_passphrase(path))
        return serve(image, passphrase, listener, header=args.header, readonly=args.readonly,
                     settings=settings, control=args.control, metrics=args.metrics, notify=notify,
                     backing_passphrases=backing_passphrases, key_slot=args.key_slot,
                     backing_dirs=[os.path.abspath(d) for d in args.backing_dir or ()],
                     insecure_legacy_aes=args.insecure_legacy_aes)
    finally:
        for secret in [passphrase, *backing_passphrases]:
            keys.wipe(secret)


def _clear_socket_paths(args: argparse.Namespace) -> None:
    """Refuse a ``--control`` or ``--metrics`` socket path that something else holds now,
    before a passphrase is asked for; the plugin binds them much later."""
    paths = [args.control] if args.control else []
    if args.metrics and parse_address(args.metrics)[0] == "unix":
        paths.append(args.metrics)
    for path in paths:
        remove_stale_socket(os.path.abspath(path))


def queueing_settings(args: argparse.Namespace) -> dict[str, str]:
    """The queueing layer's settings given as options (checked, so a typo is a usage error)."""
    given = {s.name: getattr(args, s.name) for s in SETTINGS}
    settings = {name: "on" if value is True else str(value)
                for name, value in given.items() if value is not None and value is not False}
    Settings().updated(settings)
    return settings


def unlock(image: str, header_path: str | None, passphrase: Passphrase, readonly: bool,
           backing_passphrases: Sequence[Passphrase] = (), key_slot: int | None = None,
           backing_dirs: Sequence[str] = (), insecure_legacy_aes: bool = False) -> tuple[Image, Secret, int]:
    """Check the image opens as it will be served (exists, writable unless ``readonly``,
    legacy AES only with ``insecure_legacy_aes`` or ``readonly``) and return
    ``(header, master_key, payload_size)``; the key (followed by those of
    encrypted qcow2 backing files, which may lie in ``backing_dirs``:
    :func:`~nbdcrypt.plugin.export.unlock_all`) is locked in RAM."""
    store = open_store(image, readonly)
    try:
        with header_file(image, header_path, store) as f:
            header = read_header(f, header_path or image)
            size = header.payload_size(store.size())  # a header that does not fit: before any KDF runs
            warning = legacy_aes_warning(header, image, readonly, insecure_legacy_aes)
            key = unlock_all(header, f, image, passphrase, backing_passphrases, key_slot, backing_dirs)
            if warning:
                print(f"nbdcrypt: warning: {warning}", file=sys.stderr, flush=True)
            return header, key, size
    finally:
        store.close()


def legacy_aes_warning(header: Image, image: str, readonly: bool, insecure_legacy_aes: bool) -> str | None:
    """What to warn of when ``image`` is legacy qcow2 AES (None otherwise), which takes any
    passphrase as its key: served read-write only when told to."""
    if not isinstance(header, Qcow2Header) or header.encryption != "aes":
        return None
    if not readonly and not insecure_legacy_aes:
        raise InputError(f"{image}: legacy qcow2 AES has no key check, so a mistyped passphrase would write "
                         f"under the wrong key: serve it --readonly, or give --insecure-legacy-aes")
    return (f"{image}: legacy qcow2 AES has no key check: a wrong passphrase reads garbage"
            f"{'' if readonly else ' and writes under the wrong key'}")


def nbdkit_command(image: str, header: str | None, key_fd: int, listener: Listener, readonly: bool,
                   params: Mapping[str, str], backing_dirs: Sequence[str] = ()) -> list[str]:
    nbdkit = shutil.which("nbdkit")
    if nbdkit is None:
        raise NbdcryptError("nbdkit is not installed (apt-get install nbdkit nbdkit-plugin-python)")
    cmd = [*listener.launcher, nbdkit, "--foreground", "--exit-with-parent", *listener.nbdkit_args]
    if readonly:
        cmd.append("--readonly")
    cmd += ["python", str(PLUGIN_SCRIPT), f"image={image}", f"master-key-fd={key_fd}"]
    if header:
        cmd.append(f"header={header}")
    if readonly:
        cmd.append("readonly=true")
    cmd += [f"{name}={value}" for name, value in params.items()]
    cmd += [f"backing-dir={d}" for d in backing_dirs]
    return cmd


def plugin_environment(listener: Listener) -> dict[str, str]:
    """nbdkit embeds the system Python: let it import what this interpreter imports."""
    env = dict(os.environ, **listener.environment)
    paths = [p for p in sys.path if p and Path(p).is_dir()]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def serve(image: str, passphrase: bytearray, listener: Listener, header: str | None = None, readonly: bool = False,
          settings: Mapping[str, str] | None = None, control: str | None = None, notify: Notifier | None = None,
          log: Callable[..., object] = print, backing_passphrases: Sequence[bytearray] = (), metrics: str | None = None,
          key_slot: int | None = None, backing_dirs: Sequence[str] = (), insecure_legacy_aes: bool = False) -> int:
    """Serve ``image`` until SIGTERM/SIGINT/SIGHUP; return nbdkit's exit status.

    ``listener`` comes from :func:`choose_listener`; ``settings`` are queueing-layer
    settings; ``control`` is the control socket's path; ``backing_passphrases`` open
    encrypted qcow2 backing files, nearest first; ``metrics`` is where to serve Prometheus metrics;
    ``key_slot`` is the only LUKS keyslot to try; qcow2 backing files may lie in ``backing_dirs``;
    ``insecure_legacy_aes`` lets a legacy AES qcow2 image be served read-write."""
    params = dict(settings or {})
    if control:
        params["control"] = os.path.abspath(control)
    if metrics:
        params["metrics"] = absolute_address(metrics)
    header = os.path.abspath(header) if header else None
    try:
        hdr, key, size = unlock(image, header, passphrase, readonly, backing_passphrases, key_slot, backing_dirs,
                                insecure_legacy_aes)
    finally:
        for secret in [passphrase, *backing_passphrases]:  # done with: nbdkit gets the key
            keys.wipe(secret)
    engine = f" in the {native.engine_for(hdr.cipher_spec)} engine" if hdr.cipher_spec else ""
    banner = (f"nbdcrypt: serving {image} ({hdr.info()['format']}, {hdr.cipher_spec}{engine}, {size} bytes) "
              f"at {listener.uri}")
    try:
        key_fd = _key_pipe(key)
        command = nbdkit_command(image, header, key_fd, listener, readonly, params, backing_dirs)
        status = trio.run(_supervise, command, key_fd, listener, _Reporter(banner, notify or Notifier(), log))
    finally:
        listener.close()
    if not readonly and not is_uri(image):
        _sync(image)
    return status


@dataclass
class _Reporter:
    """Where serve's state goes: the banner on stdout, sd_notify, one-line logs on stderr."""

    banner: str
    notify: Notifier
    log: Callable[..., object]
    stopping: bool = False
    failure: str | None = None

    def ready(self, listener: Listener) -> None:
        self.log(self.banner, flush=True)
        self.notify("READY=1", f"STATUS=serving at {listener.uri}")

    def stop(self, signum: int) -> None:
        self.stopping = True
        self.notify("STOPPING=1", f"STATUS=stopping on {signal.Signals(signum).name}")
        print(f"nbdcrypt: {signal.Signals(signum).name}: stopping nbdkit", file=sys.stderr, flush=True)

    def hurry(self, signum: int) -> None:
        print(f"nbdcrypt: second {signal.Signals(signum).name}: dropping clients now", file=sys.stderr, flush=True)


async def _supervise(cmd: list[str], key_fd: int, listener: Listener, report: _Reporter) -> int:
    """Run nbdkit until it exits; its exit status, or NbdcryptError if it died unasked."""
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        process = _spawn(cmd, key_fd, listener)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stop_on_signal, signals, process, report)
                nursery.start_soon(_announce_when_ready, listener, report, nursery.cancel_scope)
                await _wait(process)
                nursery.cancel_scope.cancel()
        finally:
            if process.returncode is None:
                process.kill()
                process.wait()
    cause = _exit_cause(process.returncode)
    if report.failure:
        raise NbdcryptError(report.failure)
    if not report.stopping:
        raise NbdcryptError(f"nbdkit exited unexpectedly ({cause})")
    print(f"nbdcrypt: nbdkit stopped ({cause})", file=sys.stderr, flush=True)
    return 0 if process.returncode == -signal.SIGKILL else process.returncode


def _key_pipe(key: bytearray) -> int:
    """A pipe holding the master key for nbdkit to read; our copy of the key is wiped."""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, key)
    finally:
        os.close(write_end)
        keys.wipe(key)
    return read_end


def _spawn(cmd: list[str], key_fd: int, listener: Listener) -> "subprocess.Popen[bytes]":
    """Start nbdkit with the key pipe and the inherited listening sockets (under their
    own numbers); umask 077 keeps the socket nbdkit creates to its owner.

    Spawned from this (the main) thread on purpose: --exit-with-parent is the kernel's
    parent-death signal, which fires when the *thread* that forked the child exits, and
    trio.lowlevel.open_process forks from a worker thread that idles out in seconds."""
    try:
        return subprocess.Popen(cmd, pass_fds=(*listener.fds, key_fd), env=plugin_environment(listener),
                                umask=0o077)
    finally:
        os.close(key_fd)


async def _wait(process: "subprocess.Popen[bytes]") -> int:
    """Wait for the child without a thread: its pidfd turns readable when it exits."""
    pidfd = os.pidfd_open(process.pid)
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)
    return process.wait()


async def _stop_on_signal(signals: AsyncIterator[int], process: "subprocess.Popen[bytes]",
                          report: _Reporter) -> None:
    """On the first stop signal, ask nbdkit to stop; drop idle clients after STOP_GRACE,
    or at once on a second stop signal (an impatient operator's second Ctrl-C)."""
    async for signum in signals:
        report.stop(signum)
        break
    process.send_signal(signal.SIGTERM)
    with trio.move_on_after(STOP_GRACE):
        async for signum in signals:
            report.hurry(signum)
            break
    process.kill()


async def _announce_when_ready(listener: Listener, report: _Reporter, scope: trio.CancelScope) -> None:
    """Report readiness once the listener answers NBD; give up after READY_TIMEOUT."""
    with trio.move_on_after(READY_TIMEOUT) as waiting:
        while not await _answers_nbd(listener):
            await trio.sleep(0.02)
    if waiting.cancelled_caught:
        report.failure = f"nbdkit did not start answering within {READY_TIMEOUT:.0f} s"
        scope.cancel()
        return
    listener.grant_access()
    report.ready(listener)


async def _answers_nbd(listener: Listener) -> bool:
    """Whether the listener sends the fixed-newstyle greeting; leave politely with NBD_OPT_ABORT."""
    sock = trio.socket.socket(listener.family, socket.SOCK_STREAM)
    with sock:
        try:
            with trio.fail_after(5):
                await sock.connect(listener.address)
                greeting = b""
                while len(greeting) < 18:
                    chunk = await sock.recv(18 - len(greeting))
                    if not chunk:
                        return False
                    greeting += chunk
                if greeting[:16] != b"NBDMAGICIHAVEOPT":
                    return False
                await sock.send(struct.pack(">I", NBD_FLAG_C_FIXED_NEWSTYLE) + b"IHAVEOPT" +
                                struct.pack(">II", NBD_OPT_ABORT, 0))
                return True
        except (OSError, trio.TooSlowError):
            return False


def _exit_cause(status: int) -> str:
    if status < 0:
        return f"killed by {signal.Signals(-status).name}"
    return f"exit status {status}"


def _sync(image: str) -> None:
    """Make everything nbdkit wrote durable before we report a clean stop."""
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
