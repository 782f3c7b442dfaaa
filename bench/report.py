"""Turn one run's results (the dict written as results.json) into results.md and PNG charts."""

import math
import os
import platform
import subprocess
from datetime import datetime, timezone

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

from bench.fio import WORKLOADS, Cell, human_size  # noqa: E402
from bench.targets import TARGETS  # noqa: E402

COLOURS = {t.name: t.colour for t in TARGETS}
# The targets: (cell, peer, minimum ratio nbdcrypt / peer); connect time separately.
GOALS = [(Cell("mixed", 1 << 20, 8), "plaintext", 0.8), (Cell("mixed", 1 << 20, 8), "nbdkit-luks", 5.0)]
GOALS += [(Cell(w, 4096, 1), "nbdkit-luks", 1.0) for w in WORKLOADS]
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
            "tools": {cmd[0]: _first_line(cmd) for cmd in TOOLS}, "commit": _first_line(["git", "describe", "--always", "--dirty"]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


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

    def ratio(self, target, peer, cell):
        a, b = self.get(target, cell), self.get(peer, cell)
        return a / b if a and b else None


def write_markdown(data, path):
    r = Results(data)
    path.write_text("\n".join([*_preamble(data), *_goals(r), *_connect(r), *_throughput(r), *_latency(r)]) + "\n")


def _preamble(data):
    m, s = data["machine"], data["settings"]
    lines = [f"# nbdcrypt benchmark, {m['date']}", "",
             f"`{data['command']}` at commit {m['commit']}.", "",
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
    lines = ["", "## The issue's targets", "", "| target | cell | nbdcrypt MB/s | peer MB/s | ratio | goal | |",
             "|---|---|---:|---:|---:|---:|---|"]
    for subject in r.subjects:
        for cell, peer, goal in GOALS:
            ratio = r.ratio(subject, peer, cell)
            status = "not measured" if ratio is None else "met" if ratio >= goal else "**missed**"
            lines.append(f"| {subject} vs {peer} | {cell} | {_num(r.get(subject, cell))} | {_num(r.get(peer, cell))} "
                         f"| {_num(ratio, 'x')} | >= {goal}x | {status} |")
        ms = _target(r, subject)["connect_ms"]
        status = "not measured" if ms is None else "met" if ms < CONNECT_GOAL_MS else "**missed**"
        lines.append(f"| {subject} connect time | new client + first 4 KiB read | {_num(ms, ' ms')} | | | "
                     f"< {CONNECT_GOAL_MS} ms | {status} |")
    return lines


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
    mean latency at the lowest depth; MB/s against depth for the mixed workload."""
    r = Results(data)
    depths = sorted({c.qd for c in r.cells})
    written = [_bars(r, "mbps", qd, "MB/s (read + write)", outdir / f"throughput_qd{qd}.png") for qd in depths]
    written.append(_bars(r, "lat_mean_us", depths[0], "mean latency (ms, log scale)",
                         outdir / f"latency_qd{depths[0]}.png", scale=1e-3))
    if len(depths) > 1:
        written.append(_depth_lines(r, outdir / "mixed_by_depth.png"))
    return written


def _bars(r, key, qd, ylabel, path, scale=None):
    """Grouped bars; a ``scale`` factor also switches to a log axis (latencies span decades)."""
    sizes = sorted({c.bs for c in r.cells})
    workloads = list(dict.fromkeys(c.workload for c in r.cells))
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4.2), squeeze=False)
    width = 0.8 / len(r.measured)
    for ax, bs in zip(axes[0], sizes):
        for i, t in enumerate(r.measured):
            values = [(r.get(t["name"], Cell(w, bs, qd), key) or 0) * (scale or 1) for w in workloads]
            ax.bar([x + (i - (len(r.measured) - 1) / 2) * width for x in range(len(workloads))], values, width,
                   label=t["label"], color=COLOURS.get(t["name"]))
        ax.set_xticks(range(len(workloads)), workloads, rotation=20)
        ax.set_title(f"{human_size(bs)} requests, QD{qd}")
        if scale:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(ticker.FuncFormatter(_label_2_and_5))
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    return _save(fig, axes, path)


def _label_2_and_5(v, _):
    """Label the minor ticks 2 and 5 of each decade: enough to read a log axis, few enough to fit."""
    return f"{v:g}" if round(v / 10 ** math.floor(math.log10(v))) in (2, 5) else ""


def _depth_lines(r, path):
    sizes = sorted({c.bs for c in r.cells})
    depths = sorted({c.qd for c in r.cells})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4.2), squeeze=False)
    for ax, bs in zip(axes[0], sizes):
        for t in r.measured:
            ax.plot(depths, [r.get(t["name"], Cell("mixed", bs, qd)) or 0 for qd in depths], marker="o",
                    label=t["label"], color=COLOURS.get(t["name"]))
        ax.set_xscale("log", base=2)
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.set_title(f"mixed 50/50, {human_size(bs)} requests")
        ax.set_xlabel("queue depth")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("MB/s (read + write)")
    return _save(fig, axes, path)


def _save(fig, axes, path):
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
