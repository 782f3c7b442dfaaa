"""Backing stores: where the encrypted bytes live.

A store does positional I/O on ciphertext and knows nothing of formats or keys.
All threads share one store; every method is safe to call concurrently.
"""

import errno
import os

from ..errors import InputError, ReadOnlyError, StoreError


class FileStore:
    """A local image file (or block device) opened once for the whole daemon."""

    def __init__(self, path, readonly=False):
        self.path = str(path)
        self.readonly = readonly
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        try:
            self._fd = os.open(self.path, flags)
        except FileNotFoundError:
            raise InputError(f"{self.path}: no such file") from None
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and not readonly:
                raise ReadOnlyError(f"{self.path}: image is read-only; pass --readonly to serve it") from None
            raise InputError(f"{self.path}: {e.strerror}") from None

    def size(self):
        # lseek works for regular files and block devices alike.
        return os.lseek(self._fd, 0, os.SEEK_END)

    def read_into(self, buf, offset):
        """Fill the writable buffer ``buf`` from ``offset``; the range must exist."""
        view = memoryview(buf).cast("B")
        done = 0
        while done < len(view):
            n = self._io(os.preadv, [view[done:]], offset + done)
            if n == 0:
                raise StoreError(f"{self.path}: unexpected end of file at {offset + done}")
            done += n

    def write(self, buf, offset, fua=False):
        """Write all of ``buf`` at ``offset``; with ``fua`` it is durable on return."""
        if self.readonly:
            raise ReadOnlyError(f"{self.path}: image is read-only")
        view = memoryview(buf).cast("B")
        flags = os.RWF_DSYNC if fua else 0
        done = 0
        while done < len(view):
            done += self._io(os.pwritev, [view[done:]], offset + done, flags)

    def flush(self):
        self._io(os.fdatasync)

    def close(self):
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _io(self, call, *args):
        try:
            return call(self._fd, *args)
        except OSError as e:
            raise StoreError(f"{self.path}: {e.strerror}", e.errno) from None
