"""sd_notify(3) without libsystemd: one datagram per state change to $NOTIFY_SOCKET.

The protocol is a stable, documented interface of a few lines (a Unix datagram of
``NAME=value`` lines; a leading ``@`` means the abstract namespace), so a
dependency would add more than it saves.
"""

import os
import socket
from typing import Self


class Notifier:
    """Sends notifications to ``target`` (a socket address); does nothing if it is None."""

    def __init__(self, target: str | None = None) -> None:
        self.target = target

    @classmethod
    def from_environment(cls) -> Self:
        """Take $NOTIFY_SOCKET out of the environment, so nbdkit (our child) cannot
        claim readiness for us."""
        path = os.environ.pop("NOTIFY_SOCKET", None)
        if not path:
            return cls()
        return cls("\0" + path[1:] if path.startswith("@") else path)

    def __call__(self, *lines: str) -> None:
        """Send ``lines`` (``READY=1``, ``STATUS=...``) as one notification.  Failures are
        ignored, as sd_notify's callers do: systemd, if it waits, will time out."""
        if self.target is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(lines).encode(), self.target)
        except OSError:
            pass
