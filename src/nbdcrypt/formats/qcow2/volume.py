"""The plaintext block device of a qcow2 image.

Requests are cut at cluster boundaries and clusters with like mappings merged into
runs (host-contiguous data, zeros, holes).  Reads and writes of data clusters that
are allocated and unshared (COPIED) go straight to the file, sector by sector
through the cipher, in parallel.  Anything else — a new cluster, a zero or
compressed cluster, one shared with a snapshot, a new or shared L2 table — goes
through :meth:`Qcow2Volume._rewrite` under one metadata lock, in crash-safe order:

1. allocate clusters, write their refcounts (a new refcount block is flushed before
   the refcount table entry naming it);
2. write the data (whole clusters: old contents patched with the new bytes) and new
   L2 tables;
3. flush, so refcounts, copied old contents and new tables are on disk before anything
   points at them (skipped when nothing was allocated and nothing copied: QEMU's COW
   regions), then write L2 entries and the L1 entries of new tables;
4. flush, then drop the references the old mappings held.

FUA as on LUKS: a write in place makes its data durable by itself (RWF_DSYNC on the
data write, no flush); a write that changed metadata is followed by a flush.

Discard (trim) and write-zeroes of whole clusters take the same path with no data:
their L2 entries change, are flushed, and only then do the host clusters they held
lose a reference (freed at 0; a snapshot's cluster just loses the active image's).
A crash leaves at worst leaked clusters.  A range lock over whole guest clusters
keeps concurrent requests on the same cluster apart, so a mapping read under the
metadata lock stays true while its data is read or written outside it.
"""

import threading
from typing import TYPE_CHECKING

import numpy as np

from nbdcrypt.crypto.engine import SectorCipher
from nbdcrypt.datapath.device import Extent
from nbdcrypt.datapath.queueing import CryptPath
from nbdcrypt.datapath.sectors import SectorIO, write_zeros
from nbdcrypt.datapath.volume import RangeLock
from nbdcrypt.errors import FormatError, ReadOnlyError, UnsupportedError
from nbdcrypt.formats.qcow2.backing import Backing
from nbdcrypt.formats.qcow2.compress import decompress
from nbdcrypt.formats.qcow2.header import AUTOCLEAR_OFFSET, CRYPT_LUKS, SECTOR_SIZE, Qcow2Header
from nbdcrypt.formats.qcow2.metadata import Metadata
from nbdcrypt.formats.qcow2.refcounts import Refcounts
from nbdcrypt.formats.qcow2.tables import (
    COMPRESSED_DATA,
    COPIED,
    NORMAL,
    UNALLOCATED,
    ZERO,
    ZERO_ALLOC,
    ZERO_PLAIN,
    Mapping,
    Tables,
)
from nbdcrypt.storage.store import Store

if TYPE_CHECKING:
    from typing_extensions import Buffer  # typeshed's; not needed at run time

EXTENT_HOLE, EXTENT_ZERO = 1, 2


class Qcow2Volume:
    """``size`` plaintext bytes; ``cipher`` None: unencrypted; ``backing`` None:
    unallocated clusters read as zeros;
    ``path`` is the export's queueing layer, where data crypto runs (default: a new
    one), shared with the backing chain."""

    sector_size = SECTOR_SIZE
    can_trim = True  # discarded clusters are freed
    can_extents = True  # holes and zero clusters are known

    def __init__(self, header: Qcow2Header, store: Store, cipher: SectorCipher | None, backing: Backing | None = None,
                 path: CryptPath | None = None) -> None:
        self.header, self.store, self.cipher, self.backing = header, store, cipher, backing
        self.path = CryptPath() if path is None else path
        self.name = header.name
        self.size = header.size
        self.readonly = store.readonly
        self._cs = header.cluster_size
        self._iv_by_host = header.crypt_method == CRYPT_LUKS
        file_size = store.size()
        self._metadata = Metadata(header)
        self._tables = Tables(header, store, file_size, self._metadata)
        self._refcounts = Refcounts(header, store, file_size, self._metadata)
        self._meta = threading.Lock()
        self._ranges = RangeLock()
        self._io = SectorIO(self.path, cipher, store, SECTOR_SIZE)
        if not self.readonly:
            self._open_for_writing()

    def _open_for_writing(self):
        refusal = self.header.write_refusal()
        if refusal:
            raise UnsupportedError(f"{self.name}: qcow2 image {refusal}")
        if self.header.autoclear:
            # Bitmaps and other autoclear extensions go stale as we write: say so, as QEMU does.
            self.store.write(bytes(8), AUTOCLEAR_OFFSET)
            self.store.flush()

    # -- the block device ----------------------------------------------------------

    def read(self, buf: "Buffer", offset: int) -> None:
        """Fill the writable buffer ``buf`` with the plaintext at ``offset``."""
        view = memoryview(buf).cast("B")
        with self.path.request("read", len(view)), \
                self._ranges(*self._clusters_around(offset, len(view)), exclusive=False):
            for guest, length, mapping in self._runs(offset, len(view)):
                self._read_run(view[guest - offset:guest - offset + length], guest, mapping)

    def write(self, data: "Buffer", offset: int, fua: bool = False) -> None:
        view = memoryview(data).cast("B")
        self._check_writable()
        with self.path.request("write", len(view)), \
                self._ranges(*self._clusters_around(offset, len(view)), exclusive=True):
            runs = self._runs(offset, len(view))
            if all(m.kind == NORMAL and m.copied for _, _, m in runs):
                # Data in place, no metadata: FUA is the data write's own (RWF_DSYNC).
                for guest, length, m in runs:
                    self._write_data(view[guest - offset:guest - offset + length], m.host, guest, fua)
                return
            with self._meta:
                self._rewrite(offset, len(view), view)
        if fua:
            self.store.flush()  # the data and the metadata that points at it

    def zero(self, count: int, offset: int, fua: bool = False) -> None:
        """Write zeros; whole clusters of a v3 image become zero clusters (no data written)."""
        self._check_writable()
        end = offset + count
        first, last = self._whole_clusters(offset, end) if self.header.version >= 3 else (end, end)
        with self.path.request("write", count):
            write_zeros(self.write, offset, first - offset, fua)
            if first < last:
                with self._ranges(first, last, exclusive=True), self._meta:
                    self._rewrite(first, last - first, None)
            write_zeros(self.write, last, end - last, fua)
        if fua and first < last:
            self.store.flush()

    def trim(self, count: int, offset: int, fua: bool = False) -> None:
        """Discard, as QEMU does: whole clusters lose their mapping (v3 with a backing
        file: zero clusters, so the backing data stays hidden) and their host clusters
        a reference; partial clusters are left as they are."""
        self._check_writable()
        first, last = self._whole_clusters(offset, offset + count)
        if first < last:
            with self._ranges(first, last, exclusive=True), self._meta:
                self._rewrite(first, last - first, None, discard=True)
        if fua:
            self.store.flush()

    def flush(self) -> None:
        self.store.flush()

    def close(self) -> None:
        """Release the image and its backing chain (and their image locks); the
        queueing layer they share is closed by whichever closes first."""
        self.path.close()
        self.store.close()
        if self.backing is not None:
            self.backing.close()

    def __enter__(self) -> "Qcow2Volume":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def extents(self, count: int, offset: int) -> list[Extent]:
        """[(offset, length, type)] with nbdkit's EXTENT_HOLE/EXTENT_ZERO bits."""
        out: list[Extent] = []
        for guest, length, m in self._runs(offset, count):
            kind = _extent_type(m, self.backing is not None)
            if out and out[-1][2] == kind:
                out[-1] = (out[-1][0], out[-1][1] + length, kind)
            else:
                out.append((guest, length, kind))
        return out

    # -- mapping -------------------------------------------------------------------

    def _clusters_around(self, offset: int, length: int) -> tuple[int, int]:
        cs = self._cs
        return offset // cs * cs, -(-(offset + length) // cs) * cs

    def _whole_clusters(self, offset, end):
        """The whole clusters inside [offset, end) (the image's last one counts as whole
        up to the virtual size); (end, end) if there are none."""
        cs = self._cs
        first = -(-offset // cs) * cs
        last = end if end == self.size else end // cs * cs
        return (first, last) if first < last else (end, end)

    def _lookup(self, cluster):
        """The checked mapping of one guest cluster (call under the metadata lock)."""
        m = self._tables.lookup(cluster)
        end = self._refcounts.end * self._cs
        if m.kind in (NORMAL, ZERO_ALLOC, COMPRESSED_DATA):
            length = self._cs if m.kind != COMPRESSED_DATA else 1
            if m.host < self._cs or m.host + length > end or m.kind != COMPRESSED_DATA and m.host % self._cs:
                raise FormatError(f"{self.name}: guest cluster {cluster} maps to {m.host:#x}, "
                                  f"outside the image's data")
            if m.kind != COMPRESSED_DATA and (metadata := self._metadata.at(m.host)):
                raise FormatError(f"{self.name}: guest cluster {cluster} maps to {m.host:#x}, "
                                  f"which holds {metadata}")
        return m

    def _runs(self, offset, length):
        """[(guest offset, length, mapping)] covering the range; neighbours merge when
        both read the same way (data: contiguous on the host too)."""
        cs, runs = self._cs, []
        with self._meta:
            pos, end = offset, offset + length
            while pos < end:
                m = self._lookup(pos // cs)
                piece = min(end, (pos // cs + 1) * cs) - pos
                if m.kind == NORMAL:
                    m = Mapping(NORMAL, m.host + pos % cs, copied=m.copied)
                if runs and _follows(runs[-1], m):
                    runs[-1] = (runs[-1][0], runs[-1][1] + piece, runs[-1][2])
                else:
                    runs.append((pos, piece, m))
                pos += piece
        return runs

    # -- data ----------------------------------------------------------------------

    def _read_run(self, view, guest, m):
        if m.kind == NORMAL:
            self._read_data(view, m.host, guest)
        elif m.kind == COMPRESSED_DATA:
            cluster = self._decompress(m)
            start = guest % self._cs
            view[:] = cluster[start:start + len(view)]
        elif m.kind == UNALLOCATED and self.backing is not None:
            self.backing.read(view, guest)
        else:
            view[:] = bytes(len(view))

    def _iv_sector(self, host, guest):
        """The IV sector of the sector holding ``host`` (guest offset ``guest``): QEMU's
        LUKS IVs count host sectors, legacy AES IVs guest sectors."""
        return (host if self._iv_by_host else guest) // SECTOR_SIZE

    def _read_data(self, view, host, guest):
        self._io.read(view, host, self._iv_sector(host, guest))

    def _write_data(self, data, host, guest, fua=False):
        self._io.write(data, host, self._iv_sector(host, guest), fua)

    def _decompress(self, m):
        data = bytearray(max(0, min(m.length, self.store.size() - m.host)))
        self.store.read_into(data, m.host)
        return decompress(data, self._cs, self.header.compression_type, self.name)

    def _check_writable(self):
        if self.readonly:
            raise ReadOnlyError(f"{self.name}: image is read-only")

    # -- allocating writes (under the metadata lock) -----------------------------------

    def _rewrite(self, offset, length, data, discard=False):
        """Write ``data`` at ``offset``, allocating and copying as needed; with ``data``
        None turn the whole clusters of the range into zero clusters, or drop them
        (``discard``)."""
        cs = self._cs
        entries, fills, in_place, dropped = {}, [], [], []
        copied = False  # whether any new cluster holds old contents (QEMU's COW regions)
        for cluster in range(offset // cs, -(-(offset + length) // cs)):
            m = self._lookup(cluster)
            lo, hi = max(offset, cluster * cs), min(offset + length, (cluster + 1) * cs)
            keep = m.in_place and not discard  # the host cluster stays this guest cluster's
            if data is None:
                entry = self._discarded(m) if discard else self._zeroed(m)
                if entry is None:
                    continue
                entries[cluster] = entry
            elif m.kind == NORMAL and m.copied:
                in_place.append((data[lo - offset:hi - offset], m.host + lo % cs, lo))
                continue
            else:
                plain = bytearray(cs)
                if hi - lo < cs:
                    self._read_run(memoryview(plain), cluster * cs, m)
                    copied = True
                plain[lo % cs:lo % cs + hi - lo] = data[lo - offset:hi - offset]
                fills.append((cluster, plain, m.host if keep else None))
            if not keep:
                dropped += _references(m, cs)
        if not entries and not fills:
            for piece in in_place:
                self._write_data(*piece)
            return
        self._refcounts.check_release(dropped)  # a corrupt refcount: fail before any write
        tables = self._l2_tables_to_write(set(entries) | {c for c, _, _ in fills})
        hosts, allocated = self._allocate(tables, fills)
        for (cluster, plain, _), host in zip(fills, hosts, strict=True):
            self.path.write(self.cipher, self.store, plain, host, self._iv_sector(host, cluster * cs))
            entries[cluster] = host | COPIED
        for piece in in_place:
            self._write_data(*piece)
        self._write_new_tables(tables, entries)
        if allocated or copied:
            # One flush for every dependency: the new clusters' refcounts, the old contents
            # copied into them and new L2 tables reach the disk before anything points at them.
            self.store.flush()
        dropped += self._link_l2(tables, entries)
        if dropped:
            self.store.flush()  # no reference may drop before its replacement is on disk
            for ref in dropped:
                self._refcounts.release(*ref)
            self._refcounts.commit()

    def _zeroed(self, m):
        """The L2 entry that makes a cluster read as zeros (None: it does already)."""
        if m.kind in (ZERO_PLAIN, ZERO_ALLOC) or m.kind == UNALLOCATED and self.backing is None:
            return None
        return (m.host | COPIED | ZERO) if m.in_place else ZERO

    def _discarded(self, m):
        """The L2 entry of a discarded cluster (None: nothing to drop), as QEMU's
        discard_in_l2_slice: unallocated, or a zero cluster where v3 can keep a
        backing file's data hidden (v2 lets it show through)."""
        entry = ZERO if self.backing is not None and self.header.version >= 3 else 0
        if m.kind == ZERO_PLAIN or m.kind == UNALLOCATED and entry == 0:
            return None
        return entry

    def _l2_tables_to_write(self, clusters):
        """{L1 index: [old L2 offset, new L2 offset or None]}: None keeps the old table;
        a table that is missing or shared gets a new one (filled in by _allocate)."""
        tables = {}
        for l1_index in sorted({c // self._tables.l2_entries for c in clusters}):
            old, copied = self._tables.l2_location(l1_index)
            tables[l1_index] = [old, None if old and copied else 0]
        return tables

    def _allocate(self, tables, fills):
        """(host offsets of the fills, whether any cluster was allocated): new L2 tables
        and data clusters, their refcounts written (not flushed)."""
        cs = self._cs
        new_tables = [slot for slot in tables.values() if slot[1] == 0]
        new = iter(self._refcounts.allocate(len(new_tables) + sum(host is None for _, _, host in fills)))
        for slot in new_tables:
            slot[1] = next(new) * cs
        hosts = [host if host is not None else next(new) * cs for _, _, host in fills]
        self._refcounts.commit()
        self._tables.file_size = self._refcounts.end * cs
        return hosts, bool(new_tables) or any(host is None for _, _, host in fills)

    def _write_new_tables(self, tables, entries):
        """Write the new L2 tables (copies of the old ones, or empty, with ``entries``
        applied); nothing points at them yet."""
        for l1_index, (old, new) in tables.items():
            if new is not None:
                table = self._tables.table(old).copy() if old else np.zeros(self._tables.l2_entries, np.uint64)
                for index, value in self._updates(entries, l1_index).items():
                    table[index] = value
                self._tables.write_table(new, table)

    def _link_l2(self, tables, entries):
        """Point the kept L2 tables' entries and the L1 entries of new tables at their new
        mappings; returns the references old L2 tables held (to drop once this is on disk)."""
        for l1_index, (old, new) in tables.items():
            if new is None:
                self._tables.set_entries(old, self._updates(entries, l1_index))
            else:
                self._tables.set_l1(l1_index, new | COPIED)
        return [(old, self._cs) for old, new in tables.values() if new is not None and old]

    def _updates(self, entries, l1_index):
        """{L2 index: entry} of the ``entries`` {guest cluster: entry} under one L1 entry."""
        per_table = self._tables.l2_entries
        return {c % per_table: e for c, e in entries.items() if c // per_table == l1_index}


def _follows(run, m):
    """Whether mapping ``m`` continues ``run`` (guest offset, length, mapping)."""
    _, length, prev = run
    if prev.kind != m.kind:
        return False
    if m.kind == NORMAL:
        return prev.copied == m.copied and prev.host + length == m.host
    return m.kind != COMPRESSED_DATA


def _references(m, cluster_size):
    """The (offset, length) host ranges whose refcounts mapping ``m`` holds."""
    if m.kind in (NORMAL, ZERO_ALLOC):
        return [(m.host, cluster_size)]
    if m.kind == COMPRESSED_DATA:
        return [(m.host, m.length)]
    return []


def _extent_type(m, has_backing):
    if m.kind in (ZERO_PLAIN, ZERO_ALLOC):
        return EXTENT_ZERO | (EXTENT_HOLE if m.kind == ZERO_PLAIN else 0)
    if m.kind == UNALLOCATED and not has_backing:
        return EXTENT_HOLE | EXTENT_ZERO
    return 0
