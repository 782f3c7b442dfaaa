"""Backing stores: where the encrypted bytes live.

A store does positional I/O on ciphertext and knows nothing of formats or keys;
:class:`Store` is its contract.  :func:`open_store` picks the kind: a local file,
or any NBD server by URI (nbdkit's S3/curl/ssh plugins, qemu-storage-daemon,
rbd-nbd ...) through libnbd.
"""

import errno
import io
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ..errors import InputError, ReadOnlyError, StoreError
from .locking import lock_image

if TYPE_CHECKING:
    from typing_extensions import Buffer  # typeshed's; not needed at run time

NBD_SCHEMES = ("nbd://", "nbds://", "nbd+unix://", "nbds+unix://", "nbd+vsock://", "nbds+vsock://")

Location = str | os.PathLike[str]  # a path, or an NBD URI
T = TypeVar("T")


class Store(Protocol):
    """Positional I/O on the ciphertext of one image.  All threads share one store:
    every method is safe to call concurrently."""

    path: str  # for messages
    readonly: bool

    def size(self) -> int:
        """Bytes in the store."""

    def file_id(self) -> tuple[int, int] | None:
        """(device, inode) of a local file, to tell the data file from a detached
        header file; None if there is no local file."""

    def read_into(self, buf: "Buffer", offset: int) -> None:
        """Fill the writable buffer ``buf`` from ``offset``; the range must exist."""

    def write(self, buf: "Buffer", offset: int, fua: bool = False) -> None:
        """Write all of ``buf`` at ``offset``; with ``fua`` it is durable on return."""

    def flush(self) -> None:
        """Make every write returned so far durable."""

    def close(self) -> None:
        """Release the store (and its image lock)."""


def is_uri(location: Location) -> bool:
    return str(location).startswith(NBD_SCHEMES)


def open_store(location: Location, readonly: bool = False) -> Store:
    """A FileStore for a path, an NbdStore for an NBD URI."""
    return NbdStore(location, readonly) if is_uri(location) else FileStore(location, readonly)


class FileStore:
    """A local image file (or block device) opened once for the whole daemon."""

    def __init__(self, path: Location, readonly: bool = False) -> None:
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
        try:
            lock_image(self._fd, self.path, readonly)
        except InputError:
            self.close()
            raise

    def size(self) -> int:
        # lseek works for regular files and block devices alike.
        return os.lseek(self._fd, 0, os.SEEK_END)

    def file_id(self) -> tuple[int, int]:
        st = os.fstat(self._fd)
        return st.st_dev, st.st_ino

    def read_into(self, buf: "Buffer", offset: int) -> None:
        """Fill the writable buffer ``buf`` from ``offset``; the range must exist."""
        view = memoryview(buf).cast("B")
        done = 0
        while done < len(view):
            n = self._io(os.preadv, [view[done:]], offset + done)
            if n == 0:
                raise StoreError(f"{self.path}: unexpected end of file at {offset + done}")
            done += n

    def write(self, buf: "Buffer", offset: int, fua: bool = False) -> None:
        """Write all of ``buf`` at ``offset``; with ``fua`` it is durable on return."""
        if self.readonly:
            raise ReadOnlyError(f"{self.path}: image is read-only")
        view = memoryview(buf).cast("B")
        flags = os.RWF_DSYNC if fua else 0
        done = 0
        while done < len(view):
            done += self._io(os.pwritev, [view[done:]], offset + done, flags)

    def flush(self) -> None:
        self._io(os.fdatasync)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _io(self, call: Callable[..., T], *args: Any) -> T:
        try:
            return call(self._fd, *args)
        except OSError as e:
            raise StoreError(f"{self.path}: {e.strerror}", e.errno or errno.EIO) from None


class NbdStore:
    """An image behind an NBD server, through a small pool of libnbd connections.

    Several requests are in flight at once (one per connection).  A dropped
    connection is re-opened with backoff and the request retried (reads and
    writes are idempotent), for up to ``RECONNECT_SECONDS``; then the request fails
    with EIO.  Writes acknowledged before a reconnect may not have been flushed by
    the server that went away, so the next flush reports EIO once, as a disk
    reports a lost write-back.
    """

    CONNECTIONS = 4
    RECONNECT_SECONDS = 30.0

    def __init__(self, uri: Location, readonly: bool = False) -> None:
        self.path = str(uri)
        self.readonly = readonly
        try:
            import nbd
        except ImportError:
            raise InputError("NBD backing stores need libnbd's Python binding (python3-libnbd)") from None
        self._nbd = nbd
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()  # idle nbd.NBD handles
        self._lock = threading.Lock()
        self._unflushed = False  # writes acknowledged since the last flush
        self._lost = False       # ... and a connection dropped before that flush
        first = self._connect(initial=True)
        self._size = first.get_size()
        # Without multi-conn a flush on one connection need not cover writes made on
        # another, so such a server gets one connection.
        self._connections = self.CONNECTIONS if first.can_multi_conn() else 1
        self._idle.put(first)
        for _ in range(self._connections - 1):
            self._idle.put(self._connect(initial=True))

    def size(self) -> int:
        return self._size

    def file_id(self) -> None:
        return None  # no local file: never the same as a header file

    def read_into(self, buf: "Buffer", offset: int) -> None:
        view = memoryview(buf).cast("B")
        view[:] = self._call(lambda h: h.pread(len(view), offset))

    def write(self, buf: "Buffer", offset: int, fua: bool = False) -> None:
        if self.readonly:
            raise ReadOnlyError(f"{self.path}: image is read-only")
        flags = self._nbd.CMD_FLAG_FUA if fua else 0
        with self._lock:
            self._unflushed = True
        self._call(lambda h: h.pwrite(buf, offset, flags))

    def flush(self) -> None:
        with self._lock:
            lost, self._lost = self._lost, False
            self._unflushed = False
        self._call(lambda h: h.flush())
        if lost:
            raise StoreError(f"{self.path}: the connection dropped before a flush; "
                             "recent writes may be lost", errno.EIO)

    def close(self) -> None:
        for _ in range(self._connections):
            h = self._idle.get()
            try:
                h.shutdown()
            except self._nbd.Error:
                pass  # already dropped

    def _call(self, operation: Callable[[Any], T]) -> T:
        with self._borrow() as h:
            deadline = time.monotonic() + self.RECONNECT_SECONDS
            while True:
                try:
                    return operation(h.handle)
                except self._nbd.Error as e:
                    if not h.handle.aio_is_dead() and not h.handle.aio_is_closed():
                        raise StoreError(f"{self.path}: {e.string}", e.errnum or errno.EIO) from None
                    h.handle = self._reconnect(deadline)

    @contextmanager
    def _borrow(self) -> Iterator["_Slot"]:
        slot = _Slot(self._idle.get())
        try:
            yield slot
        finally:
            self._idle.put(slot.handle)

    def _reconnect(self, deadline: float) -> Any:
        with self._lock:
            self._lost = self._lost or self._unflushed
        print(f"nbdcrypt: {self.path}: connection dropped, reconnecting", file=sys.stderr, flush=True)
        delay = 0.05
        while True:
            try:
                handle = self._connect()
                print(f"nbdcrypt: {self.path}: reconnected", file=sys.stderr, flush=True)
                return handle
            except StoreError:
                if time.monotonic() + delay > deadline:
                    raise StoreError(f"{self.path}: NBD server unreachable for "
                                     f"{self.RECONNECT_SECONDS:.0f} s", errno.EIO) from None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _connect(self, initial: bool = False) -> Any:
        h = self._nbd.NBD()
        h.set_uri_allow_local_file(True)  # the operator's URI may name TLS files (tls-psk-file=)
        try:
            h.connect_uri(self.path)
        except self._nbd.Error as e:
            message = f"{self.path}: cannot connect: {e.string}"
            raise (InputError(message) if initial else StoreError(message, errno.EIO)) from None
        if not self.readonly and h.is_read_only():
            raise ReadOnlyError(f"{self.path}: the NBD server is read-only; pass --readonly to serve it")
        return h


class _Slot:
    """A borrowed connection, replaced in place when it has to be re-opened."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle


class StoreFile(io.RawIOBase):
    """A read-only file object over a store, for header readers that seek and read."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._store.size()}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buf: "Buffer") -> int:
        view = memoryview(buf)
        n = max(0, min(len(view), self._store.size() - self._pos))
        if n:
            self._store.read_into(view[:n], self._pos)
            self._pos += n
        return n
