"""What LUKS1 and LUKS2 share: sealed keyslot material and crash-safe writes.

A keyslot stores the master key anti-forensically split (:mod:`nbdcrypt.crypto.af`)
and encrypted, as 512-byte sectors numbered from 0, with a key derived from the
passphrase (:class:`nbdcrypt.crypto.kdf.Kdf`).  Header updates go through
:func:`commit`: each write reaches the disk before the next starts, in an order
the format chooses so that a crash between any two leaves a header that opens
with the old or the new passphrase.
"""

import io
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, ClassVar, Self, TypedDict, TypeVar, Unpack

from nbdcrypt.crypto import af, wipe
from nbdcrypt.crypto.engine import SectorCipher
from nbdcrypt.crypto.kdf import Kdf, hash_factory
from nbdcrypt.crypto.spec import CipherSpec
from nbdcrypt.datapath.queueing import CryptPath
from nbdcrypt.datapath.volume import Volume
from nbdcrypt.errors import BadPassphraseError, FormatError, InputError
from nbdcrypt.formats.image import ImageFile, Key, Passphrase
from nbdcrypt.storage.store import Store

STRIPES = 4000
SECTOR = 512
OFFSET_ALIGN = 8  # sectors: cryptsetup puts data at whole 4096 bytes

FileId = tuple[int, int]  # (device, inode)
Writes = list[tuple[int, bytes]]  # (offset, data), written in order by commit


class KdfOptions(TypedDict, total=False):
    """How a new keyslot derives its key (cryptsetup's --pbkdf* options); see new_kdf."""

    pbkdf: str | None
    iter_time_ms: int
    memory_kb: int | None
    cpus: int | None
    iterations: int | None


@dataclass(frozen=True)
class Sealing:
    """How one keyslot's material is made: KDF, area cipher and AF parameters."""

    kdf: Kdf
    spec: CipherSpec
    key_bytes: int  # the area cipher's key, derived from the passphrase
    af_hash: str
    stripes: int = STRIPES

    def material_size(self, master_key_bytes: int) -> int:
        """Bytes of sealed material: the AF stripes rounded up to whole sectors."""
        return -(-master_key_bytes * self.stripes // SECTOR) * SECTOR

    def open(self, material: bytearray, passphrase: Passphrase, master_key_bytes: int) -> bytearray:
        """The candidate master key (a bytearray to wipe) from sealed ``material``."""
        size = self.material_size(master_key_bytes)
        if len(material) < size:
            raise FormatError(f"keyslot material is truncated ({len(material)} of {size} bytes)")
        plain = bytearray(material[:size])
        try:
            self._cipher(passphrase, plain, encrypt=False)
            return af.merge(plain, master_key_bytes, self.stripes, self.af_hash)
        finally:
            wipe(plain)

    def seal(self, master_key: Key, passphrase: Passphrase, area_size: int) -> bytes:
        """``area_size`` bytes to write to the keyslot's area."""
        material = af.split(master_key, self.stripes, self.af_hash)
        material += bytes(self.material_size(len(master_key)) - len(material))
        self._cipher(passphrase, material, encrypt=True)
        return bytes(material) + os.urandom(area_size - len(material))

    def _cipher(self, passphrase, buf, encrypt):
        derived = self.kdf.derive(passphrase, self.key_bytes)
        try:
            cipher = SectorCipher(self.spec, derived, sector_size=SECTOR)
            (cipher.encrypt if encrypt else cipher.decrypt)(buf, 0)
        finally:
            wipe(derived)


def commit(f: IO[bytes], writes: Writes) -> None:
    """Write each ``(offset, data)`` in order, each durable before the next starts."""
    for offset, data in writes:
        f.seek(offset)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def check_format_args(path: str | os.PathLike[str], cipher: str, key_bits: int, hash_name: str, payload_size: int,
                      sector_size: int, offset_sectors: int = 0) -> tuple[CipherSpec, int]:
    """Check the arguments LUKS1 and LUKS2 formats share; ``(spec, key_bytes)``."""
    spec = CipherSpec.parse(cipher)
    if key_bits <= 0 or key_bits % 8:
        raise InputError(f"key size must be a positive multiple of 8 bits, not {key_bits}")
    spec.check_key_size(key_bits // 8)
    hash_factory(hash_name)
    if payload_size < 0 or payload_size % sector_size:
        raise InputError(f"payload size must be a non-negative multiple of {sector_size} bytes, "
                         f"not {payload_size}")
    if offset_sectors < 0 or offset_sectors % OFFSET_ALIGN:
        raise InputError(f"data offset must be a non-negative multiple of {OFFSET_ALIGN} sectors "
                         f"(4096 bytes), not {offset_sectors}")
    if Path(path).exists():
        raise InputError(f"{path}: already exists")
    return spec, key_bits // 8


def create_file(path: str | os.PathLike[str], size: int, writes: Writes) -> None:
    """Create ``path`` as a sparse file of ``size`` bytes holding ``writes``, all or
    nothing: it is built beside ``path`` and linked into place, so a crash or an
    error never leaves a half-written file and an existing file is never replaced."""
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"{path}: no such directory {path.parent}")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "r+b") as f:
            f.truncate(size)
            commit(f, writes)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise InputError(f"{path}: already exists") from None
    finally:
        os.unlink(tmp)


def pick_slot(free: set[int], slot: int | None) -> int:
    """``slot`` if it is free, else the lowest free one; InputError when none is."""
    if slot is not None:
        if slot not in free:
            raise InputError(f"keyslot {slot} is not free")
        return slot
    if not free:
        raise InputError("no free keyslot")
    return min(free)


# Key derivation one unlock may spend on keyslots the user did not name, in Kdf.cost
# units: about a minute of one core here; 8 keyslots of cryptsetup's default 2 s made
# on a fast machine, 30 made here.  Each keyslot is bounded by cryptsetup's limits,
# but 32 of them at those limits would take days.
UNLOCK_BUDGET = 1 << 28


def try_keyslots(candidates: Sequence[int], open_slot: Callable[[int], bytearray], matches: Callable[[bytearray], bool],
                 name: str, cost: Callable[[int], int] | None = None) -> tuple[int, bytearray]:
    """``(slot, master_key)`` for the first candidate slot whose opened key ``matches``.
    With ``cost`` (a slot's Kdf.cost units, keyslot and digest), candidates are tried
    only while their total stays within UNLOCK_BUDGET; the error names the others."""
    spent = 0
    tried: list[int] = []
    for i, slot in enumerate(candidates):
        if cost is not None:
            spent += cost(slot)
            if spent > UNLOCK_BUDGET:
                raise InputError(_over_budget(name, tried, candidates[i:]))
        key = open_slot(slot)
        if matches(key):
            return slot, key
        wipe(key)
        tried.append(slot)
    raise BadPassphraseError(f"{name}: no key available with this passphrase")


def _over_budget(name, tried, untried):
    opened = f"no key available with this passphrase in keyslots {_ids(tried)}; " if tried else ""
    return (f"{name}: {opened}keyslots {_ids(untried)} not tried, their key derivation would pass "
            f"the budget of one unlock: name the keyslot to open with --key-slot N")


def _ids(slots):
    return ", ".join(map(str, slots))


class Payload(ABC):
    """What LUKS1 and LUKS2 headers share: the plaintext volume and the keyslot
    operations the passphrase changes below use.  Subclasses give the abstract members.

    A header cannot tell whether it is detached (``cryptsetup --header``, with or
    without ``--offset``), so reading it checks only its own file; the payload is
    checked here, against the data file, before any of it is served."""

    name: str  # the image, for messages only
    file_id: FileId | None  # of the file the header was read from
    backing_file: ClassVar[None] = None  # LUKS has none

    @property
    @abstractmethod
    def payload_offset(self) -> int:
        """Where the payload starts in the data file, in bytes."""

    @property
    @abstractmethod
    def fixed_payload_size(self) -> int | None:
        """The payload's bytes; None: to the end of the data file."""

    @property
    @abstractmethod
    def sector_size(self) -> int: ...

    @abstractmethod
    def payload_cipher(self, master_key: Key) -> SectorCipher:
        """The payload's sector cipher, with its own copy of the key."""

    def open_volume(self, store: Store, key: Key, path: CryptPath | None = None, backing_keys: Key = b"",
                    backing_dirs: Sequence[str] = ()) -> Volume:
        """The plaintext block device on the data file ``store`` with master key
        ``key``, on the export's queueing layer ``path`` (default: a new one), which
        gets the key for its worker processes.  The arguments are qcow2's: LUKS has
        no backing file, so backing keys are refused and backing directories unused."""
        if len(backing_keys):
            raise InputError(f"{self.name}: a backing key was given, but a LUKS image has no backing file")
        if self.payload_offset == 0 and self.file_id is not None and self.file_id == store.file_id():
            raise FormatError(f"{self.name}: data offset 0 means a detached header, "
                              f"but this header is in the data file; give the data file and --header")
        volume = Volume(store, self.payload_cipher(key), self.payload_offset,
                        self.payload_size(store.size()), path)
        volume.path.register(volume.cipher, key)
        return volume

    def payload_size(self, data_size: int) -> int:
        """Plaintext bytes in a data file of ``data_size`` bytes (whole sectors)."""
        if self.payload_offset > data_size:
            raise FormatError(f"{self.name}: payload offset {self.payload_offset} is past the end "
                              f"of the file ({data_size} bytes)")
        end = data_size
        if self.fixed_payload_size is not None:
            end = self.payload_offset + self.fixed_payload_size
            if end > data_size:
                raise FormatError(f"{self.name}: payload ends at {end}, past the end of the data "
                                  f"file ({data_size} bytes)")
        return (end - self.payload_offset) // self.sector_size * self.sector_size

    # -- keyslots --------------------------------------------------------------------

    @abstractmethod
    def unlock_slot(self, passphrase: Passphrase, f: ImageFile, slot: int | None = None) -> tuple[int, bytearray]:
        """``(slot number, master key)``, trying only ``slot`` if given."""

    @abstractmethod
    def active_keyslots(self) -> list[int]: ...

    @abstractmethod
    def free_keyslots(self) -> set[int]: ...

    @abstractmethod
    def slot_for_change(self, slot_id: int) -> int:
        """Where a changed passphrase of keyslot ``slot_id`` goes."""

    @abstractmethod
    def new_kdf(self, pbkdf: str | None = None, iter_time_ms: int = 2000, memory_kb: int | None = None,
                cpus: int | None = None, iterations: int | None = None) -> Kdf:
        """A new keyslot's Kdf (:func:`nbdcrypt.crypto.kdf.new_kdf`)."""

    @abstractmethod
    def with_keyslot(self, slot_id: int, passphrase: Passphrase, master_key: Key, kdf: Kdf,
                     replacing: int | None = None) -> tuple[Self, Writes]:
        """``(new header, writes)`` adding keyslot ``slot_id`` (in place of ``replacing``)."""

    @abstractmethod
    def without_keyslot(self, slot_id: int) -> tuple[Self, Writes]:
        """``(new header, writes)`` removing keyslot ``slot_id`` and wiping its area."""


def file_id(f: ImageFile) -> FileId | None:
    """Identity of an open file (None for in-memory files), to tell the header file
    from the data file."""
    try:
        st = os.fstat(f.fileno())
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None
    return st.st_dev, st.st_ino


# -- passphrase changes, the same for LUKS1 and LUKS2 ---------------------------------
# ``f`` is the header file open for reading and writing; ``kdf_options`` go to the
# header's ``new_kdf``.

P = TypeVar("P", bound=Payload)


def add_passphrase(f: IO[bytes], header: P, passphrase: Passphrase, new_passphrase: Passphrase,
                   slot: int | None = None, **kdf_options: Unpack[KdfOptions]) -> tuple[P, int]:
    """Add ``new_passphrase`` in keyslot ``slot`` (default: the lowest free one)."""
    target = pick_slot(header.free_keyslots(), slot)
    kdf = header.new_kdf(**kdf_options)
    _, key = header.unlock_slot(passphrase, f)
    try:
        new, writes = header.with_keyslot(target, new_passphrase, key, kdf)
    finally:
        wipe(key)
    commit(f, writes)
    return new, target


def change_passphrase(f: IO[bytes], header: P, passphrase: Passphrase, new_passphrase: Passphrase,
                      slot: int | None = None, **kdf_options: Unpack[KdfOptions]) -> tuple[P, int]:
    """Replace the keyslot ``passphrase`` opens (only ``slot`` if given)."""
    kdf = header.new_kdf(**kdf_options)
    old, key = header.unlock_slot(passphrase, f, slot)
    try:
        target = header.slot_for_change(old)
        new, writes = header.with_keyslot(target, new_passphrase, key, kdf, replacing=old)
    finally:
        wipe(key)
    commit(f, writes)
    return new, target


def remove_passphrase(f: IO[bytes], header: P, passphrase: Passphrase, slot: int | None = None) -> tuple[P, int]:
    """Remove keyslot ``slot``, or the one ``passphrase`` opens; ``passphrase`` must
    open some keyslot either way, and the last keyslot is never removed."""
    opened, key = header.unlock_slot(passphrase, f)
    wipe(key)
    target = opened if slot is None else slot
    active = header.active_keyslots()
    if target not in active:
        raise InputError(f"{header.name}: keyslot {target} is not in use")
    if len(active) == 1:
        raise InputError(f"{header.name}: refusing to remove keyslot {target}, the last one")
    new, writes = header.without_keyslot(target)
    commit(f, writes)
    return new, target
