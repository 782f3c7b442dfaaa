"""Crypt worker processes (``--worker-type process``) through nbdkit: they write the
ciphertext threads write (and QEMU reads it), a killed worker fails only the request
it held, with EIO, and is replaced, no client hangs, and the key never reaches a
worker's command line or environment."""

import errno
import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from nbdcrypt.daemon.ctl import request
from nbdcrypt.datapath.workers import SLOT
from nbdcrypt.formats import open_header
from tests.conftest import PASSPHRASE, nbdcrypt_luks1, serving
from tests.tools import require, run

nbd = pytest.importorskip("nbd", reason="needs python3-libnbd")

SIZE = 16 << 20
# Disjoint writes, so their outcome does not depend on the order they land in: unaligned
# ones, one longer than a worker's shared slot, and many small ones.
WRITES = [(0, 512), (4096, 4096), (10_000, 70_000), (1 << 20, SLOT + (1 << 20) + 512), ((7 << 20) - 100, 300),
          (8 << 20, 1 << 20)] + [((9 << 20) + i * 8193, 4096 - i) for i in range(64)]
TIMEOUT = 60  # no request may take longer: a hang fails the test instead of stalling it


def payload(i, length):
    return np.random.default_rng(i).integers(0, 256, length, dtype=np.uint8).tobytes()


def in_parallel(uri, nbd_handle, jobs, work):
    """Run ``work(handle, job)`` for every job on four threads with a connection each;
    their exceptions are raised here, and a hang is a failure, not a stall."""
    handles = [nbd_handle(uri) for _ in range(4)]
    pool = ThreadPoolExecutor(4)
    futures = [pool.submit(lambda h=h, mine=jobs[n::4]: [work(h, job) for job in mine])
               for n, h in enumerate(handles)]
    try:
        for future in futures:
            future.result(TIMEOUT)
    finally:
        pool.shutdown(wait=False)
    for h in handles:
        h.shutdown()


def master_key(image):
    with open(image, "rb") as f:
        return bytes(open_header(f, str(image)).unlock(PASSPHRASE, f))


def assert_key_unreachable(pid, key):
    """The key is not in the worker's command line or environment, and it dumps no core."""
    for name in ("cmdline", "environ"):
        text = Path(f"/proc/{pid}/{name}").read_bytes()
        assert key not in text and key.hex().encode() not in text
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert [v.partition(b"=")[0] for v in environ if v] == [b"PYTHONPATH"]
    limits = Path(f"/proc/{pid}/limits").read_text()
    assert [line.split()[4:6] for line in limits.splitlines() if line.startswith("Max core file size")] == [["0", "0"]]


def test_process_workers_write_what_thread_workers_write(tmp_path, key_file, nbd_handle):
    require("qemu-img")
    threads_image = nbdcrypt_luks1(tmp_path / "threads.img", key_file, f"{SIZE}")
    processes_image = tmp_path / "processes.img"
    shutil.copyfile(threads_image, processes_image)  # same header, same master key
    model = bytearray(SIZE)
    for i, (offset, length) in enumerate(WRITES):
        model[offset:offset + length] = payload(i, length)
    control = str(tmp_path / "control.sock")
    for kind, image in (("thread", threads_image), ("process", processes_image)):
        with serving(image, key_file, "--worker-type", kind, "--workers", "2", "--control", control,
                     "--inline-below", "0") as uri:
            h = nbd_handle(uri)
            h.zero(SIZE, 0)
            in_parallel(uri, nbd_handle, list(enumerate(WRITES)),
                        lambda h, job: h.pwrite(payload(job[0], job[1][1]), job[1][0]))
            assert h.pread(SIZE, 0) == model
            h.shutdown()
            status, stats = request(control, "status"), request(control, "stats")
        assert len(status["worker_pids"]) == (2 if kind == "process" else 0)
        assert stats["write"]["errors"] == 0 and stats["worker_restarts"] == 0
    assert processes_image.read_bytes() == threads_image.read_bytes()
    raw = tmp_path / "model.raw"
    raw.write_bytes(model)
    result = run(["qemu-img", "compare", "--object", f"secret,id=s0,file={key_file}", "--image-opts",
                  f"driver=raw,file.filename={raw}", f"driver=luks,key-secret=s0,file.filename={processes_image}"])
    assert "Images are identical" in result.stdout


def queued_requests(pid):
    """Bytes waiting, unread, in the worker's socket (ss, as an outsider sees it)."""
    lines = [line.split() for line in run(["ss", "-xp"]).stdout.splitlines() if f"pid={pid}," in line]
    return sum(int(fields[2]) for fields in lines)


def wait_until(condition, what):
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def test_killed_worker_fails_its_request_with_eio_and_is_replaced(tmp_path, key_file, nbd_handle):
    require("ss")
    image = nbdcrypt_luks1(tmp_path / "k.img", key_file, f"{SIZE}")
    key = master_key(image)
    control = str(tmp_path / "control.sock")
    old, new = os.urandom(1 << 20), os.urandom(1 << 20)
    with serving(image, key_file, "--worker-type", "process", "--workers", "1", "--control", control,
                 "--inline-below", "0") as uri:
        h = nbd_handle(uri)
        h.pwrite(old, 0)
        [pid] = request(control, "status")["worker_pids"]
        assert_key_unreachable(pid, key)
        # Stop the worker, let a write reach it, then kill it: that write is in flight.
        os.kill(pid, signal.SIGSTOP)
        outcome = []

        def write():
            client = nbd_handle(uri)
            try:
                client.pwrite(new, 0)
                outcome.append("written")
            except nbd.Error as e:
                outcome.append(e.errnum)
            client.shutdown()

        writer = threading.Thread(target=write)
        writer.start()
        wait_until(lambda: queued_requests(pid) > 0, "the write reached the stopped worker")
        os.kill(pid, signal.SIGKILL)
        writer.join(TIMEOUT)
        assert not writer.is_alive(), "the client hangs on a dead worker"
        assert outcome == [errno.EIO]
        wait_until(lambda: request(control, "status")["worker_pids"] not in ([], [pid]), "a worker replaced it")
        [replacement] = request(control, "status")["worker_pids"]
        assert_key_unreachable(replacement, key)
        assert h.pread(1 << 20, 0) == old  # the failed write wrote nothing
        h.pwrite(new, 0)
        assert h.pread(1 << 20, 0) == new
        h.shutdown()
        stats = request(control, "stats")
    assert stats["worker_restarts"] == 1
    assert stats["write"]["errors"] == 1 and stats["read"]["errors"] == 0


def test_killing_workers_under_load_hangs_no_client(tmp_path, key_file, nbd_handle):
    """Four clients write and read back their own lanes while every worker is killed:
    requests succeed or fail with EIO, a failed write leaves its range as it was,
    and once the replacements are up every request succeeds again."""
    image = nbdcrypt_luks1(tmp_path / "l.img", key_file, f"{SIZE}")
    control = str(tmp_path / "control.sock")
    lane = SIZE // 4
    model = bytearray(SIZE)
    failures = {"pwrite": [], "pread": []}
    replaced = threading.Event()

    def attempt(call, *args):
        """The call's result, or None if it failed (which it may only before the replacement)."""
        late = replaced.is_set()
        try:
            return call(*args) or True
        except nbd.Error as e:
            assert not late, f"{call.__name__} failed after the workers were replaced: {e}"
            failures[call.__name__].append(e.errnum)

    def client(h, n):
        rng = np.random.default_rng(n)
        done_after_replacement = 0
        while done_after_replacement < 20:
            done_after_replacement += replaced.is_set()
            length = int(rng.integers(1, 256 << 10))
            offset = n * lane + int(rng.integers(0, lane - length))
            data = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
            if attempt(h.pwrite, data, offset):
                model[offset:offset + length] = data
            got = attempt(h.pread, length, offset)
            assert got in (None, model[offset:offset + length])

    with serving(image, key_file, "--worker-type", "process", "--workers", "2", "--control", control,
                 "--inline-below", "0") as uri:
        h = nbd_handle(uri)
        h.zero(SIZE, 0)
        h.shutdown()
        pids = set(request(control, "status")["worker_pids"])

        def kill_all_then_await_replacements():
            time.sleep(0.5)  # into the clients' I/O
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            wait_until(lambda: len(set(request(control, "status")["worker_pids"]) - pids) == 2,
                       "both workers were replaced")
            replaced.set()

        killer = threading.Thread(target=kill_all_then_await_replacements)
        killer.start()
        in_parallel(uri, nbd_handle, range(4), client)
        killer.join()
        stats = request(control, "stats")
    assert set(failures["pwrite"] + failures["pread"]) <= {errno.EIO}
    assert stats["worker_restarts"] == 2
    assert stats["write"]["errors"] == len(failures["pwrite"])
    assert stats["read"]["errors"] == len(failures["pread"])
