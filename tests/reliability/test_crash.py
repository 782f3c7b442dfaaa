"""Crash consistency (LUKS1, LUKS2, qcow2): kill the server with SIGKILL at random moments and check that
everything acknowledged before the last completed flush reads back exactly, and
that every other sector holds one of the versions written to it, never garbage.

A killed process loses nothing the kernel already has, so this proves the server
acknowledges only what it wrote and never tears a sector; what a power cut would
drop (data not yet flushed) may be old or new here.  qcow2 must also pass
``qemu-img check`` after every cycle (leaked clusters allowed).  CI runs a few cycles;
NBDCRYPT_CRASH_CYCLES=50 is the long run (docs/reliability.md).
"""

import json
import os
import random
import signal
import time

import pytest

from tests.conftest import serving
from tests.tools import nbdcrypt_cmd, require, run

nbd = pytest.importorskip("nbd", reason="needs python3-libnbd")

CYCLES = int(os.environ.get("NBDCRYPT_CRASH_CYCLES", "4"))
SIZE = 8 << 20
SECTOR = 512


class Model:
    """The acknowledged contents, and what each sector may hold after a crash."""

    def __init__(self, disk):
        self.current = bytearray(disk)  # every acknowledged write applied
        self.durable = bytearray(disk)  # as of the last completed flush
        self.since_flush = {}           # sector -> versions written after that flush

    def written(self, offset, data):
        self.current[offset:offset + len(data)] = data
        for sector in range(offset // SECTOR, -(-(offset + len(data)) // SECTOR)):
            version = bytes(self.current[sector * SECTOR:(sector + 1) * SECTOR])
            self.since_flush.setdefault(sector, []).append(version)

    def flushed(self):
        self.durable[:] = self.current
        self.since_flush.clear()

    def maybe_written(self, offset, data):
        """A write in flight when the server died: it may or may not have landed."""
        for sector in range(offset // SECTOR, -(-(offset + len(data)) // SECTOR)):
            version = bytearray(self.current[sector * SECTOR:(sector + 1) * SECTOR])
            start, end = max(offset, sector * SECTOR), min(offset + len(data), (sector + 1) * SECTOR)
            version[start - sector * SECTOR:end - sector * SECTOR] = data[start - offset:end - offset]
            self.since_flush.setdefault(sector, []).append(bytes(version))

    def check(self, disk):
        for sector in range(len(disk) // SECTOR):
            span = slice(sector * SECTOR, (sector + 1) * SECTOR)
            allowed = [self.durable[span]] + self.since_flush.get(sector, [])
            if disk[span] not in allowed:
                pytest.fail(f"sector {sector} holds neither its flushed nor a written version")


def kill_server(uri):
    """SIGKILL nbdkit (the process doing the I/O) and the serve supervising it."""
    sock = uri.split("socket=")[1]
    for pid in run(["pgrep", "-f", f"--unix {sock}"], check=False).stdout.split():
        os.kill(int(pid), signal.SIGKILL)


class Writer:
    """Keeps up to ``depth`` asynchronous writes in flight, never two in one slot, so a
    write's outcome does not depend on the order the server applied the others."""

    SLOT = 128 << 10

    def __init__(self, h, model, rnd, depth=8):
        self.h, self.model, self.rnd, self.depth = h, model, rnd, depth
        self.in_flight = {}  # cookie -> (slot, offset, data)

    def run_until(self, deadline):
        while time.monotonic() < deadline:
            while len(self.in_flight) < self.depth:
                self._submit()
            self.h.poll(-1)
            self._reap()
            if self.rnd.random() < 0.05:
                while self.in_flight:  # a flush covers what completed before it
                    self.h.poll(-1)
                    self._reap()
                self.h.flush()
                self.model.flushed()

    def abandon(self):
        """The server is dead: what was in flight may or may not be on disk."""
        for _, offset, data in self.in_flight.values():
            self.model.maybe_written(offset, data)

    def _submit(self):
        busy = {slot for slot, _, _ in self.in_flight.values()}
        slot = self.rnd.choice([s for s in range(SIZE // self.SLOT) if s not in busy])
        length = self.rnd.choice([512, 4096, 12288, 65536]) + self.rnd.choice([0, 0, 100])
        offset = slot * self.SLOT + self.rnd.randrange(self.SLOT - length)
        if self.rnd.random() < 0.5:
            offset -= offset % SECTOR
        data = self.rnd.randbytes(length)
        cookie = self.h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), offset)
        self.in_flight[cookie] = (slot, offset, data)

    def _reap(self):
        for cookie in [c for c in self.in_flight if self.h.aio_command_completed(c)]:
            _, offset, data = self.in_flight.pop(cookie)
            self.model.written(offset, data)


FORMATS = {
    "luks1": [],
    "luks2": ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"],
    "qcow2": ["--cluster-size", "4K"],  # small clusters: many allocations, tables that grow
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_acknowledged_flushed_writes_survive_sigkill(tmp_path, key_file, nbd_handle, fmt):
    require("nbdkit", "pgrep")
    image = tmp_path / "crash.img"
    run(nbdcrypt_cmd() + ["format", "--type", fmt, str(image), str(SIZE), "--key-file", str(key_file),
                          "--iter-time", "10", *FORMATS[fmt]])
    rnd = random.Random(1234)
    model = None
    for cycle in range(CYCLES + 1):
        with serving(image, key_file, killed=True) as uri:
            h = nbd_handle(uri)
            disk = h.pread(SIZE, 0)
            if model is not None:
                model.check(disk)
            model = Model(disk)  # what survived is the next cycle's starting point
            if cycle == CYCLES:
                break
            writer = Writer(h, model, rnd)
            writer.run_until(time.monotonic() + rnd.uniform(0.2, 1.0))
            kill_server(uri)  # with writes in flight
            writer.abandon()
        if fmt == "qcow2":
            qemu_check(image, key_file)


def qemu_check(image, key_file):
    """After a crash qcow2 may leak clusters, nothing worse (no corruption, no error)."""
    require("qemu-img")
    result = run(["qemu-img", "check", "--output=json", "--object", f"secret,id=s0,file={key_file}",
                  "--image-opts", f"driver=qcow2,encrypt.key-secret=s0,file.filename={image}"], check=False)
    report = json.loads(result.stdout)
    assert report.get("corruptions", 0) == 0 and report.get("check-errors", 0) == 0, report
