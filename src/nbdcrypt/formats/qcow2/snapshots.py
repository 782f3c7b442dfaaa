"""The internal snapshot table, read-only: what ``qemu-img snapshot -l`` lists.

Each entry (QEMU's docs/interop/qcow2.txt, "Snapshots") is 40 fixed bytes, extra
data (a 64-bit VM state size, the disk size, the instruction count), the ID and the
name, padded to 8 bytes.  Every entry is checked as QEMU's qcow2_read_snapshots
does, and its L1 table must lie inside the file.
"""

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from nbdcrypt.errors import FormatError
from nbdcrypt.formats.image import ImageFile

# L1 offset and entries, ID and name lengths, date (s, ns), VM clock (ns),
# VM state size, extra data size.
ENTRY_FIELDS = struct.Struct(">QIHHIIQII")
MAX_EXTRA_BYTES = 1024  # QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA
MAX_TABLE_BYTES = 1024 * 65536  # QEMU's QCOW_MAX_SNAPSHOTS_SIZE
NO_ICOUNT = (1 << 64) - 1


@dataclass(frozen=True)
class Snapshot:
    id: str
    name: str
    l1_offset: int
    l1_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    icount: int | None

    def info(self) -> dict[str, object]:
        """The columns of ``qemu-img snapshot -l`` (date in local time, as there)."""
        seconds, ms = divmod(self.vm_clock_nsec // 1_000_000, 1000)
        clock = f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}.{ms:03d}"
        return {"id": self.id, "name": self.name, "vm_size": self.vm_state_size,
                "date": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.date_sec)),
                "vm_clock": clock, "icount": self.icount}


def read_snapshots(f: ImageFile, start: int, count: int, file_size: int, image: str,
                   check_area: Callable[[str, int, int], None]) -> tuple[tuple[Snapshot, ...], int]:
    """(snapshots, the table's length in bytes) of the ``count`` entries at ``start`` of
    the image ``image`` open in ``f``; ``check_area(what, offset, length)`` checks a
    metadata area against the file."""
    snapshots, offset = [], start
    for _ in range(count):
        fixed = _read(f, offset, ENTRY_FIELDS.size, file_size, image)
        (l1_offset, l1_size, id_size, name_size, date_sec, date_nsec, clock, vm_state,
         extra_size) = ENTRY_FIELDS.unpack(fixed)
        if extra_size > MAX_EXTRA_BYTES:
            raise FormatError(f"{image}: snapshot with {extra_size} bytes of extra data")
        rest = _read(f, offset + ENTRY_FIELDS.size, extra_size + id_size + name_size, file_size, image)
        extra, ident = rest[:extra_size], rest[extra_size:extra_size + id_size]
        name = rest[extra_size + id_size:]
        if extra_size >= 8:
            vm_state = int.from_bytes(extra[:8], "big")
        icount = int.from_bytes(extra[16:24], "big") if extra_size >= 24 else NO_ICOUNT
        snapshot = Snapshot(ident.decode(errors="replace"), name.decode(errors="replace"), l1_offset,
                            l1_size, date_sec, date_nsec, clock, vm_state,
                            None if icount == NO_ICOUNT else icount)
        if l1_size:
            check_area(f"snapshot {snapshot.id} L1 table", l1_offset, l1_size * 8)
        snapshots.append(snapshot)
        offset += -(-(len(fixed) + len(rest)) // 8) * 8
        if offset - start > MAX_TABLE_BYTES:
            raise FormatError(f"{image}: snapshot table is larger than {MAX_TABLE_BYTES} bytes")
    return tuple(snapshots), offset - start


def _read(f, offset, length, file_size, name):
    if offset + length > file_size:
        raise FormatError(f"{name}: snapshot table runs past the end of the file")
    f.seek(offset)
    return f.read(length)
