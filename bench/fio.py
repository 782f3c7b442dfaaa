"""One benchmark cell = one fio run (nbd ioengine) against one served URI."""

import itertools
import json
import subprocess
from dataclasses import dataclass

WORKLOADS = {
    "seqread": ["--rw=read"],
    "seqwrite": ["--rw=write"],
    "randread": ["--rw=randread"],
    "randwrite": ["--rw=randwrite"],
    "mixed": ["--rw=randrw", "--rwmixread=50"],
}
BLOCK_SIZES = (4096, 65536, 1 << 20)
QUEUE_DEPTHS = (1, 8, 32)
QUICK = (("randread", "mixed"), (4096, 1 << 20), (8,))


@dataclass(frozen=True)
class Cell:
    workload: str
    bs: int
    qd: int

    def __str__(self):
        return f"{self.workload} {human_size(self.bs)} QD{self.qd}"


def matrix(workloads=tuple(WORKLOADS), sizes=BLOCK_SIZES, depths=QUEUE_DEPTHS):
    return [Cell(*c) for c in itertools.product(workloads, sizes, depths)]


def human_size(n):
    return next(f"{n >> shift} {unit}" for shift, unit in ((20, "MiB"), (10, "KiB"), (0, "B"))
                if n >= 1 << shift and n % (1 << shift) == 0)


def run_cell(uri, cell, size, runtime, ramp, workdir):
    """Run fio on ``cell``; return its figures per direction (only directions that moved data).

    direct stays 0: the nbd engine has no page cache of its own, so every I/O reaches
    the server, and each server goes through the host page cache the same way.
    """
    out = workdir / "fio.json"
    cmd = ["fio", "--name=cell", "--ioengine=nbd", f"--uri={uri}", *WORKLOADS[cell.workload],
           f"--bs={cell.bs}", f"--iodepth={cell.qd}", f"--size={size}", "--time_based",
           f"--runtime={round(runtime * 1000)}ms", f"--ramp_time={round(ramp * 1000)}ms",
           "--lat_percentiles=1", "--output-format=json", f"--output={out}"]
    result = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"fio exited {result.returncode}: {result.stderr.strip()}")
    job = json.loads(out.read_text())["jobs"][0]
    if job["error"]:
        raise RuntimeError(f"fio job error {job['error']}")
    directions = {d: _figures(job[d]) for d in ("read", "write") if job[d]["io_bytes"]}
    if not directions:
        raise RuntimeError("fio moved no data")
    return summarise(directions)


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
