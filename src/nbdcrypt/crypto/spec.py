"""Cipher specifications in dm-crypt's ``cipher-mode-iv[:hash]`` form.

A :class:`CipherSpec` only names things and checks key sizes; the sector-cipher
engine (:mod:`nbdcrypt.crypto.engine`) does the work.  The same spec reads a
LUKS1 header (``cipher_name`` + ``cipher_mode``) and a dm-crypt/LUKS2 string.

Block ciphers: AES through OpenSSL (pyca/cryptography); the others dm-crypt users
meet through Botan (Debian's python3-botan): the 128-bit serpent, twofish, camellia
and sm4, and the 64-bit cast5 (QEMU's ``cast5-128``), which runs only in CBC and
ECB: XTS is defined for 128-bit blocks, and the engine's CTR counts in them.
"""

from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes

from nbdcrypt.errors import InputError, UnsupportedError

# dm-crypt name -> key sizes in bytes (for XTS, each half).
CIPHER_KEY_SIZES = {
    "aes": (16, 24, 32),
    "serpent": (16, 24, 32),
    "twofish": (16, 24, 32),
    "camellia": (16, 24, 32),
    "sm4": (16,),
    "cast5": (16,),  # dm-crypt takes 5-16 bytes, QEMU 16; Botan's CAST-128 11-16
}
# Block sizes in bytes other than 16.
BLOCK_SIZES = {"cast5": 8}
WIDE_BLOCK_MODES = ("xts", "ctr")  # supported with 128-bit blocks only
MODES = ("xts", "cbc", "ecb", "ctr")
IVS = ("plain64", "plain", "plain64be", "essiv", "benbi", "null")

# ESSIV keys the block cipher with the whole digest (dm-crypt, cryptsetup and QEMU
# alike), so only digests of one of the cipher's key sizes fit.
ESSIV_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "md5": hashes.MD5,
    "sha256": hashes.SHA256,
    "sha3-256": hashes.SHA3_256,
    "sm3": hashes.SM3,
}

AES_XTS_KEY_SIZES = (32, 64)  # two AES keys; OpenSSL has no AES-192-XTS


@dataclass(frozen=True)
class CipherSpec:
    cipher: str
    mode: str
    iv: str
    iv_hash: str | None = None

    def __post_init__(self) -> None:
        # ECB has no IV; dm-crypt ignores one if given, and QEMU writes "ecb-plain64".
        iv_ok = self.iv in IVS or (self.mode == "ecb" and self.iv == "")
        hash_ok = self.iv_hash in ESSIV_HASHES if self.iv == "essiv" else self.iv_hash is None
        if not (self.cipher in CIPHER_KEY_SIZES and self.mode in MODES and iv_ok and hash_ok):
            raise UnsupportedError(f"unsupported cipher {self}")
        if self.block_size != 16 and self.mode in WIDE_BLOCK_MODES:
            raise UnsupportedError(f"unsupported cipher {self}: {self.mode} works with 128-bit block "
                                   f"ciphers only, and {self.cipher} has {8 * self.block_size}-bit blocks")
        essiv = ESSIV_HASHES[self.iv_hash]() if self.iv == "essiv" and self.iv_hash else None
        if essiv is not None and essiv.digest_size not in CIPHER_KEY_SIZES[self.cipher]:
            raise UnsupportedError(f"unsupported cipher {self}: ESSIV keys {self.cipher} with the "
                                   f"digest, and a {self.iv_hash} digest is not a {self.cipher} key")

    @classmethod
    def parse(cls, spec: str) -> "CipherSpec":
        """Parse dm-crypt's form: ``aes-xts-plain64``, ``aes-cbc-essiv:sha256``, ``aes-ecb``."""
        cipher, _, rest = spec.partition("-")
        mode, _, ivspec = rest.partition("-")
        iv, _, iv_hash = ivspec.partition(":")
        if _join(cipher, mode, iv, iv_hash) != spec:  # stray separators, e.g. "aes-cbc-plain:"
            raise UnsupportedError(f"unsupported cipher {spec}")
        return cls(cipher, mode, iv, iv_hash or None)  # its errors name str(self), i.e. spec

    @classmethod
    def from_luks(cls, cipher_name: str, cipher_mode: str) -> "CipherSpec":
        """Read LUKS1's two header strings, e.g. ``("aes", "xts-plain64")``."""
        return cls.parse(f"{cipher_name}-{cipher_mode}")

    @property
    def luks_name(self) -> str:
        return self.cipher

    @property
    def luks_mode(self) -> str:
        return str(self).partition("-")[2]

    def check_key_size(self, key_bytes: int) -> None:
        """Raise InputError unless a key of ``key_bytes`` bytes fits this spec."""
        sizes = self.key_sizes
        if key_bytes not in sizes:
            allowed = " or ".join(str(8 * s) for s in sizes)
            raise InputError(f"key size {8 * key_bytes} bits does not fit {self} ({allowed} bits)")

    @property
    def block_size(self) -> int:
        """The block cipher's block in bytes."""
        return BLOCK_SIZES.get(self.cipher, 16)

    @property
    def key_sizes(self) -> tuple[int, ...]:
        """The key sizes in bytes this spec accepts (XTS: both halves together)."""
        if self.mode != "xts":
            return CIPHER_KEY_SIZES[self.cipher]
        if self.cipher == "aes":
            return AES_XTS_KEY_SIZES
        return tuple(2 * n for n in CIPHER_KEY_SIZES[self.cipher])

    def __str__(self) -> str:
        return _join(self.cipher, self.mode, self.iv, self.iv_hash)


def _join(cipher: str, mode: str, iv: str, iv_hash: str | None) -> str:
    parts = [cipher, mode]
    if iv:
        parts.append(f"{iv}:{iv_hash}" if iv_hash else iv)
    return "-".join(parts)
