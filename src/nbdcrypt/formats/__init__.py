"""On-disk formats: recognise an image and open its header.

:func:`probe` names a format from its first bytes; :func:`open_header` hands the file
to that format's reader.  A new format adds a probe rule and an entry in
``_READERS``, whose header class satisfies :class:`~nbdcrypt.formats.image.Image`
(mypy checks it there).  A header may live in its own file (``--header``): headers
are read from the header file and open their volume on the data file's store.
"""

from collections.abc import Callable

from nbdcrypt.errors import FormatError, UnsupportedError
from nbdcrypt.formats import luks1, qcow2
from nbdcrypt.formats.image import Image, ImageFile
from nbdcrypt.formats.luks2 import Luks2Header, binary

__all__ = ["Image", "ImageFile", "open_header", "probe"]

_READERS: dict[str, Callable[[ImageFile, str], Image]] = {
    "luks1": luks1.Luks1Header.read, "luks2": Luks2Header.read, "qcow2": qcow2.Qcow2Image.read}
_LUKS_VERSIONS = {1: "luks1", 2: "luks2"}


def probe(f: ImageFile) -> str | None:
    """``"luks1"``, ``"luks2"``, ``"qcow2"`` or None, from the magic and version at the
    start of ``f``, or, when the start is damaged, a LUKS2 secondary header where
    cryptsetup puts one."""
    if qcow2.probe(f):
        return "qcow2"
    for offset, magic in ((0, luks1.MAGIC), *((o, binary.MAGIC_SECONDARY) for o in binary.HDR_SIZES)):
        f.seek(offset)
        head = f.read(len(magic) + 2)
        if len(head) == len(magic) + 2 and head.startswith(magic):
            return _LUKS_VERSIONS.get(int.from_bytes(head[len(magic):], "big"))
    return None


def open_header(f: ImageFile, name: str = "image") -> Image:
    """The checked header of the image open in ``f``; ``name`` is for messages only."""
    fmt = probe(f)
    if fmt in _READERS:
        return _READERS[fmt](f, name)
    if fmt is not None:
        raise UnsupportedError(f"{name}: {fmt.upper()} is not supported yet")
    raise FormatError(f"{name}: not a LUKS or qcow2 image")
