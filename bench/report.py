"""Turn one run's results (the dict written as results.json) into results.md and PNG charts;
or put two runs side by side (old code against new code):

  .venv/bin/python -m bench.report --compare OLD/results.json NEW/results.json --out DIR

writes DIR/compare.md (also printed) and DIR/compare.png.
"""

import argparse
import json
import math
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from statistics import geometric_mean

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

from bench.fio import Cell, human_size, matrix  # noqa: E402
from bench.targets import TARGETS  # noqa: E402

COLOURS = {t.name: t.colour for t in TARGETS}
CPU = "server_cpu_us"  # the results' key of the server's CPU microseconds per request


@dataclass(frozen=True)
class Goal:
    """A ratio nbdcrypt / ``peer`` over ``cells`` that every cell must reach: at least
    ``bound`` for MB/s, at most ``bound`` for CPU per request.  The peer "qemu-nbd" is the
    qemu-nbd target serving the subject's format."""

    cells: tuple
    peer: str
    bound: float
    key: str = "mbps"

    def peer_of(self, subject):
        if self.peer != "qemu-nbd":
            return self.peer
        return "qemu-nbd-qcow2" if subject.endswith("qcow2") else "qemu-nbd-luks"

    def met(self, ratio):
        return ratio <= self.bound if self.key == CPU else ratio >= self.bound

    def worst(self, ratios):
        """The cell of the worst ratio in {cell: ratio}."""
        return (max if self.key == CPU else min)(ratios, key=ratios.get)


# Issue 16's targets, on the workloads it names; connect time separately.
_MAIN = ("mixed", "randread")
_MID = tuple(matrix(_MAIN, (65536, 131072), (1, 8)))
GOALS = (Goal(tuple(matrix(_MAIN, (4096,), (1,))), "python-floor", 1.3, CPU),
         Goal(tuple(matrix(_MAIN, (4096,), (1,))), "nbdkit-luks", 0.8),
         Goal(tuple(matrix(_MAIN, (4096,), (1, 8))), "qemu-nbd", 1.0),
         Goal(_MID, "nbdkit-luks", 1.0), Goal(_MID, "qemu-nbd", 1.5),
         Goal((Cell("mixed", 1 << 20, 8),), "plaintext", 0.5))
CONNECT_GOAL_MS = 10
AES_FLAGS = ("aes", "vaes", "pclmulqdq", "vpclmulqdq", "avx", "avx2", "avx512f", "sha_ni")
TOOLS = (["nbdkit", "--version"], ["qemu-nbd", "--version"], ["fio", "--version"], ["nbdinfo", "--version"])


def machine():
    """What the figures depend on: CPU, its AES-related flags, kernel, tool versions, date."""
    cpuinfo = open("/proc/cpuinfo").read()
    field = lambda name: next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                               if line.startswith(name)), "")
    flags = set(field("flags").split())
    return {"cpu": field("model name"), "cores": os.cpu_count(), "aes_flags": [f for f in AES_FLAGS if f in flags],
            "kernel": platform.release(), "python": platform.python_version(),
            "tools": {cmd[0]: _first_line(cmd) for cmd in TOOLS},
            "commit": _first_line(["git", "describe", "--always", "--dirty"]),
            "date": datetime.now(UTC).isoformat(timespec="seconds")}


def _first_line(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[0]
    except (OSError, IndexError):
        return "unavailable"


class Results:
    """Lookups over the results dict."""

    def __init__(self, data):
        self.data = data
        self.measured = [t for t in data["targets"] if not t["skipped"]]
        self.subjects = [t["name"] for t in self.measured if t["subject"]]
        self.cells = list(dict.fromkeys(Cell(c["workload"], c["bs"], c["qd"]) for c in data["cells"]))
        self._by = {(c["target"], Cell(c["workload"], c["bs"], c["qd"])): c for c in data["cells"]}

    def get(self, target, cell, key="mbps"):
        return self._by.get((target, cell), {}).get(key)

    def ratio(self, target, peer, cell, key="mbps"):
        a, b = self.get(target, cell, key), self.get(peer, cell, key)
        return a / b if a and b else None


def write_markdown(data, path):
    r = Results(data)
    path.write_text("\n".join([*_preamble(data), *_goals(r), *_connect(r), *_throughput(r), *_cpu(r),
                               *_latency(r)]) + "\n")


def _preamble(data):
    m, s = data["machine"], data["settings"]
    lines = [f"# nbdcrypt benchmark, {m['date']}", "",
             f"`{data['command']}` at commit {m['commit']}, serving with {s.get('nbdcrypt', 'its own nbdcrypt')}.", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, flags {' '.join(m['aes_flags'])}, kernel {m['kernel']}; "
             + ", ".join(m["tools"].values()) + ".", "",
             f"Each cell is one fio run (nbd ioengine, one job, Unix socket): {s['ramp']} s ramp then {s['runtime']} s "
             f"measured, over the first {human_size(s['fill'])} of a {human_size(s['size'])} image "
             f"(LUKS1 aes-xts-plain64, 512-bit key, made by qemu-img). One run on a shared machine: "
             f"neighbouring cells vary by 10-20 %."]
    lines += [f"\nSkipped: **{t['name']}**: {t['skipped']}." for t in data["targets"] if t["skipped"]]
    if data.get("interrupted"):
        lines.append("\n**Interrupted**: the tables hold the cells measured before the stop.")
    return lines


def _goals(r):
    lines = ["", "## The issue's targets", "", ("Each goal holds for every cell it names; the worst cell is shown "
              "(MB/s: the lowest ratio; CPU per request: the highest)."), "",
             "| target | cells | worst cell | nbdcrypt | peer | ratio | goal | |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for subject in r.subjects:
        for goal in GOALS:
            lines.append(_goal_row(r, subject, goal))
        ms = _target(r, subject)["connect_ms"]
        status = "not measured" if ms is None else "met" if ms < CONNECT_GOAL_MS else "**missed**"
        lines.append(f"| {subject} connect time | new client + first 4 KiB read | | {_num(ms, ' ms')} | | | "
                     f"< {CONNECT_GOAL_MS} ms | {status} |")
    return lines


def _goal_row(r, subject, goal):
    peer = goal.peer_of(subject)
    ratios = {cell: ratio for cell in goal.cells if (ratio := r.ratio(subject, peer, cell, goal.key)) is not None}
    what = f"{'CPU per request' if goal.key == CPU else 'MB/s'}: {_describe(goal.cells)}"
    if not ratios:
        return f"| {subject} vs {peer} | {what} | | | | | | not measured |"
    if len(ratios) < len(goal.cells):
        what += f" ({len(ratios)} of {len(goal.cells)} cells measured)"
    cell = goal.worst(ratios)
    unit = " us" if goal.key == CPU else ""
    return (f"| {subject} vs {peer} | {what} | {cell} | {_num(r.get(subject, cell, goal.key), unit)} "
            f"| {_num(r.get(peer, cell, goal.key), unit)} | {_num(ratios[cell], 'x')} "
            f"| {'<=' if goal.key == CPU else '>='} {goal.bound}x "
            f"| {'met' if goal.met(ratios[cell]) else '**missed**'} |")


def _describe(cells):
    """"mixed, randread x 4 KiB x QD1, QD8" for a product of cells."""
    parts = [dict.fromkeys(getattr(c, field) for c in cells) for field in ("workload", "bs", "qd")]
    return " x ".join([", ".join(parts[0]), ", ".join(map(human_size, parts[1])),
                       ", ".join(f"QD{qd}" for qd in parts[2])])


def _connect(r):
    lines = ["", "## Connect time", "", "Median of 5: a new libnbd client connects and reads one 4 KiB block "
             f"(the images' PBKDF2 iteration time is {r.data['settings']['iter_time']} ms).", "",
             "| target | ms |", "|---|---:|"]
    return lines + [f"| {t['name']} | {_num(t['connect_ms'])} |" for t in r.measured]


def _throughput(r):
    names = [t["name"] for t in r.measured]
    pairs = [(s, p) for s in r.subjects for p in names if p not in r.subjects]
    lines = ["", "## Throughput, MB/s (read + write)", "",
             "| cell | " + " | ".join(names) + " | " + " | ".join(f"{s} / {p}" for s, p in pairs) + " |",
             "|---|" + "---:|" * (len(names) + len(pairs))]
    for cell in r.cells:
        lines.append(f"| {cell} | " + " | ".join(_num(r.get(n, cell)) for n in names) + " | "
                     + " | ".join(_num(r.ratio(s, p, cell), "x") for s, p in pairs) + " |")
    return lines


def _cpu(r):
    names = [t["name"] for t in r.measured]
    floor = [s for s in r.subjects if "python-floor" in names]
    lines = ["", "## Server CPU per request, microseconds (user + system)", "",
             ("The server's processes and threads, from /proc, over fio's measured window; beside each nbdcrypt "
              "target its ratio to the Python plugin's floor."), "",
             "| cell | " + " | ".join(names) + " | " + " | ".join(f"{s} / python-floor" for s in floor) + " |",
             "|---|" + "---:|" * (len(names) + len(floor))]
    for cell in r.cells:
        lines.append(f"| {cell} | " + " | ".join(_num(r.get(n, cell, CPU)) for n in names) + " | "
                     + " | ".join(_num(r.ratio(s, "python-floor", cell, CPU), "x") for s in floor) + " |")
    return lines


def _latency(r):
    names = [t["name"] for t in r.measured]
    lines = ["", "## Latency, mean / p99 in microseconds", "", "| cell | " + " | ".join(names) + " |",
             "|---|" + "---:|" * len(names)]
    for cell in r.cells:
        lines.append(f"| {cell} | " + " | ".join(
            f"{_num(r.get(n, cell, 'lat_mean_us'))} / {_num(r.get(n, cell, 'lat_p99_us'))}" for n in names) + " |")
    return lines


def _target(r, name):
    return next(t for t in r.data["targets"] if t["name"] == name)


def _num(x, unit=""):
    if x is None:
        return "-"
    return f"{x:.2f}{unit}" if unit == "x" else f"{x:.3g}{unit}" if x < 100 else f"{x:.0f}{unit}"


def write_charts(data, outdir):
    """Bars of MB/s by target for each workload x block size, one chart per queue depth;
    mean latency at the lowest depth; server CPU per request against block size at the
    lowest depth; MB/s against depth for the mixed workload."""
    r = Results(data)
    depths = sorted({c.qd for c in r.cells})
    sizes = sorted({c.bs for c in r.cells})
    written = [_bars(r, "mbps", qd, "MB/s (read + write)", outdir / f"throughput_qd{qd}.png") for qd in depths]
    written.append(_bars(r, "lat_mean_us", depths[0], "mean latency (ms, log scale)",
                         outdir / f"latency_qd{depths[0]}.png", scale=1e-3))
    workloads = list(dict.fromkeys(c.workload for c in r.cells))
    written.append(_lines(r, CPU, workloads, sizes, lambda w, bs: Cell(w, bs, depths[0]),
                          lambda w: f"{w}, QD{depths[0]}", "request size", "server CPU per request (us, log scale)",
                          outdir / f"cpu_qd{depths[0]}.png", log=True))
    if len(depths) > 1:
        written.append(_lines(r, "mbps", sizes, depths, lambda bs, qd: Cell("mixed", bs, qd),
                              lambda bs: f"mixed 50/50, {human_size(bs)} requests", "queue depth",
                              "MB/s (read + write)", outdir / "mixed_by_depth.png"))
    return written


def _bars(r, key, qd, ylabel, path, scale=None):
    """Grouped bars; a ``scale`` factor also switches to a log axis (latencies span decades)."""
    sizes = sorted({c.bs for c in r.cells if c.qd == qd})
    workloads = list(dict.fromkeys(c.workload for c in r.cells))
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4.2), squeeze=False)
    width = 0.8 / len(r.measured)
    for ax, bs in zip(axes[0], sizes, strict=True):
        for i, t in enumerate(r.measured):
            values = [(r.get(t["name"], Cell(w, bs, qd), key) or 0) * (scale or 1) for w in workloads]
            ax.bar([x + (i - (len(r.measured) - 1) / 2) * width for x in range(len(workloads))], values, width,
                   label=t["label"], color=COLOURS.get(t["name"]))
        ax.set_xticks(range(len(workloads)), workloads, rotation=20)
        ax.set_title(f"{human_size(bs)} requests, QD{qd}")
        if scale:
            _log_axis(ax)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    return _save(fig, axes, path)


def _log_axis(ax):
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(ticker.FuncFormatter(_label_2_and_5))


def _label_2_and_5(v, _):
    """Label the minor ticks 2 and 5 of each decade: enough to read a log axis, few enough to fit."""
    return f"{v:g}" if round(v / 10 ** math.floor(math.log10(v))) in (2, 5) else ""


def _lines(r, key, panels, xs, cell, title, xlabel, ylabel, path, log=False):
    """One panel per item of ``panels``, in each a line per target over ``xs`` (powers of two);
    ``cell(panel, x)`` names the cell of a point; unmeasured points are left out."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for t in r.measured:
            points = [(x, y) for x in xs if (y := r.get(t["name"], cell(panel, x), key))]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=t["label"], color=COLOURS.get(t["name"]))
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [human_size(x).replace(" ", "") if x >= 1024 else str(x) for x in xs])
        ax.set_title(title(panel))
        ax.set_xlabel(xlabel)
        if log:
            _log_axis(ax)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    return _save(fig, axes, path)


def _save(fig, axes, path):
    handles, labels = axes[0][0].get_legend_handles_labels()
    columns = max(1, min(len(labels), int(fig.get_figwidth() / 2.8)))  # a label takes about 2.8 inches
    rows = math.ceil(len(labels) / columns)
    fig.legend(handles, labels, loc="lower center", ncol=columns, frameon=False)
    fig.tight_layout(rect=(0, 0.3 * rows / fig.get_figheight() + 0.01, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_comparison(old, new, paths, outdir):
    """compare.md and compare.png: every cell and target both runs measured, old -> new."""
    outdir.mkdir(parents=True, exist_ok=True)
    old_names = {t["name"] for t in old.measured}
    targets = [t for t in new.measured if t["name"] in old_names]
    cells = [c for c in new.cells if c in set(old.cells)]
    (outdir / "compare.md").write_text("\n".join(_comparison_tables(old, new, paths, targets, cells)) + "\n")
    _comparison_chart(old, new, targets, cells, outdir / "compare.png")


def _comparison_tables(old, new, paths, targets, cells):
    lines = ["# nbdcrypt benchmark: two runs side by side", ""]
    lines += [(f"- {which}: `{path}`: `{r.data['command']}` at commit {r.data['machine']['commit']}, "
               f"{r.data['machine']['date']}, serving with {r.data['settings'].get('nbdcrypt', 'its own nbdcrypt')}")
              for which, path, r in zip(("old", "new"), paths, (old, new), strict=True)]
    lines += ["", ("Each entry is old -> new (new / old); bold where an nbdcrypt target got worse. The runs were "
                   "not interleaved: the peers' ratios (their code is the same in both) show how far the machine "
                   "itself drifted between the runs.")]
    for key, title in (("mbps", "MB/s (read + write)"), (CPU, "Server CPU per request, microseconds")):
        lines += ["", f"## {title}", "", "| cell | " + " | ".join(t["name"] for t in targets) + " |",
                  "|---|" + "---:|" * len(targets)]
        lines += [f"| {cell} | " + " | ".join(_change(old, new, t, cell, key) for t in targets) + " |"
                  for cell in cells]
    return lines


def _change(old, new, target, cell, key):
    a, b = old.get(target["name"], cell, key), new.get(target["name"], cell, key)
    if not (a and b):
        return "-"
    ratio = _num(b / a, "x")
    worse = b > a if key == CPU else b < a
    return f"{_num(a)} -> {_num(b)} ({f'**{ratio}**' if worse and target['subject'] else ratio})"


def _comparison_chart(old, new, targets, cells, path):
    """new / old by request size and target, one panel per metric x queue depth; each bar is
    the geometric mean over the workloads both runs measured."""
    depths = sorted({c.qd for c in cells})
    fig, axes = plt.subplots(2, len(depths), figsize=(5 * len(depths), 8), squeeze=False)
    width = 0.8 / len(targets)
    for row, (key, metric) in zip(axes, (("mbps", "MB/s"), (CPU, "CPU per request")), strict=True):
        for ax, qd in zip(row, depths, strict=True):
            sizes = sorted({c.bs for c in cells if c.qd == qd})
            for i, t in enumerate(targets):
                ratios = [[new.get(t["name"], c, key) / old.get(t["name"], c, key) for c in cells
                           if (c.bs, c.qd) == (bs, qd) and old.get(t["name"], c, key) and new.get(t["name"], c, key)]
                          for bs in sizes]
                ax.bar([x + (i - (len(targets) - 1) / 2) * width for x in range(len(sizes))],
                       [geometric_mean(r) if r else 0 for r in ratios], width, label=t["label"],
                       color=COLOURS.get(t["name"]))
            ax.axhline(1, color="black", linewidth=0.8)
            ax.set_xticks(range(len(sizes)), [human_size(bs) for bs in sizes])
            ax.set_title(f"{metric}, new / old, QD{qd}")
            ax.grid(axis="y", alpha=0.3)
    return _save(fig, axes, path)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"), required=True,
                   help="two results.json written by bench.run: the old code's run, then the new code's")
    p.add_argument("--out", type=Path, required=True, help="directory for compare.md and compare.png")
    args = p.parse_args(argv)
    try:
        old, new = (Results(json.loads(path.read_text())) for path in args.compare)
    except (OSError, ValueError, KeyError, TypeError) as e:
        p.error(f"cannot read the results: {e}")
    write_comparison(old, new, args.compare, args.out)
    print((args.out / "compare.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
