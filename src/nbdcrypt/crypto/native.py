"""The native AES sector kernel (crypto/_sector.c: OpenSSL's libcrypto, IVs in C, the
GIL released for a whole request), built when the package is installed.

SectorCipher runs AES specs in it, and the numpy engine runs the other ciphers, and
AES too where the kernel is missing or ``NBDCRYPT_ENGINE=numpy`` (read once, at
import) forces it; the numpy engine is also the reference the kernel is tested against.
"""

import os
from typing import TYPE_CHECKING

from nbdcrypt.crypto.spec import CipherSpec
from nbdcrypt.errors import UnsupportedError

if TYPE_CHECKING:
    from typing_extensions import Buffer  # typeshed's; not needed at run time

Kernel: "type[_sector.Kernel] | None"
try:
    from nbdcrypt.crypto import _sector

    Kernel = _sector.Kernel
except ImportError:
    Kernel = None

ENGINES = ("native", "numpy")
# Which engine runs AES specs unless a SectorCipher is told otherwise.
ENGINE = "native" if Kernel is not None and os.environ.get("NBDCRYPT_ENGINE") != "numpy" else "numpy"
_MASK64 = (1 << 64) - 1


def engine_for(spec: CipherSpec, engine: str | None = None) -> str:
    """The engine that runs ``spec``: ``engine`` ("native" or "numpy", default ENGINE) for
    AES, "numpy" for the other ciphers."""
    engine = engine or ENGINE
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} is not one of {ENGINES}")
    return engine if spec.cipher == "aes" else "numpy"


def kernel(spec: CipherSpec, key: "Buffer", sector_size: int, iv_step: int, iv_tweak: int,
           engine: str | None = None) -> "_sector.Kernel | None":
    """A Kernel that runs ``spec`` (its ``encrypt``/``decrypt`` take a buffer and the
    first sector's number), or None where the numpy engine runs it."""
    if engine_for(spec, engine) == "numpy":
        return None
    if Kernel is None:
        raise UnsupportedError("the native sector kernel is not built: reinstall nbdcrypt with a C compiler")
    # dm-crypt's IV sectors count modulo 2^64, the tweak included.
    return Kernel(spec.mode, spec.iv, key, spec.iv_hash, sector_size, iv_step, iv_tweak & _MASK64)
