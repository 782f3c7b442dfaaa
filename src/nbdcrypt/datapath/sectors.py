"""Sector crypto on byte ranges, as both volumes (LUKS and qcow2) need it.

NBD requests arrive at any byte offset and length.  The cipher works on whole
sectors, so each range is widened to the sectors it touches: reads decrypt the
widened range and copy out the middle; writes that do not cover their first or
last sector read, decrypt and patch those sectors before encrypting the whole
range (read-modify-write).  The volume keeps concurrent requests on the same
sectors apart (a range lock) before it calls in here.

nbdkit hands writes over in a read-only buffer and the cipher works in place, so
a write is encrypted in a scratch buffer, borrowed from a pool for the request
(a fresh MiB would cost page faults under the GIL on every request; and
threading.local would not keep it: nbdkit's Python plugin runs every request in
a new Python thread state).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..crypto.engine import SectorCipher
    from ..storage.store import Store
    from .queueing import CryptPath

# Write-zeroes is done by encrypting zeros (ciphertext of zeros is not zeros), in
# chunks of this many bytes so a huge request does not allocate a huge buffer.
ZERO_CHUNK = 4 << 20
# Scratch buffers up to this size go back to the pool for the next request.
KEEP_BUFFER = 1 << 20


class SectorIO:
    """The plaintext of ``store``, kept in ``sector_size``-byte sectors (counted from
    the store offset ``origin``) through ``cipher`` (None: stored in the clear), on
    the export's queueing layer ``path``.  Offsets are the store's; ``sector`` names,
    for the cipher's IV, the sector that holds ``offset``."""

    def __init__(self, path: CryptPath, cipher: SectorCipher | None, store: Store, sector_size: int,
                 origin: int = 0) -> None:
        self.path, self.cipher, self.store = path, cipher, store
        self.sector_size, self.origin = sector_size, origin
        self._buffers = BufferPool(KEEP_BUFFER)

    def widen(self, offset: int, length: int) -> tuple[int, int]:
        """(start, end): the range widened to whole sectors."""
        ss, origin = self.sector_size, self.origin
        return origin + (offset - origin) // ss * ss, origin + -(-(offset + length - origin) // ss) * ss

    def read(self, buf: memoryview, offset: int, sector: int) -> None:
        """Fill the writable buffer ``buf`` with the plaintext at ``offset``."""
        start, end = self.widen(offset, len(buf))
        if self.cipher is None or (start, end) == (offset, offset + len(buf)):
            self.path.read(self.cipher, self.store, buf, offset, sector)
            return
        with self._buffers.lend(end - start) as plain:
            self.path.read(self.cipher, self.store, plain, start, sector)
            memoryview(buf)[:] = plain[offset - start:offset - start + len(buf)]

    def write(self, data: memoryview, offset: int, sector: int, fua: bool = False) -> None:
        """Store the plaintext ``data`` at ``offset``; with ``fua``, durably."""
        if self.cipher is None:
            self.path.write(None, self.store, data, offset, sector, fua)
            return
        start, end = self.widen(offset, len(data))
        ss = self.sector_size
        with self._buffers.lend(end - start) as plain:
            # Partial first and last sectors: read-modify-write.
            if offset != start:
                self.path.read(self.cipher, self.store, plain[:ss], start, sector)
            if offset + len(data) != end and end - ss >= offset:
                self.path.read(self.cipher, self.store, plain[-ss:], end - ss, sector + (end - ss - start) // ss)
            plain[offset - start:offset - start + len(data)] = data
            self.path.write(self.cipher, self.store, plain, start, sector, fua)


def write_zeros(write: Callable[[memoryview, int, bool], None], offset: int, count: int,
                fua: bool = False) -> None:
    """Write ``count`` zero bytes at ``offset`` through ``write(data, offset, fua)``,
    in chunks of at most ZERO_CHUNK."""
    zeros = memoryview(bytes(min(count, ZERO_CHUNK)))
    for pos in range(offset, offset + count, ZERO_CHUNK):
        write(zeros[:min(ZERO_CHUNK, offset + count - pos)], pos, fua)


class BufferPool:
    """Scratch buffers lent to one request at a time: ``with pool.lend(n) as view:``
    gives a writable memoryview of n bytes.  Buffers of up to ``keep`` bytes go back
    to the pool (as many as requests ran at once), larger ones are freed."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.idle: list[bytearray] = []

    def lend(self, nbytes: int) -> _Lent:
        return _Lent(self, nbytes)


class _Lent:
    __slots__ = ("_pool", "_nbytes", "_buffer")

    def __init__(self, pool, nbytes):
        self._pool, self._nbytes = pool, nbytes

    def __enter__(self):
        try:
            buffer = self._pool.idle.pop()  # atomic: no lock needed
        except IndexError:
            buffer = b""
        if len(buffer) < self._nbytes:
            buffer = bytearray(self._nbytes)
        self._buffer = buffer
        return memoryview(buffer)[:self._nbytes]

    def __exit__(self, *exc):
        if len(self._buffer) <= self._pool.keep:
            self._pool.idle.append(self._buffer)
