"""LUKS2 keyslots of type ``luks2``: KDF, anti-forensic split, raw area."""

from dataclasses import dataclass

from nbdcrypt.crypto.kdf import ARGON2_TYPES, Kdf
from nbdcrypt.crypto.spec import CipherSpec
from nbdcrypt.errors import FormatError, InputError, UnsupportedError
from nbdcrypt.formats.luks2 import fields
from nbdcrypt.formats.luks2.fields import JsonObject
from nbdcrypt.formats.luks_common import STRIPES, Sealing

MAX_KEY_BYTES = 512  # cryptsetup's own limit on any volume key
AREA_ALIGN = 4096


@dataclass(frozen=True)
class Keyslot:
    id: int
    key_bytes: int  # the master key this slot holds
    sealing: Sealing
    offset: int  # area, in bytes from the start of the header file
    size: int
    priority: int = 1  # 0: ignored when unlocking without a slot number, 2: tried first

    def to_json(self) -> JsonObject:
        kdf = self.sealing.kdf
        kdf_json: JsonObject = {"type": kdf.type}
        if kdf.type == "pbkdf2":
            kdf_json |= {"hash": kdf.hash, "iterations": kdf.time}
        else:
            kdf_json |= {"time": kdf.time, "memory": kdf.memory, "cpus": kdf.cpus}
        kdf_json["salt"] = fields.encode_b64(kdf.salt)
        return {
            "type": "luks2",
            "key_size": self.key_bytes,
            "af": {"type": "luks1", "stripes": self.sealing.stripes, "hash": self.sealing.af_hash},
            "area": {"type": "raw", "offset": str(self.offset), "size": str(self.size),
                     "encryption": str(self.sealing.spec), "key_size": self.sealing.key_bytes},
            "kdf": kdf_json,
        }


def parse(slot_id: int, data: JsonObject, where: str) -> Keyslot:
    """A checked Keyslot from its JSON object; UnsupportedError for other types."""
    kind = fields.text(data, "type", where)
    if kind != "luks2":
        raise UnsupportedError(f"{where} has unsupported type {kind!r}")
    key_bytes = fields.integer(data, "key_size", where, 1, MAX_KEY_BYTES)
    af = fields.obj(data, "af", where)
    if fields.text(af, "type", f"{where} af") != "luks1":
        raise UnsupportedError(f"{where}: unsupported anti-forensic splitter {af['type']!r}")
    stripes = fields.integer(af, "stripes", f"{where} af", 1, STRIPES)
    if stripes != STRIPES:
        raise FormatError(f"{where} has {stripes} anti-forensic stripes, expected {STRIPES}")
    area = fields.obj(data, "area", where)
    if fields.text(area, "type", f"{where} area") != "raw":
        raise UnsupportedError(f"{where}: unsupported area type {area['type']!r}")
    try:
        spec = CipherSpec.parse(fields.text(area, "encryption", f"{where} area"))
        area_key = fields.integer(area, "key_size", f"{where} area", 1, MAX_KEY_BYTES)
        spec.check_key_size(area_key)
    except UnsupportedError as e:
        raise UnsupportedError(f"{where}: {e}") from None
    except InputError as e:
        raise FormatError(f"{where}: {e}") from None
    sealing = Sealing(_kdf(fields.obj(data, "kdf", where), f"{where} kdf"), spec, area_key,
                      fields.text(af, "hash", f"{where} af"), stripes)
    priority = fields.integer(data, "priority", where, 0, 2) if "priority" in data else 1
    offset = fields.u64(area, "offset", f"{where} area")
    size = fields.u64(area, "size", f"{where} area")
    if size < sealing.material_size(key_bytes):
        raise FormatError(f"{where}: area of {size} bytes cannot hold a {8 * key_bytes}-bit key")
    return Keyslot(slot_id, key_bytes, sealing, offset, size, priority)


def _kdf(data, where):
    kind = fields.text(data, "type", where)
    salt = fields.b64(data, "salt", where)
    if kind == "pbkdf2":
        kdf = Kdf(kind, salt, fields.integer(data, "iterations", where), fields.text(data, "hash", where))
    elif kind in ARGON2_TYPES:
        kdf = Kdf(kind, salt, fields.integer(data, "time", where), None,
                  fields.integer(data, "memory", where), fields.integer(data, "cpus", where))
    else:
        raise UnsupportedError(f"{where}: unsupported key derivation {kind!r}")
    kdf.check(where)
    return kdf


def area_size(key_bytes: int) -> int:
    """cryptsetup's area size: the sealed material rounded up to 4 KiB."""
    return -(-key_bytes * STRIPES // AREA_ALIGN) * AREA_ALIGN
