#!/usr/bin/env python3
"""MB/s of the sector-cipher engines by spec x sector size x request size x direction:
the native kernel and the numpy engine side by side, next to a per-sector baseline
(one cryptography object per sector, as QEMU and nbdkit do) and raw AES-ECB over
the same bytes (the physical limit), one core (CPU time of the benchmarking thread).

Usage, from the repository root: .venv/bin/python -m bench.engine_bench [SPEC ...]
(default: aes-xts-plain64 aes-cbc-essiv:sha256)
"""

import os
import sys
import time

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from nbdcrypt.crypto import native
from nbdcrypt.crypto.engine import SectorCipher
from nbdcrypt.crypto.spec import CipherSpec
from tests import reference_cipher

REQUESTS = (4096, 65536, 1 << 20)


def mb_per_s(fn, nbytes, seconds=0.3, rounds=5):
    """Best of a few rounds, in this thread's CPU time: other processes share these
    machines, and time they take from us should not count against the engine."""
    fn()
    best = 0.0
    for _ in range(rounds):
        calls, start = 0, time.thread_time()
        while (elapsed := time.thread_time() - start) < seconds / rounds:
            fn()
            calls += 1
        best = max(best, nbytes * calls / elapsed / 1e6)
    return best


def main(spec_texts):
    ecb = Cipher(algorithms.AES(os.urandom(32)), modes.ECB()).encryptor()
    engines = ["native", "numpy"] if native.Kernel else ["numpy"]
    print(f"{'spec':22} {'sector':>6} {'request':>8} {'dir':>4} "
          + "".join(f"{name:>8} " for name in engines) + f"{'per-sector':>10} {'raw ECB':>8}   (MB/s)")
    for spec_text in spec_texts:
        spec = CipherSpec.parse(spec_text)
        key = os.urandom(64 if spec.mode == "xts" else 32)
        for sector_size in (512, 4096):
            ciphers = [SectorCipher(spec, key, sector_size, engine=name) for name in engines]
            for size in REQUESTS:
                buf, out = bytearray(size), bytearray(size + 16)
                raw = mb_per_s(lambda: ecb.update_into(buf, out), size)
                for encrypt, name in ((True, "enc"), (False, "dec")):
                    rates = [mb_per_s(lambda: (c.encrypt if encrypt else c.decrypt)(buf, 7), size) for c in ciphers]
                    baseline = mb_per_s(lambda: reference_cipher.crypt(
                        spec, key, buf, 7, encrypt=encrypt, sector_size=sector_size), size, 0.05)
                    print(f"{spec_text:22} {sector_size:6} {size:8} {name:>4} "
                          + "".join(f"{rate:8.0f} " for rate in rates) + f"{baseline:10.0f} {raw:8.0f}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["aes-xts-plain64", "aes-cbc-essiv:sha256"])
