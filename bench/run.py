"""Measure nbdcrypt against its peers in one run, with fio's nbd ioengine.

Targets (all serving the same LUKS1 aes-xts-plain64 image made by qemu-img, except the
plaintext ceiling on a raw image and the qcow2 pair on a qcow2+LUKS image):
  nbdcrypt          nbdcrypt serve, default queueing (one target per queueing mode:
  nbdcrypt-inline   ... --perf-no_read_workqueue --perf-no_write_workqueue)
  nbdcrypt-qcow2    nbdcrypt serve on the qcow2+LUKS image
  plaintext         nbdkit file plugin on a raw image: the ceiling
  nbdkit-luks       nbdkit --filter=luks file
  qemu-nbd-luks     qemu-nbd --image-opts driver=luks
  qemu-nbd-qcow2    qemu-nbd --image-opts driver=qcow2,encrypt...
  python-floor      nbdkit python plugin doing plain pread/pwrite: the plugin's floor

Cells: workload (seqread seqwrite randread randwrite mixed=randrw 50/50) x block size
(4 KiB 64 KiB 128 KiB 1 MiB) x queue depth (1 8), and QD 32 for 4 KiB and 1 MiB only: 50 cells,
about 25 minutes on 2 cores (--bs or --qd run every combination of the sizes and depths given).
Every target runs each cell before the next cell starts, so slow drifts of a shared machine hit
all targets alike.  Each cell records fio's MB/s, IOPS and latencies and the server's CPU time
per request (user + system of the server's processes and threads, from /proc, over fio's
measured window).  Writes: OUT/results.json, OUT/results.md (also printed) and OUT/*.png.
Progress goes to stderr.  Two runs side by side: python -m bench.report --compare.
"""

import argparse
import json
import shlex
import signal
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path

from bench import fio, report
from bench.targets import TARGETS, connect_ms, cpu_seconds, make_images, serving

SUFFIXES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def size(text):
    text = text.upper().removesuffix("IB").removesuffix("B")
    return int(text[:-1]) * SUFFIXES[text[-1]] if text[-1] in SUFFIXES else int(text)


def csv(kind):
    return lambda text: [kind(x) for x in text.split(",")]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="CI subset: randread and mixed x 4 KiB and 1 MiB x QD8, 1 s per cell (under a minute)")
    p.add_argument("--out", type=Path, default=Path("docs/bench/latest"),
                   help="results directory (default: %(default)s)")
    p.add_argument("--runtime", type=float, help="measured seconds per cell (default: 3, --quick 1)")
    p.add_argument("--ramp", type=float, help="unmeasured warm-up seconds per cell (default: 0.5, --quick 0.3)")
    p.add_argument("--size", type=size, default="1G", help="image payload size (default: %(default)s, sparse)")
    p.add_argument("--fill", type=size, help="working set at the image start: pre-filled, and the only range fio "
                   "touches (default: 256M, --quick 32M)")
    p.add_argument("--iter-time", type=int, default=100,
                   help="PBKDF2 milliseconds of the images' keyslots (default: %(default)s; "
                        "the luks filter pays it per connection)")
    p.add_argument("--targets", type=csv(str), default=[t.name for t in TARGETS if t.default],
                   help="comma-separated targets (default: all but the opt-in "
                        + ", ".join(t.name for t in TARGETS if not t.default) + ") of: "
                        + ",".join(t.name for t in TARGETS))
    p.add_argument("--workloads", type=csv(str), help="comma-separated subset of: " + ",".join(fio.WORKLOADS))
    p.add_argument("--bs", type=csv(size), help="comma-separated block sizes (default: 4K,64K,128K,1M)")
    p.add_argument("--qd", type=csv(int), help="comma-separated queue depths (default: 1,8, and 32 for 4K and 1M)")
    p.add_argument("--nbdcrypt", type=Path, default=Path(sys.executable).with_name("nbdcrypt"),
                   help="the nbdcrypt executable the nbdcrypt targets serve with, e.g. another checkout's "
                        ".venv/bin/nbdcrypt to measure older code (default: %(default)s)")
    p.add_argument("--replot", action="store_true", help="only rewrite results.md and the charts from OUT/results.json")
    p.add_argument("--workdir", type=Path,
                   help="keep images, sockets and server logs here (default: a temporary directory)")
    args = p.parse_args(argv)
    quick_workloads, quick_sizes, quick_depths = fio.QUICK if args.quick else (None, None, None)
    args.workloads = args.workloads or quick_workloads or list(fio.WORKLOADS)
    if args.bs or args.qd or args.quick:
        args.cells = fio.matrix(args.workloads, args.bs or quick_sizes or fio.BLOCK_SIZES,
                                args.qd or quick_depths or fio.QUEUE_DEPTHS)
    else:
        args.cells = fio.default_matrix(args.workloads)
    args.runtime = args.runtime or (1 if args.quick else 3)
    args.ramp = args.ramp if args.ramp is not None else 0.3 if args.quick else 0.5
    args.fill = args.fill or (32 << 20 if args.quick else 256 << 20)
    unknown = set(args.targets) - {t.name for t in TARGETS} | set(args.workloads) - set(fio.WORKLOADS)
    if unknown:
        p.error(f"unknown target or workload: {', '.join(sorted(unknown))}")
    return args


def progress(text):
    print(text, file=sys.stderr, flush=True)


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM tears down like Ctrl-C: every `with` stops its server


@contextmanager
def workspace(path):
    if path:
        path.mkdir(parents=True, exist_ok=True)
        yield path.resolve()
    else:
        with tempfile.TemporaryDirectory(prefix="nbdcrypt-bench-") as tmp:
            yield Path(tmp)


def main(argv=None):
    args = parse_args(argv)
    if args.replot:
        write(json.loads((args.out / "results.json").read_text()), args.out)
        return 0
    signal.signal(signal.SIGTERM, _interrupt)
    data = {"command": shlex.join(["python", "-m", "bench.run", *(sys.argv[1:] if argv is None else argv)]),
            "machine": report.machine(), "targets": [], "cells": [],
            "settings": {k: getattr(args, k) for k in ("quick", "runtime", "ramp", "size", "fill", "iter_time")}
            | {"nbdcrypt": str(args.nbdcrypt.absolute())}}
    with workspace(args.workdir) as workdir:
        progress(f"making images in {workdir} ...")
        paths = make_images(workdir, args.size, args.fill, args.iter_time) | {"nbdcrypt": str(args.nbdcrypt.absolute())}
        try:
            with ExitStack() as servers:
                uris = start(servers, [t for t in TARGETS if t.name in args.targets], paths, workdir, data)
                measure(uris, args.cells, args, workdir, data)
        except KeyboardInterrupt:
            data["interrupted"] = True
            progress("interrupted: servers stopped; writing what was measured")
    write(data, args.out)
    return 130 if data.get("interrupted") else 0


def start(servers, targets, paths, workdir, data):
    """Start every available target, record why the others are skipped; {name: (URI, server PID)}."""
    uris = {}
    for target in targets:
        entry = {"name": target.name, "label": target.label, "subject": target.subject,
                 "command": shlex.join(target.command({**paths, "sock": "SOCKET"})),
                 "skipped": target.skip_reason(paths), "connect_ms": None}
        data["targets"].append(entry)
        if entry["skipped"]:
            progress(f"skipping {target.name}: {entry['skipped']}")
            continue
        try:
            uri, server = servers.enter_context(serving(target, paths, workdir))
            uris[target.name] = uri, server.pid
            entry["connect_ms"] = connect_ms(uri)
        except RuntimeError as e:
            entry["skipped"] = f"failed: {e}"
            uris.pop(target.name, None)
            progress(f"skipping {target.name}: {entry['skipped']}")
            continue
        progress(f"started {target.name}: connect + first read {entry['connect_ms']:.1f} ms")
    return uris


def measure(uris, cells, args, workdir, data):
    """Every cell on every target, target-interleaved, one progress line each."""
    total, began = len(cells) * len(uris), time.monotonic()
    for cell in cells:
        for name, (uri, pid) in uris.items():
            record = {"target": name, "workload": cell.workload, "bs": cell.bs, "qd": cell.qd}
            try:
                record |= fio.run_cell(uri, cell, args.fill, args.runtime, args.ramp, workdir,
                                       server_cpu=partial(cpu_seconds, pid))
                result = (f"{record['mbps']:8.1f} MB/s  p99 {record['lat_p99_us'] / 1e3:7.2f} ms"
                          f"  CPU {record['server_cpu_us']:6.0f} us/request")
            except RuntimeError as e:
                record["error"] = result = str(e)
            data["cells"].append(record)
            done = len(data["cells"])
            eta = (time.monotonic() - began) / done * (total - done)
            progress(f"[{done:3}/{total}] {name:16} {str(cell):22} {result}   ETA {eta // 60:.0f}m{eta % 60:02.0f}s")


def write(data, out):
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    report.write_markdown(data, out / "results.md")
    if data["cells"]:
        report.write_charts(data, out)
    print((out / "results.md").read_text())
    progress(f"wrote {out}/results.json, results.md and charts")


if __name__ == "__main__":
    sys.exit(main())
