"""One benchmark cell = one fio run (nbd ioengine) against one served URI."""

import itertools
import json
import subprocess
import time
from dataclasses import dataclass

import numpy

WORKLOADS = {
    "seqread": ["--rw=read"],
    "seqwrite": ["--rw=write"],
    "randread": ["--rw=randread"],
    "randwrite": ["--rw=randwrite"],
    "mixed": ["--rw=randrw", "--rwmixread=50"],
}
BLOCK_SIZES = (4096, 65536, 131072, 1 << 20)
QUEUE_DEPTHS = (1, 8, 32)
# The default run keeps QD32 for the smallest and largest requests only: about 25 minutes on 2 cores.
DEEP_QD, DEEP_SIZES = 32, (4096, 1 << 20)
QUICK = (("randread", "mixed"), (4096, 1 << 20), (8,))
CPU_SAMPLE_SECONDS = 0.1


@dataclass(frozen=True)
class Cell:
    workload: str
    bs: int
    qd: int

    def __str__(self):
        return f"{self.workload} {human_size(self.bs)} QD{self.qd}"


def matrix(workloads=tuple(WORKLOADS), sizes=BLOCK_SIZES, depths=QUEUE_DEPTHS):
    return [Cell(*c) for c in itertools.product(workloads, sizes, depths)]


def default_matrix(workloads=tuple(WORKLOADS)):
    return [c for c in matrix(workloads) if c.qd != DEEP_QD or c.bs in DEEP_SIZES]


def human_size(n):
    return next(f"{n >> shift} {unit}" for shift, unit in ((20, "MiB"), (10, "KiB"), (0, "B"))
                if n >= 1 << shift and n % (1 << shift) == 0)


def run_cell(uri, cell, size, runtime, ramp, workdir, server_cpu=None):
    """Run fio on ``cell``; return its figures per direction (only directions that moved data),
    and, given ``server_cpu`` (a function returning the server's user and system CPU seconds),
    the server's CPU per request over fio's measured window.

    direct stays 0: the nbd engine has no page cache of its own, so every I/O reaches
    the server, and each server goes through the host page cache the same way.
    """
    out = workdir / "fio.json"
    cmd = ["fio", "--name=cell", "--ioengine=nbd", f"--uri={uri}", *WORKLOADS[cell.workload],
           f"--bs={cell.bs}", f"--iodepth={cell.qd}", f"--size={size}", "--time_based",
           f"--runtime={round(runtime * 1000)}ms", f"--ramp_time={round(ramp * 1000)}ms",
           "--lat_percentiles=1", "--output-format=json", f"--output={out}"]
    with subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        samples, stderr = _sample_until_exit(proc, server_cpu or (lambda: (0, 0)))
    if proc.returncode != 0:
        raise RuntimeError(f"fio exited {proc.returncode}: {stderr.strip()}")
    report = json.loads(out.read_text())
    job = report["jobs"][0]
    if job["error"]:
        raise RuntimeError(f"fio job error {job['error']}")
    directions = {d: _figures(job[d]) for d in ("read", "write") if job[d]["io_bytes"]}
    if not directions:
        raise RuntimeError("fio moved no data")
    figures = summarise(directions)
    if server_cpu:
        # fio stamps its report as the measured window ends (after the ramp, before it
        # disconnects): the window's edges exclude fio's start, the ramp and the connection.
        end = report["timestamp_ms"] / 1e3
        requests = sum(job[d]["total_ios"] for d in directions)
        figures |= _cpu_per_request(samples, end - job["job_runtime"] / 1e3, end, requests)
    return figures


def _sample_until_exit(proc, server_cpu):
    """(wall time, user, system) of the server every CPU_SAMPLE_SECONDS while fio runs; fio's stderr."""
    samples = []
    while True:
        samples.append((time.time(), *server_cpu()))
        try:
            _, stderr = proc.communicate(timeout=CPU_SAMPLE_SECONDS)
            break
        except subprocess.TimeoutExpired:
            continue
    samples.append((time.time(), *server_cpu()))
    return samples, stderr


def _cpu_per_request(samples, start, end, requests):
    """The server's CPU microseconds per request between ``start`` and ``end``, the edges
    interpolated between samples; ``server_sys_us`` is the part spent in the kernel."""
    wall, user, system = numpy.array(samples).T
    used = lambda series: numpy.interp(end, wall, series) - numpy.interp(start, wall, series)
    return {"requests": requests, "server_cpu_us": (used(user) + used(system)) / requests * 1e6,
            "server_sys_us": used(system) / requests * 1e6}


def summarise(directions):
    """Both directions together: MB/s and IOPS add up, mean latency weighted by IOPS, worst p99."""
    iops = sum(d["iops"] for d in directions.values())
    return {**directions, "mbps": sum(d["mbps"] for d in directions.values()), "iops": iops,
            "lat_mean_us": sum(d["lat_mean_us"] * d["iops"] for d in directions.values()) / iops,
            "lat_p99_us": max(d["lat_p99_us"] for d in directions.values())}


def _figures(stats):
    lat = stats["lat_ns"]
    return {"mbps": stats["bw_bytes"] / 1e6, "iops": stats["iops"], "lat_mean_us": lat["mean"] / 1e3,
            "lat_p99_us": lat.get("percentile", {}).get("99.000000", 0) / 1e3}
