"""Cipher specifications in dm-crypt's ``cipher-mode-iv[:hash]`` form.

A :class:`CipherSpec` only names things and checks key sizes; the sector-cipher
engine (:mod:`nbdcrypt.crypto.engine`) does the work.  The same spec reads a
LUKS1 header (``cipher_name`` + ``cipher_mode``) and a dm-crypt/LUKS2 string.

Block ciphers: AES through OpenSSL (pyca/cryptography); the other 128-bit block
ciphers dm-crypt users meet through Botan (Debian's python3-botan).  64-bit block
ciphers (cast5, blowfish, des3_ede) are not supported: dm-crypt's IVs and XTS
assume 16-byte blocks, and nothing else here does.
"""

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
}
MODES = ("xts", "cbc", "ecb", "ctr")
IVS = ("plain64", "plain", "plain64be", "essiv", "benbi", "null")

# ESSIV keys the block cipher with the digest, so only 16/24/32-byte digests fit.
ESSIV_HASHES = {
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

    def __post_init__(self):
        # ECB has no IV; dm-crypt ignores one if given, and QEMU writes "ecb-plain64".
        iv_ok = self.iv in IVS or (self.mode == "ecb" and self.iv == "")
        hash_ok = self.iv_hash in ESSIV_HASHES if self.iv == "essiv" else self.iv_hash is None
        if not (self.cipher in CIPHER_KEY_SIZES and self.mode in MODES and iv_ok and hash_ok):
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
        sizes = self.key_sizes
        if key_bytes not in sizes:
            allowed = " or ".join(str(8 * s) for s in sizes)
            raise InputError(f"key size {8 * key_bytes} bits does not fit {self} ({allowed} bits)")

    @property
    def key_sizes(self):
        """The key sizes in bytes this spec accepts (XTS: both halves together)."""
        if self.mode != "xts":
            return CIPHER_KEY_SIZES[self.cipher]
        if self.cipher == "aes":
            return AES_XTS_KEY_SIZES
        return tuple(2 * n for n in CIPHER_KEY_SIZES[self.cipher])

    def __str__(self) -> str:
        parts = [self.cipher, self.mode]
        if self.iv:
            parts.append(f"{self.iv}:{self.iv_hash}" if self.iv_hash else self.iv)
        return "-".join(parts)
