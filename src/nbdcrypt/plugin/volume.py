"""The plaintext view of an encrypted payload.

NBD requests arrive at any byte offset and length.  The cipher works on whole
sectors, so each request is widened to the sectors it touches: reads decrypt the
widened range and copy out the middle; writes that do not cover their first or
last sector read, decrypt and patch those sectors before encrypting the whole
range (read-modify-write).  A range lock keeps concurrent requests on the same
sectors from interleaving: writes are exclusive, reads shared, so a read never
sees a sector half-written and two partial writes never undo each other.
"""

import threading
from contextlib import contextmanager

from .queueing import CryptPath

# Write-zeroes is done by encrypting zeros (ciphertext of zeros is not zeros), in
# chunks of this many bytes so a huge request does not allocate a huge buffer.
ZERO_CHUNK = 4 << 20


class RangeLock:
    """Shared/exclusive locks on half-open byte ranges."""

    def __init__(self):
        self._cond = threading.Condition()
        self._held = []  # (start, end, exclusive)

    @contextmanager
    def __call__(self, start, end, exclusive):
        entry = (start, end, exclusive)
        with self._cond:
            self._cond.wait_for(lambda: not self._conflicts(entry))
            self._held.append(entry)
        try:
            yield
        finally:
            with self._cond:
                self._held.remove(entry)
                self._cond.notify_all()

    def _conflicts(self, entry):
        start, end, exclusive = entry
        return any(s < end and start < e and (exclusive or x) for s, e, x in self._held)


class Volume:
    """Sector-encrypted payload of ``size`` bytes at ``payload_offset`` in ``store``.

    ``cipher`` is a :class:`nbdcrypt.crypto.engine.SectorCipher`; sector numbers
    passed to it count from the start of the payload, as LUKS defines them.  The
    queueing layer (``self.path``) decides which threads do the crypto and I/O.
    """

    def __init__(self, store, cipher, payload_offset, size):
        self.path = CryptPath(cipher, store)
        self.sector_size = cipher.sector_size
        self.payload_offset = payload_offset
        self.size = size
        self.readonly = store.readonly
        self._lock = RangeLock()

    def read(self, buf, offset):
        """Decrypt ``len(buf)`` bytes at ``offset`` into the writable buffer ``buf``."""
        start, end = self._widen(offset, len(buf))
        with self.path.request("read", len(buf)), self._lock(start, end, exclusive=False):
            if (start, end) == (offset, offset + len(buf)):
                self._read_sectors(buf, start)
            else:
                plain = bytearray(end - start)
                self._read_sectors(plain, start)
                memoryview(buf)[:] = memoryview(plain)[offset - start:offset - start + len(buf)]

    def write(self, data, offset, fua=False):
        """Encrypt and store ``data`` at ``offset``."""
        start, end = self._widen(offset, len(data))
        with self.path.request("write", len(data)), self._lock(start, end, exclusive=True):
            if (start, end) == (offset, offset + len(data)):
                plain = bytearray(data)  # the cipher works in place: one copy, no zero-fill
                self.path.write(plain, self.payload_offset + start, start // self.sector_size, fua)
                return
            plain = bytearray(end - start)
            ss = self.sector_size
            if offset != start:
                self._read_sectors(memoryview(plain)[:ss], start)
            if offset + len(data) != end and end - ss >= offset:
                self._read_sectors(memoryview(plain)[-ss:], end - ss)
            plain[offset - start:offset - start + len(data)] = data
            self.path.write(plain, self.payload_offset + start, start // ss, fua)

    def zero(self, count, offset, fua=False):
        """Write zeros: one request, done in bounded chunks."""
        zeros = memoryview(bytes(min(count, ZERO_CHUNK)))
        end = offset + count
        with self.path.request("write", count):
            while offset < end:
                n = min(len(zeros), end - offset)
                self.write(zeros[:n], offset, fua)
                offset += n

    def flush(self):
        self.path.flush()

    def close(self):
        """Stop the workers and release the store (and its image lock)."""
        self.path.close()
        self.path.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _widen(self, offset, length):
        ss = self.sector_size
        return offset // ss * ss, -(-(offset + length) // ss) * ss

    def _read_sectors(self, buf, start):
        self.path.read(buf, self.payload_offset + start, start // self.sector_size)
