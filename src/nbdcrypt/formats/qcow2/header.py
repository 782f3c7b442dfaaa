"""The qcow2 header, its extensions, and the keys of its two encryption formats.

Every field is checked against the file size before anything else reads the file,
so a hostile header cannot steer a read or write outside the image.  Encryption:

* LUKS (crypt_method 2): a LUKS1 header lives in clusters named by the crypto header
  extension; its keyslot offsets count from that extension's offset, and its payload
  offset means nothing here.  Sector IVs are the HOST offset of the data / 512.
* legacy AES (crypt_method 1): AES-128-CBC-plain64 keyed with the passphrase itself
  (cut at 16 bytes or its first NUL, zero-padded, as QEMU's crypto/block-qcow.c).
  Sector IVs are the GUEST offset / 512.  There is no key check: a wrong
  passphrase reads garbage.
"""

import io
import os
import struct
from dataclasses import dataclass, field, replace
from typing import ClassVar, Self

from nbdcrypt.crypto.engine import SectorCipher
from nbdcrypt.crypto.secrets import Secret
from nbdcrypt.crypto.spec import CipherSpec
from nbdcrypt.errors import FormatError, InputError, UnsupportedError
from nbdcrypt.formats.image import ImageFile, Key, Passphrase
from nbdcrypt.formats.luks1 import Luks1Header
from nbdcrypt.formats.qcow2.snapshots import Snapshot, read_snapshots

MAGIC = b"QFI\xfb"
SECTOR_SIZE = 512
V2_HEADER_SIZE = 72
V3_HEADER_SIZE = 104
MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 21
MAX_L1_BYTES = 32 << 20  # QEMU's QCOW_MAX_L1_SIZE
MAX_REFTABLE_BYTES = 8 << 20  # QEMU's QCOW_MAX_REFTABLE_SIZE
MAX_SNAPSHOTS = 65536
MAX_BACKING_NAME = 1023

CRYPT_NONE, CRYPT_AES, CRYPT_LUKS = 0, 1, 2
CRYPT_NAMES = {CRYPT_NONE: None, CRYPT_AES: "aes", CRYPT_LUKS: "luks"}
AES_SPEC = CipherSpec.parse("aes-cbc-plain64")
AES_KEY_BYTES = 16
COMPRESSION_NAMES = {0: "zlib", 1: "zstd"}

# Incompatible feature bits.
DIRTY, CORRUPT, EXTERNAL_DATA, COMPRESSION_TYPE, EXTENDED_L2 = (1 << b for b in range(5))
INCOMPATIBLE_NAMES = {DIRTY: "dirty", CORRUPT: "corrupt", EXTERNAL_DATA: "external data file",
                      COMPRESSION_TYPE: "compression type", EXTENDED_L2: "extended L2 entries"}
LAZY_REFCOUNTS = 1  # compatible feature bit 0

EXT_END, EXT_BACKING_FORMAT, EXT_FEATURE_TABLE = 0, 0xE2792ACA, 0x6803F857
EXT_CRYPTO = 0x0537BE77

# magic, version, backing file offset and size, cluster bits, size, crypt method,
# L1 size and offset, refcount table offset and clusters, snapshot count and offset.
V2_FIELDS = struct.Struct(">4sIQIIQIIQQIIQ")
# incompatible, compatible and autoclear features, refcount order, header length.
V3_FIELDS = struct.Struct(">QQQII")
EXT_FIELDS = struct.Struct(">II")
CRYPTO_EXT_FIELDS = struct.Struct(">QQ")
REFTABLE_FIELDS = struct.Struct(">QI")  # refcount table offset and clusters, at byte 48
REFTABLE_FIELDS_OFFSET = 48
AUTOCLEAR_OFFSET = 88
assert V2_FIELDS.size == V2_HEADER_SIZE and V2_FIELDS.size + V3_FIELDS.size == V3_HEADER_SIZE


def probe(f: ImageFile) -> str | None:
    """``"qcow2"`` if ``f`` starts with the qcow2 magic (any version), else None."""
    f.seek(0)
    return "qcow2" if f.read(len(MAGIC)) == MAGIC else None


@dataclass(frozen=True)
class Qcow2Header:
    """A parsed, checked qcow2 header.  ``luks`` is the embedded LUKS1 header, if any."""

    version: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_offset: int
    reftable_offset: int
    reftable_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_SIZE
    compression_type: int = 0
    backing_file: str | None = None
    backing_format: str | None = None
    crypto_offset: int = 0
    crypto_length: int = 0
    luks: Luks1Header | None = None
    snapshots: tuple[Snapshot, ...] = ()
    snapshots_length: int = 0  # bytes of the snapshot table
    name: str = field(default="image", compare=False)

    sector_size: ClassVar[int] = SECTOR_SIZE
    warnings: ClassVar[tuple[str, ...]] = ()

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // 8

    @property
    def encryption(self) -> str | None:
        """``"luks"``, ``"aes"`` or None."""
        return CRYPT_NAMES[self.crypt_method]

    @property
    def key_bytes(self) -> int:
        """The master key's length (0: unencrypted)."""
        if self.crypt_method == CRYPT_LUKS:
            return self._luks.key_bytes
        return AES_KEY_BYTES if self.crypt_method == CRYPT_AES else 0

    @property
    def cipher_spec(self) -> CipherSpec | None:
        if self.crypt_method == CRYPT_LUKS:
            return self._luks.cipher_spec
        return AES_SPEC if self.crypt_method == CRYPT_AES else None

    @property
    def _luks(self) -> Luks1Header:
        """The embedded LUKS header, which :meth:`read` finds for every LUKS image."""
        if self.luks is None:
            raise FormatError(f"{self.name}: the embedded LUKS header was not read")
        return self.luks

    # -- on-disk structure ---------------------------------------------------------

    @classmethod
    def read(cls, f: ImageFile, name: str = "image") -> Self:
        """Read and check the header of an open binary file (which the caller closes)."""
        file_size = f.seek(0, os.SEEK_END)
        f.seek(0)
        head = f.read(1 << MAX_CLUSTER_BITS)
        header = cls.parse(head, file_size, name)
        if header.nb_snapshots:
            snapshots, length = read_snapshots(f, header.snapshots_offset, header.nb_snapshots, file_size, name,
                                               header._l1_checker(file_size))
            header = replace(header, snapshots=snapshots, snapshots_length=length)
        if header.crypt_method != CRYPT_LUKS:
            return header
        window = _Window(f, header.crypto_offset, header.crypto_length)
        try:
            luks = Luks1Header.read(window, f"{name} (LUKS header)")
        except FormatError as e:
            raise FormatError(f"{name}: embedded LUKS header: {e}") from None
        return replace(header, luks=luks)

    @classmethod
    def parse(cls, buf: bytes, file_size: int, name: str = "image") -> Self:
        """Decode the first cluster ``buf`` of a file of ``file_size`` bytes; the
        embedded LUKS header (if any) is left to :meth:`read`."""
        if buf[:4] != MAGIC:
            raise FormatError(f"{name}: not a qcow2 image")
        if len(buf) < V2_HEADER_SIZE:
            raise FormatError(f"{name}: truncated qcow2 header")
        (_, version, backing_offset, backing_size, cluster_bits, size, crypt_method, l1_size, l1_offset,
         reftable_offset, reftable_clusters, nb_snapshots, snapshots_offset) = V2_FIELDS.unpack_from(buf)
        if version not in (2, 3):
            raise UnsupportedError(f"{name}: qcow2 version {version} is not supported")
        if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
            raise FormatError(f"{name}: cluster bits {cluster_bits} out of range "
                              f"{MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}")
        fields = dict(version=version, cluster_bits=cluster_bits, size=size, crypt_method=crypt_method,
                      l1_size=l1_size, l1_offset=l1_offset, reftable_offset=reftable_offset,
                      reftable_clusters=reftable_clusters, nb_snapshots=nb_snapshots,
                      snapshots_offset=snapshots_offset, name=name)
        cluster = bytes(buf[: 1 << cluster_bits])
        if version == 3:
            if len(buf) < V3_HEADER_SIZE:
                raise FormatError(f"{name}: truncated qcow2 v3 header")
            (incompatible, compatible, autoclear, refcount_order,
             header_length) = V3_FIELDS.unpack_from(buf, V2_FIELDS.size)
            if header_length < V3_HEADER_SIZE or header_length % 8 or header_length > len(cluster):
                raise FormatError(f"{name}: bad qcow2 header length {header_length}")
            fields.update(incompatible=incompatible, compatible=compatible, autoclear=autoclear,
                          refcount_order=refcount_order, header_length=header_length,
                          compression_type=cluster[V3_HEADER_SIZE] if header_length > V3_HEADER_SIZE else 0)
        fields.update(_extensions(cluster, fields.get("header_length", V2_HEADER_SIZE),
                                  backing_offset, name))
        fields["backing_file"] = _backing_name(cluster, backing_offset, backing_size, name)
        header = cls(**fields)
        header.check(file_size)
        return header

    def check(self, file_size: int) -> None:
        """Sanity-check every field against the others and the file size."""
        name, cs = self.name, self.cluster_size
        self._check_features()
        if self.crypt_method not in CRYPT_NAMES:
            raise UnsupportedError(f"{name}: unknown qcow2 encryption method {self.crypt_method}")
        if (self.crypt_method == CRYPT_LUKS) != bool(self.crypto_offset):
            raise FormatError(f"{name}: the crypto header extension does not match encryption "
                              f"method {self.crypt_method}")
        if self.crypt_method == CRYPT_LUKS:
            _check_area(name, "LUKS header", self.crypto_offset, self.crypto_length, cs, file_size)
        if self.refcount_order > 6 or (self.version == 2 and self.refcount_order != 4):
            raise FormatError(f"{name}: refcount order {self.refcount_order} out of range")
        if self.size > (1 << 62):
            raise FormatError(f"{name}: virtual size {self.size} is too large")
        if self.l1_size < -(-self.size // (cs * self.l2_entries)):
            raise FormatError(f"{name}: L1 table of {self.l1_size} entries is too small for "
                              f"{self.size} bytes")
        if self.l1_size:
            self._l1_checker(file_size)("L1 table", self.l1_offset, self.l1_size * 8)
        if not 0 < self.reftable_clusters * cs <= MAX_REFTABLE_BYTES:
            raise FormatError(f"{name}: refcount table of {self.reftable_clusters} clusters out of range")
        _check_area(name, "refcount table", self.reftable_offset, self.reftable_clusters * cs, cs, file_size)
        if self.nb_snapshots > MAX_SNAPSHOTS:
            raise FormatError(f"{name}: {self.nb_snapshots} snapshots is too many")
        if self.nb_snapshots:
            _check_area(name, "snapshot table", self.snapshots_offset, 1, cs, file_size)

    def _l1_checker(self, file_size):
        """A check of an L1 table (the active one or a snapshot's): size and place."""
        def check(what, offset, length):
            if length > MAX_L1_BYTES:
                raise FormatError(f"{self.name}: {what} of {length // 8} entries is too large")
            _check_area(self.name, what, offset, length, self.cluster_size, file_size)
        return check

    def _check_features(self):
        name = self.name
        unknown = self.incompatible & ~sum(INCOMPATIBLE_NAMES)
        if unknown:
            raise UnsupportedError(f"{name}: unknown incompatible qcow2 features {unknown:#x}")
        for bit in (EXTERNAL_DATA, EXTENDED_L2):
            if self.incompatible & bit:
                raise UnsupportedError(f"{name}: qcow2 {INCOMPATIBLE_NAMES[bit]} are not supported")
        if self.compression_type not in COMPRESSION_NAMES:
            raise UnsupportedError(f"{name}: unknown compression type {self.compression_type}")
        if bool(self.incompatible & COMPRESSION_TYPE) != bool(self.compression_type):
            raise FormatError(f"{name}: compression type feature bit does not match "
                              f"compression type {self.compression_type}")

    def write_refusal(self) -> str | None:
        """Why this image must not be written (None if it may): features whose
        metadata nbdcrypt would not keep consistent."""
        if self.incompatible & DIRTY:
            return "is dirty (lazy refcounts): run `qemu-img check -r all` first or serve it --readonly"
        if self.incompatible & CORRUPT:
            return "is marked corrupt: run `qemu-img check -r all` first or serve it --readonly"
        return None

    def info(self) -> dict[str, object]:
        """What ``qemu-img info`` shows, without anything secret."""
        features = [n for bit, n in INCOMPATIBLE_NAMES.items() if self.incompatible & bit]
        info: dict[str, object] = {
            "format": "qcow2",
            "version": self.version,
            "compat": "1.1" if self.version == 3 else "0.10",
            "virtual_size": self.size,
            "cluster_size": self.cluster_size,
            "refcount_bits": 1 << self.refcount_order,
            "compression_type": COMPRESSION_NAMES[self.compression_type],
            "lazy_refcounts": bool(self.compatible & LAZY_REFCOUNTS),
            "incompatible_features": features,
            "snapshots": [snapshot.info() for snapshot in self.snapshots],
            "backing_file": self.backing_file,
            "backing_format": self.backing_format,
            "encryption": self.encryption,
            "sector_size": SECTOR_SIZE,
        }
        if self.cipher_spec:
            info["cipher"] = str(self.cipher_spec)
        if self.luks:
            info["luks"] = self.luks.info()
        return info

    # -- keys and the volume -------------------------------------------------------

    def unlock(self, passphrase: Passphrase, f: ImageFile, slot: int | None = None) -> bytearray:
        """The master key (a bytearray the caller should wipe).  The embedded LUKS
        header's keyslots are not the user's to name."""
        if slot is not None:
            raise InputError(f"{self.name}: --key-slot is for LUKS images")
        if self.crypt_method == CRYPT_LUKS:
            return self._luks.unlock(passphrase, _Window(f, self.crypto_offset, self.crypto_length))
        if self.crypt_method == CRYPT_AES:
            return aes_key(passphrase)
        raise UnsupportedError(f"{self.name}: qcow2 image is not encrypted")

    def check_master_key(self, key: Key) -> None:
        if self.crypt_method == CRYPT_LUKS:
            self._luks.check_master_key(key)
        elif len(key) != AES_KEY_BYTES:
            raise InputError(f"{self.name}: legacy AES key is {len(key)} bytes, expected {AES_KEY_BYTES}")

    def cipher(self, key: Key) -> SectorCipher | None:
        """The sector cipher, or None for an unencrypted image."""
        spec = self.cipher_spec
        return None if spec is None else SectorCipher(spec, key, sector_size=SECTOR_SIZE)

    def payload_size(self, data_size: int) -> int:
        """The virtual size (the file size says nothing about it)."""
        return self.size


def aes_key(passphrase: Passphrase) -> Secret:
    """QEMU's legacy AES key: the passphrase as a C string, cut or zero-padded to 16 bytes."""
    end = passphrase.find(0)
    length = min(AES_KEY_BYTES, len(passphrase) if end < 0 else end)
    key = Secret(AES_KEY_BYTES)
    key[:length] = memoryview(passphrase)[:length]  # no bytes copy, which we could not wipe
    return key


def _extensions(cluster, start, backing_offset, name):
    """The header extensions we use, from ``start`` to the end marker."""
    found, offset = {}, start
    end = min(backing_offset or len(cluster), len(cluster))  # a hostile offset may point anywhere
    while True:
        if offset + EXT_FIELDS.size > end:
            raise FormatError(f"{name}: qcow2 header extensions run past the header")
        kind, length = EXT_FIELDS.unpack_from(cluster, offset)
        offset += EXT_FIELDS.size
        if kind == EXT_END:
            return found
        if offset + length > end:
            raise FormatError(f"{name}: qcow2 header extension {kind:#x} runs past the header")
        data = cluster[offset:offset + length]
        if kind == EXT_BACKING_FORMAT:
            found["backing_format"] = _text(data, "backing format", name)
        elif kind == EXT_CRYPTO:
            if length != CRYPTO_EXT_FIELDS.size:
                raise FormatError(f"{name}: crypto header extension of {length} bytes")
            found["crypto_offset"], found["crypto_length"] = CRYPTO_EXT_FIELDS.unpack(data)
        offset += -(-length // 8) * 8


def _backing_name(cluster, offset, size, name):
    if not offset:
        return None
    if size > MAX_BACKING_NAME or offset + size > len(cluster):
        raise FormatError(f"{name}: backing file name at {offset} ({size} bytes) is out of range")
    backing = _text(cluster[offset:offset + size], "backing file name", name)
    if "\0" in backing or not backing:
        raise FormatError(f"{name}: the backing file name is empty or holds a NUL byte")
    return backing


def _text(raw, label, name):
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise FormatError(f"{name}: {label} is not UTF-8") from None


def _check_area(name, what, offset, length, cluster_size, file_size):
    """A metadata area: cluster aligned, after the header cluster, inside the file."""
    if offset % cluster_size or offset < cluster_size or offset + length > file_size or length <= 0:
        raise FormatError(f"{name}: {what} at {offset} ({length} bytes) is outside the image "
                          f"or misaligned")


class _Window(io.RawIOBase):
    """A read-only file view of ``length`` bytes at ``offset`` of ``f``, so the LUKS1
    reader sees the embedded header as a file of its own."""

    def __init__(self, f, offset, length):
        super().__init__()
        self._f, self._offset, self._length, self._pos = f, offset, length, 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._length}[whence]
        self._pos = base + pos
        return self._pos

    def read(self, size: int = -1) -> bytes:
        end = self._length if size < 0 else min(self._length, self._pos + size)
        if end <= self._pos:
            return b""
        self._f.seek(self._offset + self._pos)
        data = self._f.read(end - self._pos)
        self._pos += len(data)
        return data
