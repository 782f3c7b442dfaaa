"""Reference counts and cluster allocation.

Every host cluster has a refcount (refcount_bits wide, in refcount blocks listed by
the refcount table); 0 means free.  New clusters come from the first free one,
which past the end of the file means appending.  A range with no refcount block
yet gets one placed at its own first free cluster, so the block describes itself;
a full refcount table moves to a bigger one at the end of the file.

Changes collect in a cache of refcount blocks until :meth:`Refcounts.commit`
writes them; the volume commits (and flushes) before any L2 entry points at a new
cluster, and drops references only once the L2 entries that held them are on disk,
so a crash leaves at worst leaked clusters, never a referenced cluster with
refcount 0.  The cache is an LRU of CACHE_BYTES: a changed block it evicts is
written first, which is always safe since any change may reach the disk early (an
increment early is at worst a leak; a decrement is only made once it is safe).
A new block's refcount table entry still waits for :meth:`commit`, after a flush.
Not thread-safe: the volume calls it under its metadata lock.
"""

from collections import Counter

import numpy as np

from nbdcrypt.errors import FormatError
from nbdcrypt.formats.qcow2.header import REFTABLE_FIELDS, REFTABLE_FIELDS_OFFSET, Qcow2Header
from nbdcrypt.formats.qcow2.metadata import Metadata
from nbdcrypt.formats.qcow2.tables import OFFSET_MASK, LruCache
from nbdcrypt.storage.store import Store

CACHE_BYTES = 4 << 20
MIN_CACHED_BLOCKS = 4


class Refcounts:
    def __init__(self, header: Qcow2Header, store: Store, file_size: int, metadata: Metadata) -> None:
        self.store = store
        self.name = header.name
        self.order = header.refcount_order
        self.cluster_size = header.cluster_size
        self.per_block = (self.cluster_size * 8) >> self.order
        self.max_count = (1 << (1 << self.order)) - 1
        self.table_offset = header.reftable_offset
        self.table_clusters = header.reftable_clusters
        raw = bytearray(self.table_clusters * self.cluster_size)
        store.read_into(raw, self.table_offset)
        self.table = [int(e) for e in np.frombuffer(raw, ">u8")]
        self.metadata = metadata  # its refcount blocks and table are kept here
        metadata.refcount_blocks.update(set(self.table) - {0})
        self.end = -(-file_size // self.cluster_size)  # clusters in the file, or allocated
        self._blocks: LruCache[int, bytearray] = LruCache(  # by block offset
            max(MIN_CACHED_BLOCKS, CACHE_BYTES // self.cluster_size), self._write_back)
        self._dirty: dict[int, list[int]] = {}  # block offset -> [lo, hi) bytes to write
        self._dirty_table: set[int] = set()  # refcount table indices to write
        self._hint = 0  # no free cluster below this index

    # -- reading -------------------------------------------------------------------

    def get(self, cluster: int) -> int:
        block = self._block_of(cluster)
        return 0 if block is None else _get(block, cluster % self.per_block, self.order)

    def _block_of(self, cluster):
        index = cluster // self.per_block
        if index >= len(self.table) or not self.table[index]:
            return None
        return self._block(self.table[index])

    def _block(self, offset):
        block = self._blocks.get(offset)
        if block is None:
            if offset & ~OFFSET_MASK or offset % self.cluster_size or offset < self.cluster_size \
                    or offset >= self.end * self.cluster_size:
                raise FormatError(f"{self.name}: refcount block offset {offset:#x} is corrupt")
            block = bytearray(self.cluster_size)
            self.store.read_into(block, offset)
            self._blocks.put(offset, block)
        return block

    # -- changing ------------------------------------------------------------------

    def allocate(self, count: int) -> list[int]:
        """The indices of ``count`` free clusters, their refcounts now 1 (uncommitted);
        none are taken if one turns out to hold metadata (FormatError)."""
        taken: list[int] = []
        try:
            while len(taken) < count:
                taken.append(self._allocate_one())
        except FormatError:
            for cluster in taken:
                self.release(cluster * self.cluster_size)
            raise
        return taken

    def _allocate_one(self):
        while True:
            cluster = self._find_free()
            index = cluster // self.per_block
            if index >= len(self.table):
                self._grow_table(index)
            elif not self.table[index]:
                self._new_block(cluster)
            else:
                self._set(cluster, 1)
                self.end = max(self.end, cluster + 1)
                self._hint = cluster + 1
                return cluster

    def check_release(self, ranges: list[tuple[int, int]]) -> None:
        """FormatError, before anything is written, if dropping a reference for each
        (offset, length) of ``ranges`` would take a refcount below 0 (a corrupt image)."""
        drops = Counter(c for offset, length in ranges for c in self._clusters(offset, length))
        for cluster, n in drops.items():
            if self.get(cluster) < n:
                raise FormatError(f"{self.name}: refcount of cluster {cluster} would go below 0")

    def release(self, offset: int, length: int = 1) -> None:
        """Drop one reference to each cluster overlapping [offset, offset+length)."""
        for cluster in self._clusters(offset, length):
            count = self.get(cluster)
            if count == 0:
                raise FormatError(f"{self.name}: refcount of cluster {cluster} would go below 0")
            self._set(cluster, count - 1)
            if count == 1:
                self._hint = min(self._hint, cluster)

    def _clusters(self, offset, length):
        return range(offset // self.cluster_size, (offset + length - 1) // self.cluster_size + 1)

    def commit(self) -> None:
        """Write changed refcounts (blocks, then table entries pointing at new blocks).
        The caller flushes."""
        for offset in list(self._dirty):
            self._write_back(offset, self._blocks.get(offset))
        if self._dirty_table:
            self.store.flush()  # a table entry must never point at an unwritten block
            for index in sorted(self._dirty_table):
                self.store.write(self.table[index].to_bytes(8, "big"), self.table_offset + index * 8)
            self._dirty_table.clear()

    def _write_back(self, offset, block):
        """Write the changed bytes of a cached block (if any)."""
        span = self._dirty.pop(offset, None)
        if span is not None:
            lo, hi = span
            self.store.write(memoryview(block)[lo:hi], offset + lo)

    def _set(self, cluster, count):
        if count > self.max_count:
            raise FormatError(f"{self.name}: refcount of cluster {cluster} would overflow")
        index, i = divmod(cluster, self.per_block)
        offset = self.table[index]
        lo, hi = _put(self._block(offset), i, self.order, count)
        span = self._dirty.setdefault(offset, [lo, hi])
        span[0], span[1] = min(span[0], lo), max(span[1], hi)

    def _find_free(self):
        cluster = self._hint
        while True:
            index = cluster // self.per_block
            if index >= len(self.table) or not self.table[index]:
                break
            counts = _decode(self._block(self.table[index]), self.order)
            free = np.flatnonzero(counts[cluster % self.per_block:] == 0)
            if len(free):
                cluster += int(free[0])
                break
            cluster = (index + 1) * self.per_block
        held = self.metadata.at(cluster * self.cluster_size)
        if held:  # a lying refcount: handing it out would overwrite metadata (QEMU's overlap check)
            raise FormatError(f"{self.name}: cluster {cluster * self.cluster_size:#x} is free by its "
                              f"refcount but holds {held}")
        return cluster

    def _new_block(self, cluster):
        """A refcount block for the (empty) range holding ``cluster``, placed there."""
        offset = cluster * self.cluster_size
        self._blocks.put(offset, bytearray(self.cluster_size))
        self._dirty[offset] = [0, self.cluster_size]
        self.table[cluster // self.per_block] = offset
        self.metadata.refcount_blocks.add(offset)
        self._dirty_table.add(cluster // self.per_block)
        self._set(cluster, 1)
        self.end = max(self.end, cluster + 1)

    def _grow_table(self, needed):
        """Move the refcount table to a bigger one at the end of the file, together
        with the blocks describing it; the header switches over in one write."""
        self.commit()
        cs, per_block = self.cluster_size, self.per_block
        start = max(self.end, len(self.table) * per_block)  # free, and in no block's range
        entries = max(needed + 1, 2 * len(self.table))
        while True:
            table_clusters = -(-entries * 8 // cs)
            blocks = 0
            while True:  # the new blocks describe the new table and themselves
                last = start + table_clusters + blocks - 1
                need = last // per_block - start // per_block + 1
                if need == blocks:
                    break
                blocks = need
            if last // per_block < entries:
                break
            entries = last // per_block + 1
        table = self.table + [0] * (table_clusters * cs // 8 - len(self.table))
        new_blocks = {}
        for j in range(blocks):
            offset = (start + table_clusters + j) * cs
            table[start // per_block + j] = offset
            new_blocks[offset] = bytearray(cs)
        old_offset, old_clusters = self.table_offset, self.table_clusters
        self.table, self.table_offset, self.table_clusters = table, start * cs, table_clusters
        self.metadata.refcount_blocks.update(new_blocks)
        self.metadata.refcount_table = (self.table_offset, table_clusters * cs)
        for cluster in range(start, last + 1):
            _put(new_blocks[table[cluster // per_block]], cluster % per_block, self.order, 1)
        for offset, block in new_blocks.items():
            self.store.write(block, offset)
        self.store.write(np.array(table, ">u8").tobytes(), self.table_offset)
        self.store.flush()
        self.store.write(REFTABLE_FIELDS.pack(self.table_offset, table_clusters), REFTABLE_FIELDS_OFFSET)
        self.store.flush()
        self.end = max(self.end, last + 1)
        self.release(old_offset, old_clusters * cs)


def _get(block, i, order):
    if order >= 3:
        width = 1 << (order - 3)
        return int.from_bytes(block[i * width:(i + 1) * width], "big")
    byte, shift = divmod(i << order, 8)
    return (block[byte] >> shift) & ((1 << (1 << order)) - 1)


def _put(block, i, order, count):
    """Store one refcount; returns the [lo, hi) bytes changed."""
    if order >= 3:
        width = 1 << (order - 3)
        block[i * width:(i + 1) * width] = count.to_bytes(width, "big")
        return i * width, (i + 1) * width
    byte, shift = divmod(i << order, 8)
    mask = ((1 << (1 << order)) - 1) << shift
    block[byte] = (block[byte] & ~mask) | (count << shift)
    return byte, byte + 1


def _decode(block, order):
    """All refcounts of a block as an array (sub-byte widths: least significant bits first)."""
    if order >= 3:
        return np.frombuffer(block, f">u{1 << (order - 3)}")
    bits = np.unpackbits(np.frombuffer(block, np.uint8), bitorder="little").reshape(-1, 1 << order)
    return bits @ (1 << np.arange(1 << order))
