"""The LUKS2 binary header: 4096 bytes at the start of each header copy.

Layout from cryptsetup's docs/LUKS2-format.txt.  The checksum covers the whole
copy (binary header plus JSON area, ``hdr_size`` bytes) with the checksum field
zeroed.  The primary copy sits at 0, the secondary at ``hdr_size``; when the
primary is unreadable the secondary is looked for at every offset cryptsetup can
put it.
"""

import hmac
import struct
from dataclasses import dataclass, replace

from nbdcrypt.crypto.kdf import hash_factory
from nbdcrypt.errors import FormatError, InputError, UnsupportedError

MAGIC_PRIMARY = b"LUKS\xba\xbe"
MAGIC_SECONDARY = b"SKUL\xba\xbe"
VERSION = 2
BINARY_SIZE = 4096
# Allowed sizes of one copy (binary header + JSON), which are also the secondary's offsets.
HDR_SIZES = tuple(16384 << i for i in range(9))  # 16 KiB .. 4 MiB

# magic, version, hdr_size, seqid, label, checksum_alg, salt, uuid, subsystem,
# hdr_offset, padding, csum; then padding to 4096.
_LAYOUT = struct.Struct(">6sHQQ48s32s64s40s48sQ184s64s")
CSUM_OFFSET = 448
CSUM_SIZE = 64


@dataclass(frozen=True)
class BinaryHeader:
    hdr_size: int
    seqid: int
    label: str
    checksum_alg: str
    salt: bytes
    uuid: str
    subsystem: str
    hdr_offset: int

    @property
    def json_size(self) -> int:
        return self.hdr_size - BINARY_SIZE

    def pack(self, json_area: bytes) -> bytes:
        """The ``hdr_size`` bytes of this copy, checksummed."""
        if len(json_area) != self.json_size:
            raise ValueError(f"JSON area is {len(json_area)} bytes, expected {self.json_size}")
        magic = MAGIC_PRIMARY if self.hdr_offset == 0 else MAGIC_SECONDARY
        fields = _LAYOUT.pack(magic, VERSION, self.hdr_size, self.seqid, _encode(self.label, 48),
                              _encode(self.checksum_alg, 32), self.salt, _encode(self.uuid, 40),
                              _encode(self.subsystem, 48), self.hdr_offset, bytes(184), bytes(CSUM_SIZE))
        area = bytearray(fields.ljust(BINARY_SIZE, b"\0") + json_area)
        digest = checksum(self.checksum_alg, area)
        area[CSUM_OFFSET:CSUM_OFFSET + len(digest)] = digest
        return bytes(area)

    def at(self, hdr_offset: int, seqid: int) -> "BinaryHeader":
        return replace(self, hdr_offset=hdr_offset, seqid=seqid)


def checksum(alg: str, area: bytes | bytearray) -> bytes:
    """The checksum of a copy whose checksum field is zero."""
    h = hash_factory(alg)()
    h.update(area)
    return h.digest()


def parse(area: bytes, offset: int) -> tuple[BinaryHeader, bytes]:
    """``(BinaryHeader, json_area)`` from the ``hdr_size`` bytes of the copy at
    ``offset``, after checking magic, version, size, location and checksum."""
    if len(area) < BINARY_SIZE:
        raise FormatError("truncated")
    (magic, version, hdr_size, seqid, label, alg, salt, uuid, subsystem, hdr_offset, _,
     csum) = _LAYOUT.unpack_from(area)
    if magic != (MAGIC_PRIMARY if offset == 0 else MAGIC_SECONDARY):
        raise FormatError("bad magic")
    if version != VERSION:
        raise FormatError(f"version {version}")
    if hdr_size not in HDR_SIZES:
        raise FormatError(f"invalid header size {hdr_size}")
    if hdr_offset != offset:
        raise FormatError(f"says it is at offset {hdr_offset}")
    if len(area) < hdr_size:
        raise FormatError("truncated")
    header = BinaryHeader(hdr_size, seqid, _decode(label), _decode(alg), salt, _decode(uuid),
                          _decode(subsystem), hdr_offset)
    try:
        zeroed = bytearray(area[:hdr_size])
        zeroed[CSUM_OFFSET:CSUM_OFFSET + CSUM_SIZE] = bytes(CSUM_SIZE)
        digest = checksum(header.checksum_alg, zeroed)
    except UnsupportedError:
        raise UnsupportedError(f"unsupported checksum {header.checksum_alg}") from None
    if not hmac.compare_digest(digest, csum[:len(digest)]):
        raise FormatError("checksum mismatch")
    return header, bytes(area[BINARY_SIZE:hdr_size])


def peek_size(head: bytes) -> int | None:
    """The ``hdr_size`` a binary header claims, or None if it is not a plausible copy."""
    if len(head) < _LAYOUT.size or head[:6] not in (MAGIC_PRIMARY, MAGIC_SECONDARY):
        return None
    size = int.from_bytes(head[8:16], "big")
    return size if size in HDR_SIZES else None


def _decode(raw):
    text, _, _ = raw.partition(b"\0")
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError("a string field is not UTF-8") from None


def _encode(text, size):
    raw = text.encode("utf-8")
    if len(raw) >= size:
        raise InputError(f"{text!r} does not fit a {size}-byte LUKS2 header field")
    return raw.ljust(size, b"\0")
