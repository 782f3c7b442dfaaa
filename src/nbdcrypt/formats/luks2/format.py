"""Creating LUKS2 headers laid out as ``cryptsetup luksFormat --type luks2`` does."""

import os
import uuid

from nbdcrypt.crypto import wipe
from nbdcrypt.crypto.engine import SECTOR_SIZES
from nbdcrypt.crypto.kdf import digest_size, new_kdf
from nbdcrypt.errors import InputError
from nbdcrypt.formats.image import Passphrase
from nbdcrypt.formats.luks2 import binary, digests, keyslots, segments
from nbdcrypt.formats.luks2.header import Luks2Header
from nbdcrypt.formats.luks_common import Sealing, check_format_args, create_file

HDR_SIZE = 16384
# cryptsetup's default data offset: 16 MiB, all of it metadata and keyslots.
DATA_OFFSET = 16 << 20
# With --offset, cryptsetup's keyslots area fills the space before the data, to this.
MAX_KEYSLOTS_SIZE = 128 << 20
DIGEST_MS = 125  # cryptsetup's fixed budget for the volume-key digest


def format_luks2(path: str | os.PathLike[str], payload_size: int, passphrase: Passphrase,
                 cipher: str = "aes-xts-plain64", key_bits: int = 512, hash_name: str = "sha256",
                 sector_size: int = 4096, pbkdf: str = "argon2id", iter_time_ms: int = 2000,
                 pbkdf_memory: int | None = None, pbkdf_parallel: int | None = None,
                 pbkdf_iterations: int | None = None, label: str = "", subsystem: str = "",
                 detached: bool = False, offset_sectors: int = 0) -> Luks2Header:
    """Create a LUKS2 header file at ``path`` with keyslot 0 opened by ``passphrase``.

    Attached (the default): ``path`` is a new image with ``payload_size`` bytes of
    sparse payload after 16 MiB of metadata.  ``detached``: ``path`` is a new
    header file of 16 MiB whose segment starts at offset 0 of a separate data
    file.  ``offset_sectors`` (cryptsetup's ``--offset``, in 512-byte sectors) puts
    the segment there instead, in the image or the data file, and sizes the
    keyslots area (and so a detached header file) to fill the space before it, up
    to 128 MiB, as cryptsetup does.  Arguments are
    checked before anything is written; the file appears whole or not at all.
    """
    if sector_size not in SECTOR_SIZES:
        raise InputError(f"sector size {sector_size} is not one of {SECTOR_SIZES}")
    spec, key_bytes = check_format_args(path, cipher, key_bits, hash_name, payload_size, sector_size,
                                        offset_sectors)
    data_offset = offset_sectors * 512 or DATA_OFFSET
    keyslots_size = min(data_offset - 2 * HDR_SIZE, MAX_KEYSLOTS_SIZE)
    size = keyslots.area_size(key_bytes)
    if keyslots_size < size:
        raise InputError(f"data offset {offset_sectors} sectors leaves no room for a keyslot (at least "
                         f"{(2 * HDR_SIZE + size) // 512} sectors)")
    kdf = new_kdf(pbkdf, iter_time_ms, key_bytes, hash_name, pbkdf_memory, pbkdf_parallel,
                  pbkdf_iterations)
    bin_header = binary.BinaryHeader(HDR_SIZE, 1, label, "sha256", os.urandom(64), str(uuid.uuid4()),
                                     subsystem, 0)
    bin_header.pack(bytes(bin_header.json_size))  # labels too long fail here, before any work
    slot = keyslots.Keyslot(0, key_bytes, Sealing(kdf, spec, key_bytes, hash_name), 2 * HDR_SIZE, size)
    segment = segments.Segment(0 if detached and not offset_sectors else data_offset, None, 0, spec,
                               sector_size)
    master_key = bytearray(os.urandom(key_bytes))
    try:
        digest_kdf = new_kdf("pbkdf2", DIGEST_MS, key_bytes, hash_name)
        digest = digests.Digest(0, (0,), (0,), digest_kdf,
                                bytes(digest_kdf.derive(master_key, digest_size(hash_name))))
        material = slot.sealing.seal(master_key, passphrase, size)
    finally:
        wipe(master_key)
    doc = {
        "keyslots": {"0": slot.to_json()},
        "tokens": {},
        "segments": {"0": segment.to_json()},
        "digests": {"0": digest.to_json()},
        "config": {"json_size": str(bin_header.json_size), "keyslots_size": str(keyslots_size)},
    }
    file_size = 2 * HDR_SIZE + keyslots_size if detached else data_offset + payload_size
    header = Luks2Header.from_json(bin_header, doc, str(path), file_size)
    create_file(path, file_size, [(slot.offset, material), *header.header_writes()])
    return header
