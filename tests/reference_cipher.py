"""A plain per-sector reference for the sector-cipher engine, straight from dm-crypt's
definitions: one cryptography Cipher per sector, Python ints for IVs.  Slow and
obviously correct; property tests compare the engine against it."""

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from nbdcrypt.crypto.spec import ESSIV_HASHES


def sector_iv(spec, key, iv_sector):
    """The 16-byte IV dm-crypt derives for ``iv_sector`` (already scaled and tweaked)."""
    iv_sector %= 1 << 64
    if spec.iv == "plain":
        return (iv_sector % (1 << 32)).to_bytes(16, "little")
    if spec.iv == "plain64":
        return iv_sector.to_bytes(16, "little")
    if spec.iv == "plain64be":
        return iv_sector.to_bytes(16, "big")
    if spec.iv == "benbi":
        return (((iv_sector << 5) + 1) % (1 << 64)).to_bytes(16, "big")
    if spec.iv == "essiv":
        digest = hashes.Hash(ESSIV_HASHES[spec.iv_hash]())
        digest.update(key)
        salt_cipher = Cipher(algorithms.AES(digest.finalize()), modes.ECB()).encryptor()
        return salt_cipher.update(iv_sector.to_bytes(16, "little"))
    return bytes(16)  # null, and ecb (unused)


def sector_mode(spec, iv):
    if spec.mode == "xts":
        return modes.XTS(iv)
    if spec.mode == "cbc":
        return modes.CBC(iv)
    if spec.mode == "ctr":
        return modes.CTR(iv)
    return modes.ECB()


def crypt(spec, key, data, sector, *, encrypt, sector_size=512,
          iv_large_sectors=False, iv_tweak=0):
    """Encrypt or decrypt ``data`` (whole sectors starting at ``sector``); return bytes."""
    out = bytearray()
    for i in range(0, len(data), sector_size):
        index = sector + i // sector_size
        iv_sector = (index if iv_large_sectors else index * (sector_size // 512)) + iv_tweak
        cipher = Cipher(algorithms.AES(key), sector_mode(spec, sector_iv(spec, key, iv_sector)))
        context = cipher.encryptor() if encrypt else cipher.decryptor()
        out += context.update(bytes(data[i:i + sector_size])) + context.finalize()
    return bytes(out)
