"""The control endpoint inside nbdkit: a Unix socket served by one thread.

Only the user the export runs as (or root) may connect, checked with SO_PEERCRED;
the socket is created mode 0600.  Each connection sends request lines and gets
one reply line for each (protocol in :mod:`nbdcrypt.control`).
"""

import os
import socket
import stat
import struct
import threading
from collections.abc import Callable

from ..control import MAX_LINE, ControlError, JsonObject, decode_request, encode_reply
from ..datapath.queueing import CryptPath
from ..errors import InputError, NbdcryptError


class ControlServer:
    """Controls the export's queueing layer ``crypt_path``; ``describe`` gives the
    export's details for "status"."""

    def __init__(self, path: str, crypt_path: CryptPath, describe: Callable[[], JsonObject]) -> None:
        self.path = str(path)
        self._crypt_path = crypt_path
        self._describe = describe
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bind_private(self._sock, self.path)
        self._sock.listen(8)
        threading.Thread(target=self._serve, name="nbdcrypt-control", daemon=True).start()

    def close(self) -> None:
        self._sock.close()
        if os.path.exists(self.path):
            os.unlink(self.path)

    def handle(self, line: bytes) -> bytes:
        """One request line in, one reply line out."""
        try:
            command, args = decode_request(line)
            return encode_reply(self._dispatch(command, args))
        except NbdcryptError as e:
            return encode_reply(error=str(e))

    def _dispatch(self, command: str, args: JsonObject) -> JsonObject:
        path = self._crypt_path
        if command == "set":
            path.configure(args)
        elif command == "reset-stats":
            path.stats.reset()
        if command == "stats":
            return path.stats.snapshot()
        return {**self._describe(), "settings": vars(path.settings), "worker_pids": path.worker_pids()}

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._converse, args=(conn,), daemon=True).start()

    def _converse(self, conn: socket.socket) -> None:
        allowed = peer_allowed(conn)
        with conn, conn.makefile("rb") as reader:
            while line := reader.readline(MAX_LINE + 1):
                if not allowed:  # answered after its request, so the peer is not cut off mid-send
                    conn.sendall(encode_reply(error="permission denied"))
                    return
                if not line.endswith(b"\n"):
                    conn.sendall(encode_reply(error=str(ControlError(f"request longer than {MAX_LINE} bytes"))))
                    return
                conn.sendall(self.handle(line))


def bind_private(sock: socket.socket, path: str) -> None:
    """Bind the Unix socket ``sock`` at ``path`` (replacing a stale one), mode 0600."""
    remove_stale_socket(path)
    old_umask = os.umask(0o077)  # no moment where others could connect
    try:
        sock.bind(path)
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)


def remove_stale_socket(path: str) -> None:
    """Clear ``path`` for a new socket if a socket nobody listens on is there; InputError if
    anything else is (a file, directory or symlink is not ours to delete; a live socket is
    another server's)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise InputError(f"{path}: exists and is not a socket; refusing to replace it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
            return
    raise InputError(f"{path}: a server listens there already")


def peer_allowed(conn: socket.socket) -> bool:
    """Is the peer of the Unix socket ``conn`` our own user or root?"""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (0, os.getuid())
