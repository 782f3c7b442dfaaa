"""The contract of a served block device: what the nbdkit plugin (and ``info``,
``format``) may ask of an opened volume, LUKS or qcow2 alike.

Offsets and counts are plaintext bytes; any byte range inside ``size`` is allowed
(the device widens to its sectors).  Capabilities are declared by each device
class (``can_trim``, ``can_extents``), never probed: a device that declares one
false still has the method, and it raises UnsupportedError (ENOTSUP).
"""

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from typing_extensions import Buffer  # typeshed's; not needed at run time

Extent = tuple[int, int, int]  # (offset, length, type: nbdkit's EXTENT_HOLE/EXTENT_ZERO bits)


class BlockDevice(Protocol):
    size: int  # plaintext bytes
    readonly: bool
    sector_size: int  # the smallest write that needs no read-modify-write
    can_trim: bool  # trim frees or unmaps something
    can_extents: bool  # extents reports holes and zeros (otherwise: all data)

    def read(self, buf: "Buffer", offset: int) -> None:
        """Fill the writable buffer ``buf`` with the plaintext at ``offset``."""

    def write(self, data: "Buffer", offset: int, fua: bool = False) -> None:
        """Store ``data`` at ``offset``; with ``fua`` it is durable on return."""

    def zero(self, count: int, offset: int, fua: bool = False) -> None:
        """Make ``count`` bytes at ``offset`` read as zeros."""

    def trim(self, count: int, offset: int, fua: bool = False) -> None:
        """Discard ``count`` bytes at ``offset`` (their contents become undefined)."""

    def flush(self) -> None:
        """Make every acknowledged write durable."""

    def extents(self, count: int, offset: int) -> list[Extent]:
        """The extents covering ``count`` bytes at ``offset``, in order."""

    def close(self) -> None:
        """Release the store (and its image lock) and the device's queueing layer."""
