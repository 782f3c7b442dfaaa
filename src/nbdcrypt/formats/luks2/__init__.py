"""LUKS2 (cryptsetup docs/LUKS2-format.txt), one module per on-disk structure:

* :mod:`.binary`: the binary header of each copy, its checksum;
* :mod:`.fields`: typed, bounded access to JSON values;
* :mod:`.keyslots`, :mod:`.digests`, :mod:`.segments`: the JSON objects;
* :mod:`.header`: both copies, validation, unlocking, keyslot changes;
* :mod:`.format`: new headers laid out as cryptsetup's.
"""

from nbdcrypt.formats.luks2.format import format_luks2
from nbdcrypt.formats.luks2.header import Luks2Header

__all__ = ["Luks2Header", "format_luks2"]
