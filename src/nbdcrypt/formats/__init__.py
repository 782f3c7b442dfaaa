"""On-disk formats: recognise an image and open its header.

:func:`probe` names a format from its first bytes; :func:`open_header` hands the file
to that format's reader.  A new format (LUKS2, qcow2) adds a probe rule and an entry
in ``_READERS``.
"""

from nbdcrypt.errors import FormatError, UnsupportedError
from nbdcrypt.formats import luks1

_READERS = {"luks1": luks1.Luks1Header.read}
_LUKS_VERSIONS = {1: "luks1", 2: "luks2"}


def probe(f):
    """``"luks1"``, ``"luks2"`` or None, from the magic and version at the start of ``f``."""
    f.seek(0)
    head = f.read(len(luks1.MAGIC) + 2)
    if len(head) < len(luks1.MAGIC) + 2 or not head.startswith(luks1.MAGIC):
        return None
    return _LUKS_VERSIONS.get(int.from_bytes(head[len(luks1.MAGIC):], "big"))


def open_header(f, name="image"):
    """The checked header of the image open in ``f``; ``name`` is for messages only."""
    fmt = probe(f)
    if fmt in _READERS:
        return _READERS[fmt](f, name)
    if fmt is not None:
        raise UnsupportedError(f"{name}: {fmt.upper()} is not supported yet")
    raise FormatError(f"{name}: not a LUKS image")
