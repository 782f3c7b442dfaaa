"""Threads or processes for the queueing layer's crypt workers?  The numbers behind
the default (docs/queueing.md).  Usage: python -m bench.thread_scaling [--fio]

1. The engine alone: the same cipher encrypting on 1..N threads (does it scale
   with the GIL?).
2. The two worker pools of :mod:`nbdcrypt.datapath.workers`, CPUs workers each, fed
   by 4 submitting threads as nbdkit's request threads feed them: MB/s of crypto
   through threads vs processes (copies into shared memory and hand-offs included).
3. With ``--fio``: fio (nbd engine, QD8) against ``nbdcrypt serve --worker-type
   thread|process``, random reads and writes, end to end.

Each figure is the best of a few short rounds (other jobs share these machines).
"""

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from nbdcrypt.crypto.engine import SectorCipher
from nbdcrypt.crypto.spec import CipherSpec
from nbdcrypt.datapath.stats import Timing
from nbdcrypt.datapath.workers import CipherRecipe, ProcessWorkers, ThreadWorkers

SIZES = (4 << 10, 64 << 10, 1 << 20)
SUBMITTERS = 4
ROUNDS, ROUND_SECONDS = 3, 0.5


def best_rate(size, threads, encrypt_one):
    """MB/s of ``threads`` threads each calling ``encrypt_one(buf, sector)`` in a loop."""
    best = 0.0
    for _ in range(ROUNDS + 1):  # the first round warms up
        done = [0] * threads
        stop = time.perf_counter() + ROUND_SECONDS

        def work(n):
            buf = bytearray(size)
            while time.perf_counter() < stop:
                encrypt_one(buf, done[n] * (size // 512))
                done[n] += 1

        workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, sum(done) * size / (time.perf_counter() - start) / 1e6)
    return best


def through(pool, cipher):
    def encrypt_one(buf, sector):
        pool.enter()
        pool.run(Timing(), cipher, True, buf, sector)
    return encrypt_one


def engine_and_pools(cipher, key):
    cpus = os.cpu_count()
    columns = ", ".join(f"{n} thread{'s' * (n > 1)}" for n in range(1, cpus + 1))
    print(f"engine alone, aes-xts-plain64, MB/s: {columns}")
    for size in SIZES:
        rates = [best_rate(size, n, cipher.encrypt) for n in range(1, cpus + 1)]
        print(f"  {size >> 10:>5} KiB " + " ".join(f"{r:>7.0f}" for r in rates))
    print(f"\npools of {cpus} workers fed by {SUBMITTERS} threads, MB/s: threads, processes, processes/threads")
    recipe = CipherRecipe(cipher, key)
    threads, processes = ThreadWorkers(cpus), ProcessWorkers([recipe], cpus)
    try:
        for size in SIZES:
            t = best_rate(size, SUBMITTERS, through(threads, cipher))
            p = best_rate(size, SUBMITTERS, through(processes, cipher))
            print(f"  {size >> 10:>5} KiB {t:>7.0f} {p:>7.0f}   {p / t:.2f}")
    finally:
        threads.close()
        processes.close()
        recipe.wipe()


def fio_end_to_end():
    from bench.fio import Cell, run_cell

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        key, image = workdir / "key", workdir / "img"
        key.write_bytes(b"bench")
        nbdcrypt = [str(Path(sys.executable).with_name("nbdcrypt"))]
        subprocess.run([*nbdcrypt, "format", "--type", "luks1", "--key-file", key, "--iter-time", "10",
                        image, "256M"], check=True, capture_output=True)
        print("\nfio, nbd engine, QD8, MB/s: thread workers, process workers, processes/threads")
        results = {}
        for kind in ("thread", "process"):
            sock = workdir / f"{kind}.sock"
            with subprocess.Popen([*nbdcrypt, "serve", image, "--key-file", key, "--socket", sock,
                                   "--worker-type", kind], stdout=subprocess.PIPE, text=True) as serve:
                uri = serve.stdout.readline().rsplit(" at ", 1)[1].strip()
                run_cell(uri, Cell("randwrite", 1 << 20, 8), "256M", 3, 0, workdir)  # allocate the file
                for workload in ("randread", "randwrite"):
                    for size in SIZES:
                        cell = Cell(workload, size, 8)
                        results[kind, cell] = run_cell(uri, cell, "256M", 3, 1, workdir)["mbps"]
                serve.terminate()
        for workload in ("randread", "randwrite"):
            for size in SIZES:
                t, p = results["thread", Cell(workload, size, 8)], results["process", Cell(workload, size, 8)]
                print(f"  {workload:9} {size >> 10:>5} KiB {t:>7.0f} {p:>7.0f}   {p / t:.2f}")


def main():
    key = os.urandom(64)
    engine_and_pools(SectorCipher(CipherSpec.parse("aes-xts-plain64"), key), key)
    if "--fio" in sys.argv[1:]:
        fio_end_to_end()


if __name__ == "__main__":
    main()
