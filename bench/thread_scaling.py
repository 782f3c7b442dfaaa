"""Does the cipher engine run in parallel on threads?  (Why the queueing layer's
workers are threads, not processes.)  Usage: python -m bench.thread_scaling

Encrypts the same amount of data with 1..N threads sharing one SectorCipher and
prints MB/s; a warm-up pass first, so first-touch page faults do not count.
"""

import os
import threading
import time

from nbdcrypt.crypto.engine import SectorCipher
from nbdcrypt.crypto.spec import CipherSpec

TOTAL = 512 << 20


def run(cipher, threads, size):
    def work():
        buf = bytearray(size)
        for i in range(TOTAL // size // threads):
            cipher.encrypt(buf, i * (size // 512))

    workers = [threading.Thread(target=work) for _ in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return TOTAL / (time.perf_counter() - start) / 1e6


def main():
    cipher = SectorCipher(CipherSpec.parse("aes-xts-plain64"), os.urandom(64))
    cpus = os.cpu_count()
    print(f"{'request':>8} " + " ".join(f"{n} thread{'s' if n > 1 else ' '}" for n in range(1, cpus + 1)))
    for size in (4 << 10, 64 << 10, 1 << 20):
        run(cipher, cpus, size)  # warm-up
        rates = [run(cipher, n, size) for n in range(1, cpus + 1)]
        print(f"{size >> 10:>6} KiB " + " ".join(f"{r:>7.0f} MB/s" for r in rates))


if __name__ == "__main__":
    main()
