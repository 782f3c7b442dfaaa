"""L1/L2 tables: guest cluster -> host location, with a bounded write-through L2 cache.

An L2 entry is one of: unallocated (0), normal (host cluster offset), zero (v3
flag bit 0; "zero alloc" when it keeps a host cluster), or compressed (host byte
offset plus a sector count).  The COPIED flag (bit 63) says the cluster's
refcount is exactly 1, so it may be written in place; without it the cluster (or
L2 table) is shared with a snapshot and must be copied first.
"""

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import numpy.typing as npt

from nbdcrypt.errors import FormatError
from nbdcrypt.formats.qcow2.header import Qcow2Header
from nbdcrypt.formats.qcow2.metadata import Metadata
from nbdcrypt.storage.store import Store

COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO = 1
OFFSET_MASK = ((1 << 56) - 1) & ~511  # bits 9..55
L1_RESERVED = ((1 << 63) - 1) & ~OFFSET_MASK  # bits 0..8 and 56..62
CACHE_BYTES = 32 << 20

L2Table = npt.NDArray[np.uint64]
K = TypeVar("K")
V = TypeVar("V")

UNALLOCATED, NORMAL, ZERO_PLAIN, ZERO_ALLOC, COMPRESSED_DATA = range(5)


@dataclass(frozen=True)
class Mapping:
    """Where one guest cluster lives.  ``host`` is a cluster offset (normal, zero
    alloc) or a byte offset (compressed, with ``length`` bytes)."""

    kind: int
    host: int = 0
    length: int = 0
    copied: bool = False

    @property
    def in_place(self) -> bool:
        """Writable where it is: allocated, unshared data."""
        return self.kind in (NORMAL, ZERO_ALLOC) and self.copied


def decode(entry: int, cluster_bits: int) -> Mapping:
    """The :class:`Mapping` of a raw L2 entry."""
    if entry & COMPRESSED:
        shift = 62 - (cluster_bits - 8)
        host = entry & ((1 << shift) - 1)
        sectors = ((entry >> shift) & ((1 << (cluster_bits - 8)) - 1)) + 1
        return Mapping(COMPRESSED_DATA, host, sectors * 512 - (host & 511))
    host, copied = entry & OFFSET_MASK, bool(entry & COPIED)
    if entry & ZERO:
        return Mapping(ZERO_ALLOC if host else ZERO_PLAIN, host, copied=copied)
    return Mapping(NORMAL if host else UNALLOCATED, host, copied=copied)


class Tables:
    """The active L1 table (in memory) and L2 tables (cached, written through).

    Not thread-safe: the volume calls it under its metadata lock."""

    def __init__(self, header: Qcow2Header, store: Store, file_size: int, metadata: Metadata) -> None:
        self.store = store
        self.name = header.name
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.l2_entries = header.l2_entries
        self.l1_offset = header.l1_offset
        raw = bytearray(header.l1_size * 8)
        store.read_into(raw, header.l1_offset)
        self.l1 = [int(e) for e in np.frombuffer(raw, ">u8")]
        self.metadata = metadata  # its set of L2 tables is kept here
        metadata.l2_tables.update({e & OFFSET_MASK for e in self.l1} - {0})
        self.file_size = file_size  # bound for L2 offsets; the volume raises it as it allocates
        self._cache: LruCache[int, L2Table] = LruCache(max(16, CACHE_BYTES // self.cluster_size))

    def l2_location(self, l1_index: int) -> tuple[int, bool]:
        """(L2 table offset or 0, COPIED flag) of one L1 entry, checked."""
        entry = self.l1[l1_index]
        offset = entry & OFFSET_MASK
        if entry & L1_RESERVED or (offset and (offset % self.cluster_size or offset < self.cluster_size
                                               or offset + self.cluster_size > self.file_size)):
            raise FormatError(f"{self.name}: L1 entry {l1_index} ({entry:#x}) is corrupt")
        return offset, bool(entry & COPIED)

    def lookup(self, guest_cluster: int) -> Mapping:
        """The :class:`Mapping` of a guest cluster (by index)."""
        l1_index, l2_index = divmod(guest_cluster, self.l2_entries)
        offset, _ = self.l2_location(l1_index)
        if not offset:
            return Mapping(UNALLOCATED)
        return decode(int(self.table(offset)[l2_index]), self.cluster_bits)

    def table(self, offset: int) -> L2Table:
        """The L2 table at ``offset`` as a uint64 array (cached; do not modify)."""
        table = self._cache.get(offset)
        if table is None:
            raw = bytearray(self.cluster_size)
            self.store.read_into(raw, offset)
            table = np.frombuffer(raw, ">u8").astype(np.uint64)
            self._cache.put(offset, table)
        return table

    def write_table(self, offset: int, table: L2Table) -> None:
        """Write a whole (new) L2 table."""
        self.store.write(table.astype(">u8").tobytes(), offset)
        self._cache.put(offset, table)

    def set_entries(self, offset: int, updates: dict[int, int]) -> None:
        """Set L2 entries {index: value} of the table at ``offset`` and write them through."""
        table = self.table(offset)
        for index, value in updates.items():
            table[index] = value
        lo, hi = min(updates), max(updates) + 1
        self.store.write(table[lo:hi].astype(">u8").tobytes(), offset + lo * 8)

    def set_l1(self, index: int, value: int) -> None:
        self.metadata.l2_tables.discard(self.l1[index] & OFFSET_MASK)
        self.metadata.l2_tables.add(value & OFFSET_MASK)
        self.l1[index] = value
        self.store.write(value.to_bytes(8, "big"), self.l1_offset + index * 8)


class LruCache(Generic[K, V]):
    """At most ``capacity`` entries; the least recently used leaves first, after
    ``evict(key, value)`` has run (to write it out if it is dirty)."""

    def __init__(self, capacity: int, evict: Callable[[K, V], None] | None = None) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._evict = evict

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> V | None:
        """The entry (now the most recently used), or None."""
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            oldest, old_value = next(iter(self._entries.items()))
            if self._evict is not None:
                self._evict(oldest, old_value)  # before it goes: a failed write loses nothing
            del self._entries[oldest]
