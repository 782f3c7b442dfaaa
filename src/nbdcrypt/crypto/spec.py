"""Cipher specifications in dm-crypt's ``cipher-mode-iv[:hash]`` form.

A :class:`CipherSpec` only names things and checks key sizes; the sector-cipher
engine (:mod:`nbdcrypt.crypto.engine`) does the work.  The same spec reads a
LUKS1 header (``cipher_name`` + ``cipher_mode``) and a dm-crypt/LUKS2 string.
"""

from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes

from nbdcrypt.errors import InputError, UnsupportedError

CIPHERS = ("aes",)
MODES = ("xts", "cbc", "ecb", "ctr")
IVS = ("plain64", "plain", "plain64be", "essiv", "benbi", "null")

# ESSIV keys an AES cipher with the digest, so only 16/24/32-byte digests fit.
ESSIV_HASHES = {
    "md5": hashes.MD5,
    "sha256": hashes.SHA256,
    "sha3-256": hashes.SHA3_256,
    "sm3": hashes.SM3,
}

AES_KEY_SIZES = (16, 24, 32)
XTS_KEY_SIZES = (32, 64)  # two AES keys; OpenSSL has no AES-192-XTS


@dataclass(frozen=True)
class CipherSpec:
    cipher: str
    mode: str
    iv: str
    iv_hash: str | None = None

    def __post_init__(self):
        # ECB has no IV; dm-crypt ignores one if given, and QEMU writes "ecb-plain64".
        iv_ok = self.iv in IVS or (self.mode == "ecb" and self.iv == "")
        hash_ok = self.iv_hash in ESSIV_HASHES if self.iv == "essiv" else self.iv_hash is None
        if not (self.cipher in CIPHERS and self.mode in MODES and iv_ok and hash_ok):
            raise UnsupportedError(f"unsupported cipher {self}")

    @classmethod
    def parse(cls, spec: str) -> "CipherSpec":
        """Parse dm-crypt's form: ``aes-xts-plain64``, ``aes-cbc-essiv:sha256``, ``aes-ecb``."""
        cipher, _, rest = spec.partition("-")
        mode, _, ivspec = rest.partition("-")
        iv, _, iv_hash = ivspec.partition(":")
        try:
            parsed = cls(cipher, mode, iv, iv_hash or None)
        except UnsupportedError:
            raise UnsupportedError(f"unsupported cipher {spec}") from None
        if str(parsed) != spec:  # stray separators, e.g. "aes-cbc-plain:"
            raise UnsupportedError(f"unsupported cipher {spec}")
        return parsed

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
        sizes = XTS_KEY_SIZES if self.mode == "xts" else AES_KEY_SIZES
        if key_bytes not in sizes:
            allowed = " or ".join(str(8 * s) for s in sizes)
            raise InputError(f"key size {8 * key_bytes} bits does not fit {self} ({allowed} bits)")

    def __str__(self) -> str:
        parts = [self.cipher, self.mode]
        if self.iv:
            parts.append(f"{self.iv}:{self.iv_hash}" if self.iv_hash else self.iv)
        return "-".join(parts)
