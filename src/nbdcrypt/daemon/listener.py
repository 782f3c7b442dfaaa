"""Where nbdkit listens: a Unix socket (the default, mode 0600), TCP (only with TLS unless
told otherwise), or the sockets systemd passed us (socket activation, sd_listen_fds(3)).
"""

import argparse
import grp
import os
import re
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, NbdcryptError

SD_LISTEN_FDS_START = 3
DEFAULT_BIND = "127.0.0.1"
# nbdkit takes inherited sockets only if LISTEN_PID is its own pid: set it in a shell that then
# becomes nbdkit.
Address = str | tuple[str, int] | tuple[str, int, int, int]  # AF_UNIX, AF_INET, AF_INET6
SET_LISTEN_PID = ["/bin/sh", "-c", 'LISTEN_PID=$$ exec "$0" "$@"']


@dataclass
class Listener:
    family: int
    address: Address  # what a client connects to: a path or (host, port)
    nbdkit_args: tuple[str, ...] = ()
    fds: tuple[int, ...] = ()  # inherited listening sockets, handed to nbdkit under the same numbers
    socket_path: Path | None = None  # a socket nbdkit creates: ours to chmod and remove
    gid: int | None = None
    tls: bool = False

    @property
    def uri(self) -> str:
        scheme = "nbds" if self.tls else "nbd"
        if self.family == socket.AF_UNIX:
            return f"{scheme}+unix:///?socket={self.address}"
        host, port = self.address[0], self.address[1]
        return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}/"

    @property
    def networked(self) -> bool:
        """Whether any of the sockets is not a Unix socket: then TLS is needed unless --insecure-tcp."""
        families = [self.family, *(_socket_name(fd)[0] for fd in self.fds)]
        return any(family != socket.AF_UNIX for family in families)

    @property
    def launcher(self) -> list[str]:
        return SET_LISTEN_PID if self.fds else []

    @property
    def environment(self) -> dict[str, str]:
        return {"LISTEN_FDS": str(len(self.fds))} if self.fds else {}

    def grant_access(self) -> None:
        """Once nbdkit made the socket (under umask 077): 0600, or 0660 for ``--socket-group``;
        never through a symlink put in its place (chmod then fails rather than follow one)."""
        if self.socket_path is None:
            return
        if not stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
            raise NbdcryptError(f"{self.socket_path}: not nbdkit's socket any more; someone replaced it")
        if self.gid is not None:
            os.chown(self.socket_path, -1, self.gid, follow_symlinks=False)
        os.chmod(self.socket_path, 0o600 if self.gid is None else 0o660, follow_symlinks=False)

    def close(self) -> None:
        if self.socket_path is not None:
            self.socket_path.unlink(missing_ok=True)
        for fd in self.fds:
            os.close(fd)


def choose_listener(args: argparse.Namespace, image: str) -> Listener:
    """The listener the options (or systemd) ask for; InputError for TCP without TLS
    (unless ``--insecure-tcp``) and for a socket path already in use."""
    inherited = _inherited_sockets()
    if inherited:
        listener = _inherited(inherited)
    elif args.port is not None:
        bind = args.bind or DEFAULT_BIND
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        listener = Listener(family, (bind, args.port), ("--port", str(args.port), "--ipaddr", bind))
    else:
        listener = _unix(Path(os.path.abspath(args.socket)) if args.socket else default_socket(image),
                         args.socket_group)
    tls = _tls_args(args)
    if listener.networked and not tls and not args.insecure_tcp:
        raise InputError("TCP without TLS sends the plaintext to the network: give --tls-psk FILE or "
                         "--tls-certificates DIR (or --insecure-tcp)")
    listener.nbdkit_args += tls
    listener.tls = bool(tls)
    return listener


def default_socket(image: str) -> Path:
    """A per-image socket path in a 0700 runtime directory: systemd's RuntimeDirectory=, or ours."""
    if "RUNTIME_DIRECTORY" in os.environ:  # made by systemd with the unit's owner and mode
        directory = Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0])
    elif "XDG_RUNTIME_DIR" in os.environ:
        directory = _private_directory(Path(os.environ["XDG_RUNTIME_DIR"], "nbdcrypt"))
    else:
        directory = _private_directory(Path("/run/nbdcrypt") if os.geteuid() == 0
                                       else Path(f"/tmp/nbdcrypt-{os.getuid()}"))
    name = re.sub(r"[^\w.-]", "_", Path(image).name)  # a URI's last part may hold anything
    return directory / f"{name}.sock"


def _private_directory(path: Path) -> Path:
    """``path``, made mode 0700 unless it exists; InputError unless it is then a directory
    (not a symlink) of our own with mode 0700: whoever else made it could replace our socket."""
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) != 0o700:
        raise InputError(f"{path}: not a directory of ours with mode 0700 (made by another user?); "
                         "remove it or give --socket PATH")
    return path


def _unix(path: Path, group: str | None = None) -> Listener:
    if path.exists():
        raise InputError(f"{path}: socket already exists (another server running?)")
    return Listener(socket.AF_UNIX, str(path), ("--unix", str(path)), socket_path=path, gid=_gid(group))


def _gid(group: str | None) -> int | None:
    if group is None:
        return None
    try:
        return int(group) if group.isascii() and group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise InputError(f"no such group: {group}") from None


def _tls_args(args: argparse.Namespace) -> tuple[str, ...]:
    if args.tls_psk and args.tls_certificates:
        raise InputError("give --tls-psk or --tls-certificates, not both")
    if args.tls_psk:
        return ("--tls=require", f"--tls-psk={os.path.abspath(args.tls_psk)}")
    if args.tls_certificates:
        directory = os.path.abspath(args.tls_certificates)
        if args.tls_no_verify_peer:
            return ("--tls=require", f"--tls-certificates={directory}")
        if not os.path.isfile(os.path.join(directory, "ca-cert.pem")):
            raise InputError(f"{directory}: no ca-cert.pem to verify client certificates with "
                             "(or --tls-no-verify-peer)")
        return ("--tls=require", f"--tls-certificates={directory}", "--tls-verify-peer")
    return ()


def _inherited_sockets() -> tuple[int, ...]:
    """The descriptors systemd passed to this process; the variables are taken out of the
    environment (as sd_listen_fds(1) does) so no other child mistakes them for its own."""
    pid, count = os.environ.pop("LISTEN_PID", None), os.environ.pop("LISTEN_FDS", None)
    os.environ.pop("LISTEN_FDNAMES", None)
    if pid != str(os.getpid()) or not count:
        return ()
    return tuple(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)))


def _inherited(fds: tuple[int, ...]) -> Listener:
    """A listener on systemd's sockets, probed through the first one's address."""
    family, address = _socket_name(fds[0])
    return Listener(family, address, fds=fds)


def _socket_name(fd: int) -> tuple[int, Address]:
    """``(family, address)`` of the socket ``fd``."""
    with socket.socket(fileno=os.dup(fd)) as sock:
        return sock.family, sock.getsockname()
