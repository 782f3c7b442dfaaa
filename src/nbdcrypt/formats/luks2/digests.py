"""LUKS2 digests: how a candidate master key is recognised (type pbkdf2 only)."""

import hmac
from dataclasses import dataclass

from nbdcrypt.crypto.kdf import Kdf
from nbdcrypt.errors import UnsupportedError
from nbdcrypt.formats.image import Key
from nbdcrypt.formats.luks2 import fields
from nbdcrypt.formats.luks2.fields import JsonObject

MAX_DIGEST = 64  # bytes: cryptsetup's limit; a longer one only multiplies the PBKDF2 work


@dataclass(frozen=True)
class Digest:
    id: int
    keyslots: tuple[int, ...]
    segments: tuple[int, ...]
    kdf: Kdf
    digest: bytes

    def matches(self, key: Key) -> bool:
        candidate = self.kdf.derive(key, len(self.digest))
        try:
            return hmac.compare_digest(candidate, self.digest)
        finally:
            candidate[:] = bytes(len(candidate))

    def to_json(self) -> JsonObject:
        return {"type": "pbkdf2", "keyslots": [str(k) for k in self.keyslots],
                "segments": [str(s) for s in self.segments], "hash": self.kdf.hash,
                "iterations": self.kdf.time, "salt": fields.encode_b64(self.kdf.salt),
                "digest": fields.encode_b64(self.digest)}


def parse(digest_id: int, data: JsonObject, where: str) -> Digest:
    kind = fields.text(data, "type", where)
    if kind != "pbkdf2":
        raise UnsupportedError(f"{where} has unsupported type {kind!r}")
    kdf = Kdf("pbkdf2", fields.b64(data, "salt", where), fields.integer(data, "iterations", where),
              fields.text(data, "hash", where))
    kdf.check(where)
    return Digest(digest_id, tuple(fields.ids(data, "keyslots", where)),
                  tuple(fields.ids(data, "segments", where)), kdf, fields.b64(data, "digest", where, MAX_DIGEST))
