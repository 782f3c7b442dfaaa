"""Which host clusters hold metadata: QEMU's overlap check at its default ("cached")
level, plus the LUKS header.  Every data cluster a lookup finds and every cluster the
allocator hands out is checked here, so neither a lying L2 entry nor a lying refcount
can aim a write at metadata.

Fixed areas (header, L1 table, LUKS header, snapshot table, snapshots' L1 tables) are
merged, sorted intervals searched by bisection; the active L2 tables, refcount blocks
and the refcount table move or grow, and Tables and Refcounts keep them up to date.
L2 tables only snapshots use are not read, as QEMU's default level does not.
"""

import bisect

from nbdcrypt.formats.qcow2.header import Qcow2Header


class Metadata:
    def __init__(self, header: Qcow2Header) -> None:
        cs = header.cluster_size
        self.l2_tables: set[int] = set()  # host offsets of the active L2 tables
        self.refcount_blocks: set[int] = set()  # host offsets
        self.refcount_table = (header.reftable_offset, header.reftable_clusters * cs)
        areas = [("the header", 0, cs), ("the L1 table", header.l1_offset, header.l1_size * 8),
                 ("the LUKS header", header.crypto_offset, header.crypto_length),
                 ("the snapshot table", header.snapshots_offset, header.snapshots_length),
                 *(("a snapshot's L1 table", s.l1_offset, s.l1_size * 8) for s in header.snapshots)]
        self._areas = _merged(sorted((start, start + length, what) for what, start, length in areas if length))
        self._starts = [start for start, _, _ in self._areas]

    def at(self, host: int) -> str | None:
        """What the cluster at ``host`` (a cluster offset) holds, or None."""
        if host in self.l2_tables:
            return "an L2 table"
        if host in self.refcount_blocks:
            return "a refcount block"
        start, length = self.refcount_table
        if start <= host < start + length:
            return "the refcount table"
        i = bisect.bisect_right(self._starts, host) - 1
        # Areas start on cluster boundaries, so a cluster overlaps one iff it starts inside.
        return self._areas[i][2] if i >= 0 and host < self._areas[i][1] else None


def _merged(areas):
    """Sorted (start, end, what) intervals with overlapping ones joined (a hostile image
    may overlap them; the first one's name stays)."""
    merged = []
    for start, end, what in areas:
        if merged and start < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]), merged[-1][2])
        else:
            merged.append((start, end, what))
    return merged
