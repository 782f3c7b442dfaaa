"""New encrypted qcow2 images, laid out as qemu-img does.

Cluster 0 holds the header, its extensions and the backing file name; then come the
refcount table, the refcount blocks describing every cluster written here, the L1
table and (LUKS) the embedded LUKS1 header.  No data cluster is allocated.
"""

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nbdcrypt.errors import InputError
from nbdcrypt.formats.image import Passphrase
from nbdcrypt.formats.luks1 import format_luks1
from nbdcrypt.formats.luks_common import create_file
from nbdcrypt.formats.qcow2.backing import backing_path
from nbdcrypt.formats.qcow2.header import (
    CRYPT_AES,
    CRYPT_LUKS,
    CRYPTO_EXT_FIELDS,
    EXT_BACKING_FORMAT,
    EXT_CRYPTO,
    EXT_END,
    EXT_FIELDS,
    MAGIC,
    MAX_BACKING_NAME,
    MAX_CLUSTER_BITS,
    MIN_CLUSTER_BITS,
    V2_FIELDS,
    V3_FIELDS,
    Qcow2Header,
)

AES_WARNING = ("legacy qcow2 AES encryption is deprecated by QEMU and weak: the passphrase "
               "is the key, with no key derivation and predictable IVs")
REFCOUNT_ORDER = 4
V3_HEADER_LENGTH = 112  # the v3 fields, the compression type byte and padding, as QEMU writes


def create(path: str | os.PathLike[str], size: int, passphrase: Passphrase, encrypt: str = "luks",
           cluster_size: int = 65536, compat: str = "1.1", backing: str | None = None,
           backing_format: str | None = None, cipher: str = "aes-xts-plain64", key_bits: int = 512,
           hash_name: str = "sha256", iter_time_ms: int = 2000, allow_aes: bool = False,
           backing_dirs: Sequence[str] = ()) -> Qcow2Header:
    """Create an encrypted qcow2 image of ``size`` virtual bytes at ``path``; returns its
    header.  ``encrypt="aes"`` needs ``allow_aes=True`` (callers should show AES_WARNING).
    A ``backing`` file needs its ``backing_format`` (never probed, as in qemu-img 7.2) and
    may lead out of the image's directory only into ``backing_dirs``, as serve allows.

    Arguments are checked before anything is created, and the file appears whole or
    not at all (:func:`~nbdcrypt.formats.luks_common.create_file`).
    """
    path = Path(path)
    cluster_bits = cluster_size.bit_length() - 1
    if cluster_size != 1 << cluster_bits or not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise InputError(f"cluster size must be a power of two from 512 B to 2 MiB, not {cluster_size}")
    if compat not in ("0.10", "1.1"):
        raise InputError(f"compat must be 0.10 or 1.1, not {compat}")
    if encrypt not in ("luks", "aes"):
        raise InputError(f"encryption must be luks or aes, not {encrypt}")
    if encrypt == "aes" and not allow_aes:
        raise InputError(f"refusing legacy AES without an explicit opt-in: {AES_WARNING}")
    if size < 0 or size % 512:
        raise InputError(f"size must be a non-negative multiple of 512 bytes, not {size}")
    if not path.parent.is_dir():
        raise InputError(f"{path}: no such directory {path.parent}")
    if path.exists():
        raise InputError(f"{path}: already exists")
    if backing is not None:
        if backing_format not in ("raw", "qcow2"):
            raise InputError("a backing file needs its format: --backing-format raw or qcow2")
        backing_path(path, backing, backing_dirs)

    luks = b""
    if encrypt == "luks":
        luks = _luks_header(path.parent, passphrase, cipher, key_bits, hash_name, iter_time_ms)
    pieces, file_size = _layout(size, cluster_bits, 3 if compat == "1.1" else 2,
                    CRYPT_LUKS if luks else CRYPT_AES, luks, backing, backing_format)

    create_file(path, file_size, pieces)
    with open(path, "rb") as f:
        header = Qcow2Header.read(f, str(path))
    return header


def _luks_header(directory, passphrase, cipher, key_bits, hash_name, iter_time_ms):
    """The bytes of a LUKS1 header area (header and keyslots) with no payload."""
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        luks_path = Path(tmp) / "luks"
        format_luks1(luks_path, 0, passphrase, cipher=cipher, key_bits=key_bits,
                     hash_name=hash_name, iter_time_ms=iter_time_ms)
        return luks_path.read_bytes()


def _layout(size, cluster_bits, version, crypt_method, luks, backing, backing_format):
    """([(offset, bytes)] of a new image's metadata, the file size)."""
    cs = 1 << cluster_bits

    def clusters(nbytes):
        return -(-nbytes // cs)

    l1_size = clusters(size) and -(-clusters(size) // (cs // 8))
    l1_clusters, luks_clusters = max(1, clusters(l1_size * 8)), clusters(len(luks))
    per_block = cs * 8 >> REFCOUNT_ORDER
    blocks = table_clusters = 1
    while True:  # the refcount blocks must describe themselves too
        total = 1 + table_clusters + blocks + l1_clusters + luks_clusters
        need = clusters(total) and -(-total // per_block)
        if need == blocks and clusters(blocks * 8) == table_clusters:
            break
        blocks, table_clusters = need, clusters(need * 8)
    table_offset = cs
    blocks_offset = table_offset + table_clusters * cs
    l1_offset = blocks_offset + blocks * cs
    luks_offset = l1_offset + l1_clusters * cs
    end = luks_offset + luks_clusters * cs

    table = np.zeros(table_clusters * cs // 8, ">u8")
    table[:blocks] = blocks_offset + cs * np.arange(blocks, dtype=np.uint64)
    counts = np.zeros(blocks * per_block, ">u2")
    counts[:total] = 1
    header = _header(version, cluster_bits, size, crypt_method, l1_size, l1_offset, table_offset,
                     table_clusters, luks_offset if luks else 0, len(luks), backing, backing_format)
    pieces = [(0, header), (table_offset, table.tobytes()), (blocks_offset, counts.tobytes()),
              (luks_offset, luks)]
    return pieces, end


def _header(version, cluster_bits, size, crypt_method, l1_size, l1_offset, table_offset,
            table_clusters, luks_offset, luks_length, backing, backing_format):
    length = V3_HEADER_LENGTH if version == 3 else V2_FIELDS.size
    extensions = b""
    if backing_format:
        extensions += _extension(EXT_BACKING_FORMAT, backing_format.encode())
    if luks_offset:
        extensions += _extension(EXT_CRYPTO, CRYPTO_EXT_FIELDS.pack(luks_offset, luks_length))
    extensions += EXT_FIELDS.pack(EXT_END, 0)
    name = (backing or "").encode()
    if len(name) > MAX_BACKING_NAME:
        raise InputError(f"backing file name is longer than {MAX_BACKING_NAME} bytes")
    backing_offset = length + len(extensions) if name else 0
    fields = V2_FIELDS.pack(MAGIC, version, backing_offset, len(name), cluster_bits, size, crypt_method,
                      l1_size, l1_offset, table_offset, table_clusters, 0, 0)
    if version == 3:
        fields += V3_FIELDS.pack(0, 0, 0, REFCOUNT_ORDER, length)
    return fields.ljust(length, b"\0") + extensions + name


def _extension(kind, data):
    return EXT_FIELDS.pack(kind, len(data)) + data.ljust(-(-len(data) // 8) * 8, b"\0")
