"""LUKS1 on-disk format (LUKS1 On-Disk Format Specification 1.2.3, cryptsetup lib/luks1).

Three layers, as in cryptsetup:

* the header: :meth:`Luks1Header.parse` / :meth:`Luks1Header.pack` and the sanity
  check of every field (:meth:`Luks1Header.check`), run before any key is tried so a
  corrupt or hostile header can never steer reads outside the file;
* keyslots: PBKDF2 of the passphrase decrypts anti-forensic material, which merges
  into the master key, accepted only if it matches the header's digest;
* :func:`format_luks1`, which lays an image out exactly as
  ``cryptsetup luksFormat --type luks1`` does.
"""

import hmac
import math
import os
import struct
import uuid
from dataclasses import dataclass, field, replace
from typing import ClassVar, Self

from nbdcrypt.crypto import wipe
from nbdcrypt.crypto.engine import SectorCipher
from nbdcrypt.crypto.kdf import Kdf, hash_factory, new_kdf, pbkdf2, pbkdf2_iterations
from nbdcrypt.crypto.spec import CipherSpec
from nbdcrypt.errors import BadPassphraseError, FormatError, InputError, UnsupportedError
from nbdcrypt.formats.image import ImageFile, Key, Passphrase
from nbdcrypt.formats.luks_common import (
    STRIPES,
    FileId,
    Payload,
    Sealing,
    Writes,
    check_format_args,
    create_file,
    file_id,
    pick_slot,
    try_keyslots,
)

MAGIC = b"LUKS\xba\xbe"
VERSION = 1
SECTOR_SIZE = 512
HEADER_SIZE = 592
NUM_KEYSLOTS = 8
DIGEST_SIZE = 20
SALT_SIZE = 32
KEY_ENABLED = 0x00AC71F3
KEY_DISABLED = 0x0000DEAD

# magic, version, cipher-name, cipher-mode, hash-spec, payload-offset, key-bytes,
# mk-digest, mk-digest-salt, mk-digest-iter, uuid; then 8 keyslots of
# active, iterations, salt, key-material-offset, stripes.
_FIXED = struct.Struct(">6sH32s32s32sII20s32sI40s")
_KEYSLOT = struct.Struct(">II32sII")
assert _FIXED.size + NUM_KEYSLOTS * _KEYSLOT.size == HEADER_SIZE

# cryptsetup's layout: keyslot areas 4 KiB aligned, payload 1 MiB aligned.
KEYSLOT_ALIGN = 4096 // SECTOR_SIZE
PAYLOAD_ALIGN = 2048
# No tool writes more; a larger count is corruption, or a header built to hang us.
MAX_ITERATIONS = 1 << 30
# cryptsetup spends this long on the master-key digest, whatever --iter-time says.
MK_DIGEST_MS = 125
MIN_ITERATIONS = 1000


@dataclass(frozen=True)
class Keyslot:
    active: bool
    iterations: int
    salt: bytes
    offset: int  # key material offset, in sectors
    stripes: int = STRIPES


@dataclass(frozen=True)
class Luks1Header(Payload):
    """A parsed, checked LUKS1 header.  ``name`` names the image in messages only.

    With a detached header (``cryptsetup --header``) the file read holds only the
    header and keyslots, and the payload is in a separate data file, at the payload
    offset (0 unless made with ``--offset``).
    """

    cipher_spec: CipherSpec
    hash_name: str
    payload_sector: int
    key_bytes: int
    mk_digest: bytes
    mk_digest_salt: bytes
    mk_digest_iterations: int
    uuid: str
    keyslots: tuple[Keyslot, ...]
    name: str = field(default="image", compare=False)
    file_id: FileId | None = field(default=None, compare=False)

    sector_size: ClassVar[int] = SECTOR_SIZE
    fixed_payload_size: ClassVar[None] = None
    warnings: ClassVar[tuple[str, ...]] = ()

    @property
    def payload_offset(self) -> int:
        """Where the encrypted payload starts, in bytes."""
        return self.payload_sector * SECTOR_SIZE

    @property
    def keyslot_sectors(self) -> int:
        return _keyslot_sectors(self.key_bytes)

    # -- on-disk structure ---------------------------------------------------------

    @classmethod
    def read(cls, f: ImageFile, name: str = "image") -> Self:
        """Read and check the header of an open binary file (which the caller closes)."""
        f.seek(0)
        buf = f.read(HEADER_SIZE)
        return cls.parse(buf, f.seek(0, os.SEEK_END), name, file_id(f))

    @classmethod
    def parse(cls, buf: bytes, file_size: int, name: str = "image", fid: FileId | None = None) -> Self:
        """Decode ``buf`` (the first bytes of a file of ``file_size`` bytes) and check it."""
        if buf[: len(MAGIC)] != MAGIC:
            raise FormatError(f"{name}: not a LUKS image")
        if len(buf) < HEADER_SIZE:
            raise FormatError(f"{name}: truncated LUKS header ({len(buf)} of {HEADER_SIZE} bytes)")
        (_, version, cipher_name, cipher_mode, hash_spec, payload_sector, key_bytes,
         mk_digest, mk_digest_salt, mk_digest_iterations, uuid_field) = _FIXED.unpack_from(buf)
        if version != VERSION:
            raise FormatError(f"{name}: unknown LUKS version {version}")
        cipher_name, cipher_mode, hash_name, uuid_text = (
            _decode(raw, label, name)
            for raw, label in ((cipher_name, "cipher name"), (cipher_mode, "cipher mode"),
                               (hash_spec, "hash spec"), (uuid_field, "uuid"))
        )
        try:
            spec = CipherSpec.from_luks(cipher_name, cipher_mode)
        except UnsupportedError as e:
            raise UnsupportedError(f"{name}: {e}") from None
        if (spec.luks_name, spec.luks_mode) != (cipher_name, cipher_mode):
            raise UnsupportedError(f"{name}: unsupported cipher {cipher_name} {cipher_mode}")
        keyslots = []
        slots = _KEYSLOT.iter_unpack(buf[_FIXED.size : HEADER_SIZE])
        for i, (active, iterations, salt, offset, stripes) in enumerate(slots):
            if active not in (KEY_ENABLED, KEY_DISABLED):
                raise FormatError(f"{name}: keyslot {i} has an invalid state {active:#010x}")
            keyslots.append(Keyslot(active == KEY_ENABLED, iterations, salt, offset, stripes))
        header = cls(spec, hash_name, payload_sector, key_bytes, mk_digest, mk_digest_salt,
                     mk_digest_iterations, uuid_text, tuple(keyslots), name, fid)
        header.check(file_size)
        return header

    def check(self, file_size: int) -> None:
        """Sanity-check every field against itself and the size of the header's file,
        like cryptsetup's LUKS_check_keyslots and nbdkit's luks filter.  The payload
        is checked against the data file (this file unless the header is detached)
        when the volume opens.  FormatError/UnsupportedError."""
        name = self.name
        if len(self.keyslots) != NUM_KEYSLOTS:
            raise FormatError(f"{name}: {len(self.keyslots)} keyslots, expected {NUM_KEYSLOTS}")
        try:
            hash_factory(self.hash_name)
        except UnsupportedError as e:
            raise UnsupportedError(f"{name}: {e}") from None
        try:
            self.cipher_spec.check_key_size(self.key_bytes)
        except InputError:
            raise FormatError(
                f"{name}: key size of {self.key_bytes} bytes does not fit {self.cipher_spec}") from None
        _check_iterations(self.mk_digest_iterations, "master key digest", name)
        # Every keyslot area, enabled or not, lies between the header and the payload,
        # inside the file, and apart from the others (areas sorted by offset).
        previous_end, previous = 0, None
        for i, slot in sorted(enumerate(self.keyslots), key=lambda item: item[1].offset):
            where = f"{name}: keyslot {i}"
            if slot.stripes != STRIPES:
                raise FormatError(f"{where} has {slot.stripes} anti-forensic stripes, expected {STRIPES}")
            if slot.active:
                _check_iterations(slot.iterations, f"keyslot {i}", name)
            end = slot.offset + self.keyslot_sectors
            if slot.offset * SECTOR_SIZE < HEADER_SIZE:
                raise FormatError(f"{where} material at sector {slot.offset} overlaps the header")
            if slot.offset < previous_end:
                raise FormatError(f"{where} material at sector {slot.offset} overlaps keyslot {previous}")
            if end * SECTOR_SIZE > file_size:
                raise FormatError(f"{where} material (sectors {slot.offset}-{end - 1}) is past the end "
                                  f"of the file ({file_size} bytes)")
            if self.payload_sector and end > self.payload_sector:
                raise FormatError(f"{where} material (sectors {slot.offset}-{end - 1}) overlaps "
                                  f"the payload at sector {self.payload_sector}")
            previous_end, previous = end, i

    def pack(self) -> bytes:
        """The 592 header bytes."""
        out = bytearray(_FIXED.pack(
            MAGIC, VERSION, _encode(self.cipher_spec.luks_name), _encode(self.cipher_spec.luks_mode),
            _encode(self.hash_name), self.payload_sector, self.key_bytes, self.mk_digest,
            self.mk_digest_salt, self.mk_digest_iterations, _encode(self.uuid, 40)))
        for slot in self.keyslots:
            out += _KEYSLOT.pack(KEY_ENABLED if slot.active else KEY_DISABLED, slot.iterations,
                                 slot.salt, slot.offset, slot.stripes)
        return bytes(out)

    def info(self) -> dict[str, object]:
        """What ``luksDump`` shows, without salts, digests or anything secret."""
        return {
            "format": "luks1",
            "version": VERSION,
            "cipher": str(self.cipher_spec),
            "key_bits": self.key_bytes * 8,
            "hash": self.hash_name,
            "uuid": self.uuid,
            "payload_offset": self.payload_offset,
            "sector_size": SECTOR_SIZE,
            "mk_digest_iterations": self.mk_digest_iterations,
            "keyslots": [
                {
                    "slot": i,
                    "state": "enabled" if slot.active else "disabled",
                    "iterations": slot.iterations,
                    "stripes": slot.stripes,
                    "offset": slot.offset * SECTOR_SIZE,
                }
                for i, slot in enumerate(self.keyslots)
            ],
        }

    # -- keys and keyslots ---------------------------------------------------------

    def unlock(self, passphrase: Passphrase, f: ImageFile, slot: int | None = None) -> bytearray:
        """The master key (a bytearray the caller should wipe) from the first enabled
        keyslot the passphrase opens; BadPassphraseError if none does."""
        return self.unlock_slot(passphrase, f, slot)[1]

    def unlock_slot(self, passphrase: Passphrase, f: ImageFile, slot: int | None = None) -> tuple[int, bytearray]:
        """``(slot number, master key)``, trying only ``slot`` if given (at any cost,
        else within the unlock budget)."""
        if slot is not None and slot not in self.active_keyslots():
            raise InputError(f"{self.name}: keyslot {slot} is not in use")
        return try_keyslots(self.active_keyslots() if slot is None else [slot],
                            lambda i: self._open_keyslot(i, passphrase, f), self._digest_matches, self.name,
                            self._cost if slot is None else None)

    def _cost(self, i):
        """Kdf.cost of trying keyslot ``i``: its PBKDF2, then the digest's."""
        return (self._sealing(self.keyslots[i]).kdf.cost(self.key_bytes)
                + Kdf("pbkdf2", b"", self.mk_digest_iterations, self.hash_name).cost(DIGEST_SIZE))

    def check_master_key(self, key: Key) -> None:
        """Raise unless ``key`` is this image's master key (e.g. one given by the user)."""
        if len(key) != self.key_bytes:
            raise InputError(f"{self.name}: master key is {len(key)} bytes, the header says {self.key_bytes}")
        if not self._digest_matches(key):
            raise BadPassphraseError(f"{self.name}: master key does not match the header's digest")

    def payload_cipher(self, master_key: Key) -> SectorCipher:
        """The sector cipher for the payload (with its own copy of the key: the caller
        wipes ``master_key``); sector numbers count from the payload offset."""
        return SectorCipher(self.cipher_spec, master_key, sector_size=SECTOR_SIZE)

    def _digest_matches(self, key):
        digest = pbkdf2(self.hash_name, key, self.mk_digest_salt, self.mk_digest_iterations, DIGEST_SIZE)
        return hmac.compare_digest(digest, self.mk_digest)

    def _sealing(self, slot):
        """Keyslot material is encrypted with the payload's cipher, all under one hash."""
        return Sealing(Kdf("pbkdf2", slot.salt, slot.iterations, self.hash_name), self.cipher_spec,
                       self.key_bytes, self.hash_name, slot.stripes)

    def _open_keyslot(self, i, passphrase, f):
        slot = self.keyslots[i]
        f.seek(slot.offset * SECTOR_SIZE)
        material = bytearray(f.read(self.keyslot_sectors * SECTOR_SIZE))
        try:
            return self._sealing(slot).open(material, passphrase, self.key_bytes)
        finally:
            wipe(material)

    # -- keyslot changes -----------------------------------------------------------

    def active_keyslots(self) -> list[int]:
        return [i for i, slot in enumerate(self.keyslots) if slot.active]

    def free_keyslots(self) -> set[int]:
        return {i for i, slot in enumerate(self.keyslots) if not slot.active}

    def slot_for_change(self, slot_id: int) -> int:
        """LUKS1 areas are fixed: a changed passphrase moves to a free slot, so the old
        one stays intact until the new one is enabled on disk."""
        return pick_slot(self.free_keyslots(), None)

    def new_kdf(self, pbkdf: str | None = None, iter_time_ms: int = 2000, memory_kb: int | None = None,
                cpus: int | None = None, iterations: int | None = None) -> Kdf:
        """PBKDF2 only; Argon2's memory and threads mean nothing here."""
        if pbkdf not in (None, "pbkdf2"):
            raise InputError(f"{self.name}: LUKS1 keyslots use pbkdf2, not {pbkdf}")
        return new_kdf("pbkdf2", iter_time_ms, self.key_bytes, self.hash_name, iterations=iterations)

    def with_keyslot(self, slot_id: int, passphrase: Passphrase, master_key: Key, kdf: Kdf,
                     replacing: int | None = None) -> tuple[Self, Writes]:
        """``(new header, writes)``: material into the free slot's area, then the header
        enabling it; with ``replacing``, then the header disabling that slot, then its
        area wiped.  The header spans two sectors, so enabling one slot and disabling
        another in one write could, torn, leave neither (cryptsetup writes twice too)."""
        slot = Keyslot(True, kdf.time, kdf.salt, self.keyslots[slot_id].offset)
        material = self._sealing(slot).seal(master_key, passphrase, self.keyslot_sectors * SECTOR_SIZE)
        added = self._with_slot(slot_id, slot)
        writes = [(slot.offset * SECTOR_SIZE, material), *added._after_header(None)]
        if replacing is None:
            return added, writes
        new, removal = added.without_keyslot(replacing)
        return new, writes + removal

    def without_keyslot(self, slot_id: int) -> tuple[Self, Writes]:
        new = self._with_slot(slot_id, _disabled(self.keyslots[slot_id].offset))
        return new, new._after_header(slot_id)

    def erased(self) -> tuple[Self, Writes]:
        """``(new header, writes)``: every keyslot disabled in one header write, then every
        keyslot area overwritten with random bytes (cryptsetup luksErase).  A torn header
        write leaves each slot enabled with its material intact, or disabled."""
        new = replace(self, keyslots=tuple(_disabled(slot.offset) for slot in self.keyslots))
        size = self.keyslot_sectors * SECTOR_SIZE
        return new, [(0, new.pack()), *((slot.offset * SECTOR_SIZE, os.urandom(size)) for slot in self.keyslots)]

    def _with_slot(self, slot_id, slot):
        slots = list(self.keyslots)
        slots[slot_id] = slot
        return replace(self, keyslots=tuple(slots))

    def _after_header(self, wiped):
        """The header write, then random bytes over the area of the slot ``wiped``."""
        writes = [(0, self.pack())]
        if wiped is not None:
            writes.append((self.keyslots[wiped].offset * SECTOR_SIZE,
                           os.urandom(self.keyslot_sectors * SECTOR_SIZE)))
        return writes


def _disabled(offset):
    """A disabled keyslot as cryptsetup leaves one: salt and iteration count cleared."""
    return Keyslot(False, 0, bytes(SALT_SIZE), offset)


def _decode(raw, label, name):
    """A NUL-terminated printable ASCII header string."""
    text, nul, _ = raw.partition(b"\0")
    if not nul or not all(0x20 < c < 0x7F for c in text):
        raise FormatError(f"{name}: {label} field is not a NUL-terminated string")
    return text.decode("ascii")


def _encode(text, size=32):
    raw = text.encode("ascii")
    if len(raw) >= size:
        raise InputError(f"{text!r} does not fit a {size}-byte LUKS1 header field")
    return raw


def _check_iterations(count, what, name):
    if not 0 < count <= MAX_ITERATIONS:
        raise FormatError(f"{name}: {what} has {count} PBKDF2 iterations, expected 1 to {MAX_ITERATIONS}")


# -- creating images -----------------------------------------------------------------


def _keyslot_sectors(key_bytes):
    """Sectors one keyslot's anti-forensic material fills (cryptsetup's AF_split_sectors)."""
    return math.ceil(key_bytes * STRIPES / SECTOR_SIZE)


def layout(key_bytes: int) -> tuple[list[int], int]:
    """cryptsetup's keyslot offsets and payload sector for a key of ``key_bytes`` bytes."""
    slot_sectors = _keyslot_sectors(key_bytes)
    offsets, sector = [], KEYSLOT_ALIGN  # the first keyslot follows the header's 4 KiB
    for _ in range(NUM_KEYSLOTS):
        offsets.append(sector)
        sector = _round_up(sector + slot_sectors, KEYSLOT_ALIGN)
    return offsets, _round_up(sector, PAYLOAD_ALIGN)


def _round_up(n, multiple):
    return -(-n // multiple) * multiple


def format_luks1(path: str | os.PathLike[str], payload_size: int, passphrase: Passphrase,
                 cipher: str = "aes-xts-plain64", key_bits: int = 256, hash_name: str = "sha256",
                 iter_time_ms: int = 2000, iterations: int | None = None, detached: bool = False,
                 offset_sectors: int = 0) -> Luks1Header:
    """Create a new LUKS1 image at ``path`` with ``payload_size`` bytes of (sparse) payload
    and keyslot 0 opened by ``passphrase``; returns its header.  ``detached``: ``path``
    is a header file only, for a payload in a separate data file.  ``offset_sectors``
    (cryptsetup's ``--offset``): where the payload starts, in the image or the data
    file; 0 for cryptsetup's default (after the keyslots; detached, at 0).  A detached
    header file then spans the offset, as cryptsetup makes it.

    Arguments are checked before anything is created, and the file appears whole or
    not at all (:func:`~nbdcrypt.formats.luks_common.create_file`).
    """
    spec, key_bytes = check_format_args(path, cipher, key_bits, hash_name, payload_size, SECTOR_SIZE,
                                        offset_sectors)
    if iter_time_ms <= 0:
        raise InputError(f"iteration time must be positive, not {iter_time_ms} ms")

    offsets, aligned_end = layout(key_bytes)
    keyslots_end = offsets[-1] + _keyslot_sectors(key_bytes)
    if 0 < offset_sectors < keyslots_end:
        raise InputError(f"data offset {offset_sectors} sectors is inside the LUKS1 header and keyslots "
                         f"({keyslots_end} sectors)")
    header_sectors = offset_sectors or aligned_end
    payload_sector = 0 if detached and not offset_sectors else header_sectors
    file_size = header_sectors * SECTOR_SIZE + (0 if detached else payload_size)
    master_key = bytearray(os.urandom(key_bytes))
    try:
        # Like cryptsetup, the digest's iteration count comes from the benchmark at the
        # key length, scaled to its fixed time budget.
        mk_salt = os.urandom(SALT_SIZE)
        mk_iterations = pbkdf2_iterations(hash_name, MK_DIGEST_MS, key_bytes, MIN_ITERATIONS)
        empty = Luks1Header(
            spec, hash_name, payload_sector, key_bytes,
            pbkdf2(hash_name, master_key, mk_salt, mk_iterations, DIGEST_SIZE), mk_salt, mk_iterations,
            str(uuid.uuid4()), tuple(_disabled(o) for o in offsets), str(path))
        empty.check(file_size)
        kdf = new_kdf("pbkdf2", iter_time_ms, key_bytes, hash_name, iterations=iterations)
        header, writes = empty.with_keyslot(0, passphrase, master_key, kdf)
    finally:
        wipe(master_key)
    # cryptsetup fills every keyslot area with random bytes, so unused ones cannot be
    # told apart from used ones.
    noise = [(o * SECTOR_SIZE, os.urandom(header.keyslot_sectors * SECTOR_SIZE)) for o in offsets[1:]]
    create_file(path, file_size, noise + writes)
    return header
