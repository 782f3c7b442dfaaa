"""Key derivation for LUKS: PBKDF2 and cryptsetup's iteration benchmark.

LUKS1 names one hash for everything (PBKDF2, the anti-forensic splitter, the
master-key digest); :func:`hash_factory` turns that name into a constructor and is
the one place that decides which hashes nbdcrypt supports.  LUKS2's argon2i/argon2id
(argon2-cffi) will sit next to :func:`pbkdf2` here.
"""

import functools
import hashlib
import math
import time

from nbdcrypt.errors import UnsupportedError

# LUKS hash-spec name -> hashlib name.  cryptsetup also knows whirlpool, stribog and
# others that OpenSSL 3 does not ship by default; those stay unsupported.
_HASHES = {
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
def hash_factory(name):
    """The hashlib constructor for a LUKS hash name; UnsupportedError if there is none.

    ripemd160 depends on OpenSSL's build, so support is probed, not assumed.
    """
    lib_name = _HASHES.get(name)
    try:
        hashlib.new(lib_name, b"")
    except (TypeError, ValueError):  # unknown name, or OpenSSL without the digest
        raise UnsupportedError(f"unsupported hash {name}") from None
    return functools.partial(hashlib.new, lib_name)


def digest_size(name):
    return hash_factory(name)().digest_size


def pbkdf2(hash_name, password, salt, iterations, length):
    """PBKDF2-HMAC (RFC 8018) with a LUKS hash name; returns ``length`` bytes."""
    hash_factory(hash_name)
    return hashlib.pbkdf2_hmac(_HASHES[hash_name], password, salt, iterations, length)


@functools.cache
def _blocks_per_second(hash_name):
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


def pbkdf2_iterations(hash_name, iter_time_ms, length, minimum=1000):
    """Iterations that make PBKDF2 producing ``length`` bytes take about ``iter_time_ms``.

    Each output block of the hash's digest size costs a full run of iterations, as
    cryptsetup accounts for by benchmarking at the real key length.
    """
    blocks = math.ceil(length / digest_size(hash_name))
    return max(minimum, int(_blocks_per_second(hash_name) / blocks * iter_time_ms / 1000))
