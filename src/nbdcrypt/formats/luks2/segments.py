"""The LUKS2 data segment: one ``crypt`` segment is all nbdcrypt serves."""

from dataclasses import dataclass

from nbdcrypt.crypto.engine import SECTOR_SIZES
from nbdcrypt.crypto.spec import CipherSpec
from nbdcrypt.errors import FormatError, UnsupportedError
from nbdcrypt.formats.luks2 import fields
from nbdcrypt.formats.luks2.fields import JsonObject


@dataclass(frozen=True)
class Segment:
    offset: int  # bytes from the start of the data file
    size: int | None  # None: "dynamic", up to the end of the data file
    iv_tweak: int
    spec: CipherSpec
    sector_size: int

    def to_json(self) -> JsonObject:
        return {"type": "crypt", "offset": str(self.offset),
                "size": "dynamic" if self.size is None else str(self.size),
                "iv_tweak": str(self.iv_tweak), "encryption": str(self.spec),
                "sector_size": self.sector_size}


def parse(data: JsonObject, where: str) -> Segment:
    kind = fields.text(data, "type", where)
    if kind != "crypt":
        raise UnsupportedError(f"{where} has unsupported type {kind!r}")
    if "integrity" in data:
        raise UnsupportedError(f"{where}: integrity (AEAD) segments are not supported")
    flags = data.get("flags", [])
    if flags:
        raise UnsupportedError(f"{where}: segment flags {flags!r} are not supported")
    encryption = fields.text(data, "encryption", where)
    try:
        spec = CipherSpec.parse(encryption)
    except UnsupportedError as e:
        raise UnsupportedError(f"{where}: {e}") from None
    sector_size = fields.integer(data, "sector_size", where, 512, 4096)
    if sector_size not in SECTOR_SIZES:
        raise FormatError(f"{where}: sector size {sector_size} is not one of {SECTOR_SIZES}")
    offset = fields.u64(data, "offset", where)
    size = None if data.get("size") == "dynamic" else fields.u64(data, "size", where)
    iv_tweak = fields.u64(data, "iv_tweak", where)
    for value, name in ((offset, "offset"), (size or 0, "size")):
        if value % sector_size:
            raise FormatError(f"{where}: {name} {value} is not a multiple of the sector size {sector_size}")
    return Segment(offset, size, iv_tweak, spec, sector_size)
