"""Key derivation for LUKS: PBKDF2, Argon2 and cryptsetup's benchmarks.

LUKS1 names one hash for everything (PBKDF2, the anti-forensic splitter, the
master-key digest); :func:`hash_factory` turns that name into a constructor and is
the one place that decides which hashes nbdcrypt supports.  :class:`Kdf` is one
keyslot's passphrase hashing (LUKS1: always PBKDF2; LUKS2: pbkdf2, argon2i or
argon2id, the latter two through argon2-cffi's reference implementation).
"""

import functools
import hashlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from argon2.low_level import Type, hash_secret_raw

from nbdcrypt.errors import FormatError, InputError, UnsupportedError

if TYPE_CHECKING:
    from typing_extensions import Buffer  # typeshed's; not needed at run time

# LUKS hash-spec name -> hashlib name.  cryptsetup also knows whirlpool, stribog and
# others that OpenSSL 3 does not ship by default; those stay unsupported.
_HASHES: dict[str | None, str] = {  # None: a header that names no hash
    "sha1": "sha1",
    "sha224": "sha224",
    "sha256": "sha256",
    "sha384": "sha384",
    "sha512": "sha512",
    "ripemd160": "ripemd160",
}

# A benchmark run must take at least this long to be worth extrapolating from.
_BENCH_SECONDS = 0.05


@functools.cache
def hash_factory(name: str | None) -> Callable[..., "hashlib._Hash"]:
    """The hashlib constructor for a LUKS hash name; UnsupportedError if there is none.

    ripemd160 depends on OpenSSL's build, so support is probed, not assumed.
    """
    lib_name = _HASHES.get(name)
    try:
        if lib_name is None:
            raise ValueError(name)
        hashlib.new(lib_name, b"")
    except ValueError:  # unknown name, or OpenSSL without the digest
        raise UnsupportedError(f"unsupported hash {name}") from None
    return functools.partial(hashlib.new, lib_name)


def digest_size(name: str | None) -> int:
    return hash_factory(name)().digest_size


def pbkdf2(hash_name: str | None, password: "Buffer", salt: "Buffer", iterations: int, length: int) -> bytes:
    """PBKDF2-HMAC (RFC 8018) with a LUKS hash name; returns ``length`` bytes."""
    hash_factory(hash_name)
    return hashlib.pbkdf2_hmac(_HASHES[hash_name], password, salt, iterations, length)


@functools.cache
def _blocks_per_second(hash_name: str) -> float:
    """PBKDF2 iterations per second of thread CPU time, for one digest-sized output block.

    Thread CPU time, like cryptsetup's benchmark, so a busy machine or other threads
    do not inflate the result.  Doubling until a run is long enough keeps it fast.
    """
    iterations = 1000
    while True:
        start = time.thread_time()
        pbkdf2(hash_name, b"benchmark", bytes(32), iterations, 1)
        elapsed = time.thread_time() - start
        if elapsed >= _BENCH_SECONDS:
            return iterations / elapsed
        iterations *= 2


def pbkdf2_iterations(hash_name: str, iter_time_ms: float, length: int, minimum: int = 1000) -> int:
    """Iterations that make PBKDF2 producing ``length`` bytes take about ``iter_time_ms``.

    Each output block of the hash's digest size costs a full run of iterations, as
    cryptsetup accounts for by benchmarking at the real key length.
    """
    blocks = math.ceil(length / digest_size(hash_name))
    return max(minimum, int(_blocks_per_second(hash_name) / blocks * iter_time_ms / 1000))


# -- Argon2 ----------------------------------------------------------------------------

ARGON2_TYPES = {"argon2i": Type.I, "argon2id": Type.ID}
KDF_TYPES = ("pbkdf2", *ARGON2_TYPES)
# cryptsetup's limits (lib/utils_pbkdf.c): no header it writes goes past them, and
# they bound what a hostile header can make us spend.
MAX_ARGON2_MEMORY_KB = 4 * 1024 * 1024
MAX_ARGON2_CPUS = 4
MIN_ARGON2_TIME = 4
MAX_ARGON2_TIME = 1 << 20
MAX_PBKDF2_ITERATIONS = 1 << 30


@dataclass(frozen=True)
class Kdf:
    """One keyslot's passphrase hashing.  ``time`` is PBKDF2's iteration count or
    Argon2's time cost; ``memory`` (KiB) and ``cpus`` are Argon2's only."""

    type: str
    salt: bytes
    time: int
    hash: str | None = None
    memory: int = 0
    cpus: int = 0

    def check(self, where: str) -> None:
        """FormatError/UnsupportedError unless every parameter is in cryptsetup's range."""
        if self.type == "pbkdf2":
            try:
                hash_factory(self.hash)
            except UnsupportedError as e:
                raise UnsupportedError(f"{where}: {e}") from None
            _check_range(self.time, 1, MAX_PBKDF2_ITERATIONS, f"{where} PBKDF2 iterations")
        elif self.type in ARGON2_TYPES:
            _check_range(self.time, 1, MAX_ARGON2_TIME, f"{where} Argon2 time cost")
            _check_range(self.cpus, 1, MAX_ARGON2_CPUS, f"{where} Argon2 threads")
            _check_range(self.memory, 8 * self.cpus, MAX_ARGON2_MEMORY_KB, f"{where} Argon2 memory (KiB)")
        else:
            raise UnsupportedError(f"{where}: unsupported key derivation {self.type}")

    def cost(self, length: int) -> int:
        """Work units to derive ``length`` bytes, to bound what one unlock spends: PBKDF2
        runs its iterations once per output block; an Argon2 pass over 1 KiB costs about
        four PBKDF2 iterations (0.2-1 microsecond each, on one core)."""
        if self.type == "pbkdf2":
            return self.time * math.ceil(length / digest_size(self.hash))
        return 4 * self.time * self.memory

    def derive(self, passphrase: "Buffer", length: int) -> bytearray:
        """``length`` bytes derived from ``passphrase``, as a bytearray to wipe."""
        if self.type == "pbkdf2":
            return bytearray(pbkdf2(self.hash, passphrase, self.salt, self.time, length))
        return bytearray(hash_secret_raw(bytes(passphrase), self.salt, self.time, self.memory,
                                         self.cpus, length, ARGON2_TYPES[self.type]))


def _check_range(value: object, low: int, high: int, what: str) -> None:
    if not (isinstance(value, int) and low <= value <= high):
        raise FormatError(f"{what} is {value}, expected {low} to {high}")


def default_argon2_memory() -> int:
    """cryptsetup's default: 1 GiB, but never more than half the physical memory."""
    physical_kb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 1024
    return min(1024 * 1024, physical_kb // 2)


def argon2_params(iter_time_ms: float, memory_kb: int, cpus: int) -> tuple[int, int]:
    """Argon2 ``(time, memory)`` that take about ``iter_time_ms``, as cryptsetup picks
    them: memory first, then time (at least 4); if 4 passes are already too slow,
    less memory."""
    start = time.monotonic()
    hash_secret_raw(b"benchmark", bytes(16), 1, memory_kb, cpus, 32, Type.ID)
    pass_ms = max((time.monotonic() - start) * 1000, 0.001)
    passes = int(iter_time_ms / pass_ms)
    if passes >= MIN_ARGON2_TIME:
        return min(passes, MAX_ARGON2_TIME), memory_kb
    return MIN_ARGON2_TIME, max(8 * cpus, int(memory_kb * passes / MIN_ARGON2_TIME))


def new_kdf(kind: str, iter_time_ms: float, key_bytes: int, hash_name: str = "sha256", memory_kb: int | None = None,
            cpus: int | None = None, iterations: int | None = None, salt_size: int = 32) -> Kdf:
    """A fresh keyslot Kdf with a random salt, costed like cryptsetup's luksFormat;
    ``iterations`` skips the benchmark (cryptsetup's --pbkdf-force-iterations)."""
    if iter_time_ms <= 0:
        raise InputError(f"iteration time must be positive, not {iter_time_ms} ms")
    if iterations is not None and iterations <= 0:
        raise InputError(f"PBKDF iterations must be positive, not {iterations}")
    salt = os.urandom(salt_size)
    if kind == "pbkdf2":
        time_cost = iterations or pbkdf2_iterations(hash_name, iter_time_ms, key_bytes)
        kdf = Kdf("pbkdf2", salt, time_cost, hash_name)
    elif kind in ARGON2_TYPES:
        cpus = cpus or min(MAX_ARGON2_CPUS, os.cpu_count() or 1)
        memory_kb = memory_kb or default_argon2_memory()
        if iterations:
            time_cost = iterations
        else:
            time_cost, memory_kb = argon2_params(iter_time_ms, memory_kb, cpus)
        kdf = Kdf(kind, salt, time_cost, None, memory_kb, cpus)
    else:
        raise InputError(f"unknown PBKDF {kind}; choose one of {', '.join(KDF_TYPES)}")
    try:
        kdf.check("new keyslot")
    except FormatError as e:
        raise InputError(str(e)) from None
    return kdf
