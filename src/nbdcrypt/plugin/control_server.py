"""The control endpoint inside nbdkit: a Unix socket served by one thread.

Only the user the export runs as (or root) may connect, checked with SO_PEERCRED;
the socket is created mode 0600.  Each connection sends request lines and gets
one reply line for each (protocol in :mod:`nbdcrypt.control`).
"""

import os
import socket
import struct
import threading

from ..control import MAX_LINE, ControlError, decode_request, encode_reply
from ..errors import NbdcryptError


class ControlServer:
    def __init__(self, path, volume, describe):
        self.path = str(path)
        self._volume = volume
        self._describe = describe  # () -> dict of export details for "status"
        if os.path.exists(self.path):
            os.unlink(self.path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o077)  # no moment where others could connect
        try:
            self._sock.bind(self.path)
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        self._sock.listen(8)
        threading.Thread(target=self._serve, name="nbdcrypt-control", daemon=True).start()

    def close(self):
        self._sock.close()
        if os.path.exists(self.path):
            os.unlink(self.path)

    def handle(self, line):
        """One request line in, one reply line out."""
        try:
            command, args = decode_request(line)
            return encode_reply(self._dispatch(command, args))
        except NbdcryptError as e:
            return encode_reply(error=str(e))

    def _dispatch(self, command, args):
        path = self._volume.path
        if command == "set":
            path.configure(args)
        elif command == "reset-stats":
            path.stats.reset()
        if command == "stats":
            return path.stats.snapshot()
        return {**self._describe(), "settings": vars(path.settings)}

    def _serve(self):
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._converse, args=(conn,), daemon=True).start()

    def _converse(self, conn):
        with conn, conn.makefile("rb") as reader:
            if not _allowed(conn):
                conn.sendall(encode_reply(error="permission denied"))
                return
            while line := reader.readline(MAX_LINE + 1):
                if not line.endswith(b"\n"):
                    conn.sendall(encode_reply(error=str(ControlError(f"request longer than {MAX_LINE} bytes"))))
                    return
                conn.sendall(self.handle(line))


def _allowed(conn):
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (0, os.getuid())
