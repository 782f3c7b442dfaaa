"""Where a served target spends its time under one fio cell: py-spy samples nbdkit (the
plugin's embedded Python) while fio runs, then the top frames are printed, by own time and
including callees, as a share of all samples; and the server's CPU time per request (user
and system of all its processes and threads, from /proc), which a busy shared machine
disturbs less than MB/s.

Usage, from the repository root:
  .venv/bin/python -m bench.profile [--target nbdcrypt] [--workload mixed] [--bs 1M] [--qd 8] [--gil]
Needs py-spy (`.venv/bin/pip install py-spy`; not a project dependency).
"""

import argparse
import collections
import re
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

from bench import fio
from bench.run import size, workspace
from bench.targets import TARGETS, cpu_seconds, make_images, serving

FILL = 256 << 20


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="nbdcrypt", choices=[t.name for t in TARGETS if t.subject])
    p.add_argument("--workload", default="mixed", choices=list(fio.WORKLOADS))
    p.add_argument("--bs", type=size, default="1M")
    p.add_argument("--qd", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--gil", action="store_true", help="sample only the thread holding the GIL")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    if shutil.which("py-spy") is None and not Path(sys.executable).with_name("py-spy").exists():
        p.error("needs py-spy: .venv/bin/pip install py-spy")
    target = next(t for t in TARGETS if t.name == args.target)
    cell = fio.Cell(args.workload, args.bs, args.qd)
    with workspace(None) as workdir:
        paths = make_images(workdir, 1 << 30, FILL, 100)
        raw = workdir / "profile.txt"
        with serving(target, paths, workdir) as (uri, server):
            pid = _nbdkit_pid(server.pid)
            spy = subprocess.Popen([shutil.which("py-spy") or Path(sys.executable).with_name("py-spy"), "record",
                                    "--pid", str(pid), "--format", "raw", "--output", str(raw),
                                    "--duration", str(round(args.seconds)), "--nonblocking",
                                    *(["--gil"] if args.gil else [])], stdout=subprocess.DEVNULL)
            result = fio.run_cell(uri, cell, FILL, args.seconds, 0, workdir,
                                  server_cpu=partial(cpu_seconds, server.pid))
            spy.wait()
        system = result["server_sys_us"]
        print(f"{target.name}, {cell}: {result['mbps']:.0f} MB/s; server CPU per request: "
              f"{result['server_cpu_us'] - system:.0f} us user + {system:.0f} us system"
              + (" (samples: GIL holder only)" if args.gil else ""))
        print_top(raw.read_text(), args.top)


def _nbdkit_pid(pid):
    """nbdcrypt serve runs nbdkit as its child: py-spy must sample the child."""
    if Path(f"/proc/{pid}/comm").read_text().strip() == "nbdkit":
        return pid
    return int(Path(f"/proc/{pid}/task/{pid}/children").read_text().split()[0])


def print_top(collapsed, top):
    """Own and inclusive sample shares from py-spy's collapsed stacks ("f1;f2;f3 count")."""
    own, inclusive, total = collections.Counter(), collections.Counter(), 0
    for line in collapsed.splitlines():
        stack, count = line.rsplit(" ", 1)
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]  # merge a function's lines
        own[frames[-1]] += int(count)
        inclusive.update(dict.fromkeys(frames, int(count)))
        total += int(count)
    for title, counter in (("own time", own), ("including callees", inclusive)):
        print(f"\ntop {top} frames by {title} ({total} samples):")
        for frame, count in counter.most_common(top):
            print(f"  {100 * count / total:5.1f}%  {frame}")


if __name__ == "__main__":
    main()
