"""LUKS header backups, byte for byte as cryptsetup's luksHeaderBackup writes them.

A backup holds the header and its keyslot areas from the start of the header file:
LUKS1 up to the end of the last keyslot's material, padded with zeros to whole
4 KiB, the rest of the header's first 4 KiB zeroed (cryptsetup does so that no old
signature survives); LUKS2 both header copies and the whole keyslots area.

A restore writes that span back as cryptsetup's luksHeaderRestore does, and refuses
what cryptsetup refuses: a backup whose data offset or header and keyslot sizes
differ from the image's.  It also refuses a backup of another volume (UUID) or an
image without a readable LUKS header unless forced.  The keyslot areas are written
first and the header last (LUKS2: the secondary copy, then the primary), each durable
before the next: a restore cut short by a crash is finished by running it again.
"""

from typing import IO

from nbdcrypt.errors import FormatError, InputError, UnsupportedError
from nbdcrypt.formats import open_header, probe
from nbdcrypt.formats.image import Image, ImageFile
from nbdcrypt.formats.luks1 import HEADER_SIZE, SECTOR_SIZE, Luks1Header
from nbdcrypt.formats.luks2 import Luks2Header
from nbdcrypt.formats.luks_common import Writes

PAGE = 4096  # cryptsetup pads a backup to whole pages
LuksHeader = Luks1Header | Luks2Header


def require_luks(header: Image, what: str) -> LuksHeader:
    """``header``, refused in one line for ``what`` (a command) unless it is LUKS."""
    if not isinstance(header, Luks1Header | Luks2Header):
        raise _only_luks(header.name, what)
    return header


def _only_luks(name: str, what: str) -> InputError:
    return InputError(f"{name}: {what} takes LUKS images only; a qcow2 image keeps its LUKS header "
                      f"inside the image")


def backup(f: ImageFile, image: Image) -> bytes:
    """The bytes of a backup of the header ``image``, read from its file ``f``."""
    header = require_luks(image, "header backup")
    end = _end(header)
    f.seek(0)
    data = bytearray(f.read(end))
    if isinstance(header, Luks1Header) and header.keyslots[0].offset * SECTOR_SIZE == PAGE:
        data[HEADER_SIZE:PAGE] = bytes(PAGE - HEADER_SIZE)
    return bytes(data) + bytes(-end % PAGE)


def restore_writes(source: IO[bytes], backup_image: Image, target: IO[bytes], name: str,
                   force: bool = False) -> Writes:
    """The ``(offset, data)`` writes, in order, that restore the backup read from
    ``source`` (its header ``backup_image``) onto the header file ``target`` (``name``
    in messages); InputError for a backup that does not belong there."""
    backup_header = require_luks(backup_image, "header restore")
    if probe(target) == "qcow2":
        raise _only_luks(name, "header restore")
    current = _readable_header(target, name)
    if current is None:
        if not force:
            raise InputError(f"{name}: holds no readable LUKS header to check the backup against; "
                             f"--force restores it anyway")
    else:
        _check_fits(backup_header, current, name, force)
    source.seek(0)
    data = source.read(_end(backup_header))  # reading the header checked the file holds it all
    return [(start, data[start:end]) for start, end in _pieces(backup_header)]


def _readable_header(f: IO[bytes], name: str) -> LuksHeader | None:
    try:
        return require_luks(open_header(f, name), "header restore")
    except (FormatError, UnsupportedError):
        return None


def _check_fits(backup_header: LuksHeader, current: LuksHeader, name: str, force: bool) -> None:
    if current.payload_offset != backup_header.payload_offset:
        raise InputError(f"{name}: data offset differs on the image ({current.payload_offset}) and in the "
                         f"backup ({backup_header.payload_offset}); restore refused")
    if type(current) is not type(backup_header):
        if not force:
            raise InputError(f"{name}: holds a {_kind(current)} header, the backup a {_kind(backup_header)} "
                             f"one; --force restores it anyway")
        return
    if _end(current) != _end(backup_header):
        raise InputError(f"{name}: header and keyslot areas differ in size on the image ({_end(current)} "
                         f"bytes) and in the backup ({_end(backup_header)}); restore refused")
    if current.uuid != backup_header.uuid and not force:
        raise InputError(f"{name}: the backup is of another volume (UUID {backup_header.uuid}, the image's "
                         f"{current.uuid}); --force restores it anyway")


def _kind(header: LuksHeader) -> str:
    return "LUKS1" if isinstance(header, Luks1Header) else "LUKS2"


def _pieces(header: LuksHeader) -> list[tuple[int, int]]:
    """The ``(start, end)`` byte ranges a restore writes, in order: keyslot areas first,
    the header last (LUKS2: the secondary copy before the primary)."""
    if isinstance(header, Luks1Header):
        first_area = min(slot.offset for slot in header.keyslots) * SECTOR_SIZE
        return [(first_area, _end(header)), (0, first_area)]
    size = header.binary.hdr_size
    return [(2 * size, _end(header)), (size, 2 * size), (0, size)]


def _end(header: LuksHeader) -> int:
    """Where the header and its keyslot areas end (cryptsetup's backup size, unpadded)."""
    if isinstance(header, Luks1Header):
        return (max(slot.offset for slot in header.keyslots) + header.keyslot_sectors) * SECTOR_SIZE
    return header.metadata_size + header.keyslots_size
