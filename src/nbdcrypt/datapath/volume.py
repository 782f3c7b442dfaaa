"""The plaintext view of an encrypted payload.

NBD requests arrive at any byte offset and length.  The cipher works on whole
sectors, so each request is widened to the sectors it touches: reads decrypt the
widened range and copy out the middle; writes that do not cover their first or
last sector read, decrypt and patch those sectors before encrypting the whole
range (read-modify-write).  A range lock keeps concurrent requests on the same
sectors from interleaving: writes are exclusive, reads shared, so a read never
sees a sector half-written and two partial writes never undo each other.

nbdkit hands writes over in a read-only buffer and the cipher works in place, so
a write is encrypted in a scratch buffer, borrowed from a pool for the request
(a fresh MiB would cost page faults under the GIL on every request; and
threading.local would not keep it: nbdkit's Python plugin runs every request in
a new Python thread state).
"""

import threading

from .queueing import CryptPath

# Write-zeroes is done by encrypting zeros (ciphertext of zeros is not zeros), in
# chunks of this many bytes so a huge request does not allocate a huge buffer.
ZERO_CHUNK = 4 << 20
# Scratch buffers up to this size go back to the pool for the next request.
KEEP_BUFFER = 1 << 20


class RangeLock:
    """Shared/exclusive locks on half-open byte ranges; ``with lock(start, end, exclusive):``.
    (A plain class rather than a generator context manager: it is taken per request.)"""

    def __init__(self):
        self._cond = threading.Condition()
        self._held = []  # (start, end, exclusive)
        self._waiting = 0

    def __call__(self, start, end, exclusive):
        return _Hold(self, (start, end, exclusive))

    def _conflicts(self, start, end, exclusive):
        for s, e, x in self._held:
            if s < end and start < e and (exclusive or x):
                return True
        return False


class _Hold:
    __slots__ = ("_lock", "_entry")

    def __init__(self, lock, entry):
        self._lock, self._entry = lock, entry

    def __enter__(self):
        lock = self._lock
        with lock._cond:
            while lock._conflicts(*self._entry):
                lock._waiting += 1
                lock._cond.wait()
                lock._waiting -= 1
            lock._held.append(self._entry)

    def __exit__(self, *exc):
        lock = self._lock
        with lock._cond:
            lock._held.remove(self._entry)
            if lock._waiting:
                lock._cond.notify_all()


class Volume:
    """Sector-encrypted payload of ``size`` bytes at ``payload_offset`` in ``store``.

    ``cipher`` is a :class:`nbdcrypt.crypto.engine.SectorCipher`; sector numbers
    passed to it count from the start of the payload, as LUKS defines them.  The
    export's queueing layer ``path`` (default: a new one) decides which threads do
    the crypto and I/O.
    """

    def __init__(self, store, cipher, payload_offset, size, path=None):
        self.store, self.cipher = store, cipher
        self.path = CryptPath() if path is None else path
        self.sector_size = cipher.sector_size
        self.payload_offset = payload_offset
        self.size = size
        self.readonly = store.readonly
        self._lock = RangeLock()
        self._buffers = BufferPool(KEEP_BUFFER)

    def read(self, buf, offset):
        """Decrypt ``len(buf)`` bytes at ``offset`` into the writable buffer ``buf``."""
        start, end = self._widen(offset, len(buf))
        with self.path.request("read", len(buf)), self._lock(start, end, exclusive=False):
            if (start, end) == (offset, offset + len(buf)):
                self._read_sectors(buf, start)
            else:
                with self._buffers.lend(end - start) as plain:
                    self._read_sectors(plain, start)
                    memoryview(buf)[:] = plain[offset - start:offset - start + len(buf)]

    def write(self, data, offset, fua=False):
        """Encrypt and store ``data`` at ``offset``."""
        start, end = self._widen(offset, len(data))
        with self.path.request("write", len(data)), self._lock(start, end, exclusive=True), \
                self._buffers.lend(end - start) as plain:
            ss = self.sector_size
            # Partial first and last sectors: read-modify-write.
            if offset != start:
                self._read_sectors(plain[:ss], start)
            if offset + len(data) != end and end - ss >= offset:
                self._read_sectors(plain[-ss:], end - ss)
            plain[offset - start:offset - start + len(data)] = data
            self.path.write(self.cipher, self.store, plain, self.payload_offset + start, start // ss, fua)

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
        # Every acknowledged write has already reached the store (requests wait).
        self.store.flush()

    def close(self):
        """Stop the workers and release the store (and its image lock)."""
        self.path.close()
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _widen(self, offset, length):
        ss = self.sector_size
        return offset // ss * ss, -(-(offset + length) // ss) * ss

    def _read_sectors(self, buf, start):
        self.path.read(self.cipher, self.store, buf, self.payload_offset + start, start // self.sector_size)


class BufferPool:
    """Scratch buffers lent to one request at a time: ``with pool.lend(n) as view:``
    gives a writable memoryview of n bytes.  Buffers of up to ``keep`` bytes go back
    to the pool (as many as requests ran at once), larger ones are freed."""

    def __init__(self, keep):
        self.keep = keep
        self.idle = []

    def lend(self, nbytes):
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
