"""A LUKS2 header: both copies read and checked, metadata validated, keys unlocked.

Reading (:meth:`Luks2Header.read`): each copy's binary header, checksum and JSON
syntax decide whether it is valid; the valid copy with the highest seqid wins and
a damaged or stale other copy is reported in ``warnings``.  The winner's metadata
is then validated in full before any key is tried, so no offset or size from the
file is used unchecked.  The parsed JSON document is kept whole, so tokens,
labels and anything unknown survive every rewrite untouched.

Writing (:meth:`Luks2Header.header_writes`): the secondary copy, then the primary,
both with the next seqid; a reader given a crash in between still finds one valid
copy of the old or the new metadata.
"""

import copy
import json
import os
from dataclasses import dataclass, field, replace
from typing import Self

from nbdcrypt.crypto import wipe
from nbdcrypt.crypto.engine import SectorCipher
from nbdcrypt.crypto.kdf import Kdf, new_kdf
from nbdcrypt.crypto.spec import CipherSpec
from nbdcrypt.errors import BadPassphraseError, FormatError, InputError, UnsupportedError
from nbdcrypt.formats.image import ImageFile, Key, Passphrase
from nbdcrypt.formats.luks2 import binary, digests, fields, keyslots, segments
from nbdcrypt.formats.luks2.binary import BINARY_SIZE, HDR_SIZES, BinaryHeader
from nbdcrypt.formats.luks2.fields import JsonObject
from nbdcrypt.formats.luks_common import FileId, Payload, Sealing, Writes, file_id, try_keyslots

MAX_KEYSLOTS = 32
NO_HEADER = "no valid binary header"


@dataclass(frozen=True)
class Luks2Header(Payload):
    binary: BinaryHeader  # of the copy read, as at offset 0
    doc: JsonObject = field(repr=False)  # the whole JSON metadata
    keyslots: dict[int, keyslots.Keyslot]  # by id
    digest: digests.Digest
    segment: segments.Segment
    keyslots_size: int
    name: str = field(default="image", compare=False)
    warnings: tuple[str, ...] = field(default=(), compare=False)
    file_id: FileId | None = field(default=None, compare=False)
    file_size: int = field(default=0, compare=False)

    @property
    def cipher_spec(self) -> CipherSpec:
        return self.segment.spec

    @property
    def sector_size(self) -> int:
        return self.segment.sector_size

    @property
    def payload_offset(self) -> int:
        return self.segment.offset

    @property
    def fixed_payload_size(self) -> int | None:
        return self.segment.size

    @property
    def metadata_size(self) -> int:
        """Both header copies."""
        return 2 * self.binary.hdr_size

    @property
    def uuid(self) -> str:
        return self.binary.uuid

    @property
    def key_bytes(self) -> int | None:
        return self.keyslots[self.digest.keyslots[0]].key_bytes if self.digest.keyslots else None

    # -- reading -------------------------------------------------------------------

    @classmethod
    def read(cls, f: ImageFile, name: str = "image") -> Self:
        """Read, choose and check a header copy of an open binary file."""
        file_size = f.seek(0, os.SEEK_END)
        primary = _read_copy(f, 0)
        offsets = [primary[0].hdr_size] if not isinstance(primary, str) else HDR_SIZES
        for offset in offsets:  # the first place that holds a secondary, valid or not
            secondary = _read_copy(f, offset)
            if secondary != NO_HEADER:
                break
        return cls._choose(primary, secondary, name, file_size, file_id(f))

    @classmethod
    def _choose(cls, primary, secondary, name, file_size, fid=None):
        good = {which: copy_ for which, copy_ in (("primary", primary), ("secondary", secondary))
                if not isinstance(copy_, str)}
        if not good:
            raise FormatError(f"{name}: both LUKS2 header copies are damaged "
                              f"(primary: {primary}; secondary: {secondary})")
        which = max(good, key=lambda w: good[w][0].seqid)
        other = "secondary" if which == "primary" else "primary"
        warnings = []
        if other not in good:
            problem = primary if other == "primary" else secondary
            warnings.append(f"{name}: the {other} LUKS2 header is damaged ({problem}); using the {which}")
        elif good[other][0].seqid != good[which][0].seqid or good[other][1] != good[which][1]:
            warnings.append(f"{name}: the {other} LUKS2 header is stale (seqid {good[other][0].seqid}, "
                            f"{which} {good[which][0].seqid}); using the {which}")
        bin_header, doc = good[which]
        return cls.from_json(bin_header.at(0, bin_header.seqid), doc, name, file_size, tuple(warnings), fid)

    @classmethod
    def from_json(cls, bin_header: BinaryHeader, doc: JsonObject, name: str, file_size: int,
                  warnings: tuple[str, ...] = (), fid: FileId | None = None) -> Self:
        """Validate the metadata ``doc`` against the binary header and the file size."""
        w = f"{name}: LUKS2"
        for key in ("keyslots", "segments", "digests", "tokens", "config"):
            fields.obj(doc, key, w)
        config = doc["config"]
        if fields.u64(config, "json_size", f"{w} config") != bin_header.json_size:
            raise FormatError(f"{w} config json_size does not match the header size {bin_header.hdr_size}")
        keyslots_size = fields.u64(config, "keyslots_size", f"{w} config")
        mandatory = fields.obj(config, "requirements", f"{w} config").get("mandatory", []) \
            if "requirements" in config else []
        if mandatory:
            raise UnsupportedError(f"{name}: LUKS2 requirements {', '.join(map(repr, mandatory))} are not "
                                   f"supported (reencryption in progress?)")
        segs = doc["segments"]
        if list(segs) != ["0"]:
            raise UnsupportedError(f"{name}: LUKS2 with {len(segs)} segments ({', '.join(map(repr, segs))}) is not "
                                   f"supported, only one (reencryption in progress?)")
        segment = segments.parse(fields.obj(segs, "0", f"{w} segments"), f"{w} segment 0")
        slots = {}
        for key, value in doc["keyslots"].items():
            slot_id = fields.object_id(key, f"{w} keyslots", MAX_KEYSLOTS)
            slots[slot_id] = keyslots.parse(slot_id, value if isinstance(value, dict) else {},
                                            f"{w} keyslot {key}")
        digest = _segment_digest(doc["digests"], slots, w)
        header = cls(bin_header, doc, slots, digest, segment, keyslots_size, name, warnings, fid, file_size)
        header.check_layout()
        return header

    def check_layout(self) -> None:
        """Keyslot areas inside the keyslots area and the file, apart; segment after them
        (or at 0, in a detached header's data file).  The segment is checked against the
        data file, which only the volume knows, when the volume opens."""
        w = f"{self.name}: LUKS2"
        area_end = self.metadata_size + self.keyslots_size
        if self.keyslots_size % 4096 or area_end > self.file_size:
            raise FormatError(f"{w} metadata and keyslots area ({area_end} bytes) do not fit the "
                              f"file ({self.file_size} bytes)")
        previous = None
        for slot in sorted(self.keyslots.values(), key=lambda s: s.offset):
            if slot.offset < self.metadata_size or slot.offset + slot.size > area_end:
                raise FormatError(f"{w} keyslot {slot.id} area ({slot.offset}+{slot.size}) is outside "
                                  f"the keyslots area ({self.metadata_size}-{area_end})")
            if previous and slot.offset < previous.offset + previous.size:
                raise FormatError(f"{w} keyslot {slot.id} area overlaps keyslot {previous.id}")
            previous = slot
        if 0 < self.payload_offset < area_end:
            raise FormatError(f"{w} data offset {self.payload_offset} overlaps the keyslots area "
                              f"(ends at {area_end})")

    # -- keys ----------------------------------------------------------------------

    def unlock(self, passphrase: Passphrase, f: ImageFile, slot: int | None = None) -> bytearray:
        return self.unlock_slot(passphrase, f, slot)[1]

    def unlock_slot(self, passphrase: Passphrase, f: ImageFile, slot: int | None = None) -> tuple[int, bytearray]:
        """``(slot, master_key)``: cryptsetup's order, priority 2 first, 0 never unless
        named; a named slot at any cost, else within the unlock budget."""
        candidates = [slot] if slot is not None else sorted(
            (s for s in self.digest.keyslots if self.keyslots[s].priority),
            key=lambda s: (-self.keyslots[s].priority, s))
        for s in candidates:
            if s not in self.digest.keyslots:
                raise InputError(f"{self.name}: keyslot {s} is not in use")
        return try_keyslots(candidates, lambda s: self._open_keyslot(s, passphrase, f),
                            self.digest.matches, self.name, self._cost if slot is None else None)

    def _cost(self, slot_id):
        """Kdf.cost of trying a keyslot: its KDF, then the digest's."""
        sealing = self.keyslots[slot_id].sealing
        return sealing.kdf.cost(sealing.key_bytes) + self.digest.kdf.cost(len(self.digest.digest))

    def check_master_key(self, key: Key) -> None:
        if len(key) != self.key_bytes:
            raise InputError(f"{self.name}: master key is {len(key)} bytes, the header says {self.key_bytes}")
        if not self.digest.matches(key):
            raise BadPassphraseError(f"{self.name}: master key does not match the header's digest")

    def payload_cipher(self, master_key: Key) -> SectorCipher:
        # dm-crypt counts a LUKS2 segment's IVs in 512-byte units whatever its sector
        # size (cryptsetup sets iv_large_sectors only for plain mode); iv_tweak too.
        return SectorCipher(self.cipher_spec, master_key, sector_size=self.sector_size,
                            iv_tweak=self.segment.iv_tweak)

    def _open_keyslot(self, slot_id, passphrase, f):
        slot = self.keyslots[slot_id]
        f.seek(slot.offset)
        material = bytearray(f.read(slot.sealing.material_size(slot.key_bytes)))
        try:
            return slot.sealing.open(material, passphrase, slot.key_bytes)
        finally:
            wipe(material)

    # -- keyslot changes -----------------------------------------------------------

    def active_keyslots(self) -> list[int]:
        return list(self.digest.keyslots)

    def free_keyslots(self) -> set[int]:
        return set(range(MAX_KEYSLOTS)) - set(self.keyslots)

    def slot_for_change(self, slot_id: int) -> int:
        """A changed passphrase keeps its keyslot number (in a new area)."""
        return slot_id

    def new_kdf(self, pbkdf: str | None = None, iter_time_ms: int = 2000, memory_kb: int | None = None,
                cpus: int | None = None, iterations: int | None = None) -> Kdf:
        if self.key_bytes is None:  # the keyslots told it; PBKDF2's cost depends on it
            raise InputError(f"{self.name}: no keyslot is left, so no passphrase opens the volume key")
        return new_kdf(pbkdf or "argon2id", iter_time_ms, self.key_bytes, memory_kb=memory_kb, cpus=cpus,
                       iterations=iterations)

    def with_keyslot(self, slot_id: int, passphrase: Passphrase, master_key: Key, kdf: Kdf,
                     replacing: int | None = None) -> tuple[Self, Writes]:
        """``(new header, writes)`` adding keyslot ``slot_id`` (taking the place of
        ``replacing``), its material in an area no live keyslot uses."""
        key_bytes = len(master_key)
        template = self.keyslots[self.digest.keyslots[0] if replacing is None else replacing]
        size = keyslots.area_size(key_bytes)
        sealing = Sealing(kdf, template.sealing.spec, template.sealing.key_bytes, template.sealing.af_hash)
        slot = keyslots.Keyslot(slot_id, key_bytes, sealing, self._free_area(size), size)
        material = sealing.seal(master_key, passphrase, size)
        doc = copy.deepcopy(self.doc)
        if replacing is not None:
            del doc["keyslots"][str(replacing)]
        doc["keyslots"][str(slot_id)] = slot.to_json()
        doc["keyslots"] = dict(sorted(doc["keyslots"].items(), key=lambda item: int(item[0])))
        digest_json = doc["digests"][str(self.digest.id)]
        members = ({*self.digest.keyslots} - {replacing}) | {slot_id}
        digest_json["keyslots"] = [str(s) for s in sorted(members)]
        new = self._rewritten(doc)
        writes = [(slot.offset, material), *new.header_writes()]
        if replacing is not None:
            old = self.keyslots[replacing]
            writes.append((old.offset, os.urandom(old.size)))
        return new, writes

    def without_keyslot(self, slot_id: int) -> tuple[Self, Writes]:
        """``(new header, writes)`` removing keyslot ``slot_id`` and then wiping its area."""
        old = self.keyslots[slot_id]
        new = self._rewritten(self._doc_without({slot_id}))
        return new, [*new.header_writes(), (old.offset, os.urandom(old.size))]

    def erased(self) -> tuple[Self, Writes]:
        """``(new header, writes)`` removing every keyslot, then overwriting the whole
        keyslots area with random bytes (cryptsetup luksErase)."""
        new = self._rewritten(self._doc_without(set(self.keyslots)))
        return new, [*new.header_writes(), (self.metadata_size, os.urandom(self.keyslots_size))]

    def _doc_without(self, slot_ids):
        """A copy of the metadata without the keyslots ``slot_ids``, also in the
        digests and tokens that name them."""
        doc = copy.deepcopy(self.doc)
        gone = {str(s) for s in slot_ids}
        for key in gone:
            del doc["keyslots"][key]
        for section in ("digests", "tokens"):
            for item in doc[section].values():
                if isinstance(item, dict) and isinstance(item.get("keyslots"), list):
                    item["keyslots"] = [k for k in item["keyslots"] if k not in gone]
        return doc

    def _free_area(self, size):
        """The lowest 4 KiB-aligned gap of ``size`` bytes in the keyslots area."""
        offset = self.metadata_size
        for slot in sorted(self.keyslots.values(), key=lambda s: s.offset):
            if offset + size <= slot.offset:
                break
            offset = max(offset, -(-(slot.offset + slot.size) // 4096) * 4096)
        if offset + size > self.metadata_size + self.keyslots_size:
            raise InputError(f"{self.name}: no room left in the keyslots area")
        return offset

    def _rewritten(self, doc: JsonObject) -> Self:
        bin_header = replace(self.binary, seqid=self.binary.seqid + 1)
        return type(self).from_json(bin_header, doc, self.name, self.file_size, (), self.file_id)

    def repaired(self) -> Writes:
        """The writes that make both copies this one again, with the next seqid."""
        return self._rewritten(self.doc).header_writes()

    def header_writes(self) -> Writes:
        """The two copies to write, secondary first (both with this header's seqid)."""
        area = pack_json(self.doc, self.binary.json_size)
        return [(self.binary.hdr_size, self.binary.at(self.binary.hdr_size, self.binary.seqid).pack(area)),
                (0, self.binary.pack(area))]

    # -- showing -------------------------------------------------------------------

    def info(self) -> dict[str, object]:
        """What ``luksDump`` shows, without salts, digests or anything secret."""
        seg = self.segment
        return {
            "format": "luks2",
            "version": 2,
            "uuid": self.binary.uuid,
            "label": self.binary.label,
            "subsystem": self.binary.subsystem,
            "seqid": self.binary.seqid,
            "header_size": self.binary.hdr_size,
            "keyslots_size": self.keyslots_size,
            "cipher": str(seg.spec),
            "key_bits": 8 * self.key_bytes if self.key_bytes else None,
            "sector_size": seg.sector_size,
            "payload_offset": seg.offset,
            "payload_size": "dynamic" if seg.size is None else seg.size,
            "iv_tweak": seg.iv_tweak,
            "detached": seg.offset == 0,
            "tokens": len(self.doc["tokens"]),
            "keyslots": [_slot_info(s) for _, s in sorted(self.keyslots.items())],
            "warnings": list(self.warnings),
        }


def _slot_info(slot):
    kdf = slot.sealing.kdf
    info = {"slot": slot.id, "state": "enabled", "key_bits": 8 * slot.key_bytes,
            "priority": slot.priority, "cipher": str(slot.sealing.spec), "pbkdf": kdf.type}
    info |= ({"hash": kdf.hash, "iterations": kdf.time} if kdf.type == "pbkdf2"
             else {"time": kdf.time, "memory_kb": kdf.memory, "threads": kdf.cpus})
    return info | {"area_offset": slot.offset, "area_size": slot.size}


def _segment_digest(digest_docs, slots, where):
    """The one digest of segment 0, with every keyslot it names present."""
    found = []
    for key, value in digest_docs.items():
        digest = digests.parse(fields.object_id(key, f"{where} digests"),
                               value if isinstance(value, dict) else {}, f"{where} digest {key}")
        if 0 in digest.segments:
            found.append(digest)
    if len(found) != 1:
        raise FormatError(f"{where}: segment 0 has {len(found)} digests, expected 1")
    digest = found[0]
    for slot_id in digest.keyslots:
        if slot_id not in slots:
            raise FormatError(f"{where}: digest {digest.id} names missing keyslot {slot_id}")
        if slots[slot_id].key_bytes != slots[digest.keyslots[0]].key_bytes:
            raise FormatError(f"{where}: keyslots of digest {digest.id} hold keys of different sizes")
    return digest


def _read_copy(f, offset):
    """``(BinaryHeader, doc)`` of the copy at ``offset``, or a string saying what is wrong."""
    f.seek(offset)
    size = binary.peek_size(f.read(BINARY_SIZE))
    if size is None:
        return NO_HEADER
    f.seek(offset)
    try:
        bin_header, json_area = binary.parse(f.read(size), offset)
        return bin_header, parse_json(json_area)
    except (FormatError, UnsupportedError) as e:
        return str(e)


def parse_json(area: bytes) -> JsonObject:
    text, nul, _ = bytes(area).partition(b"\0")
    if not nul:
        raise FormatError("JSON area is not NUL-terminated")
    try:
        doc = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError):
        raise FormatError("JSON area does not hold valid JSON") from None
    if not isinstance(doc, dict):
        raise FormatError("JSON area does not hold an object")
    return doc


def pack_json(doc: JsonObject, json_size: int) -> bytes:
    text = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    if len(text) >= json_size:
        raise InputError(f"LUKS2 metadata of {len(text)} bytes does not fit the {json_size}-byte JSON area")
    return text.ljust(json_size, b"\0")
