"""`python -m bench.run --quick` runs every target and writes every file, and `python -m bench.report
--compare` puts two runs side by side; nothing here judges speed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.fio import QUICK, Cell, matrix
from bench.targets import TARGETS
from tests.tools import require

ROOT = Path(__file__).resolve().parents[2]


def bench(module, *args):
    result = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    require("fio", "nbdkit", "qemu-img", "qemu-io", "qemu-nbd")
    out = tmp_path_factory.mktemp("quick")
    bench("bench.run", "--quick", "--out", out)
    return out


def test_quick_run_writes_every_target_and_cell(quick_run):
    out = quick_run
    data = json.loads((out / "results.json").read_text())
    assert data["machine"]["cpu"] and data["machine"]["cores"]

    targets = {t["name"]: t for t in data["targets"]}
    assert set(targets) == {t.name for t in TARGETS if t.default} and "python-floor" in targets
    for target in targets.values():
        # A target may only be skipped for a tool that is not installed.
        assert (target["skipped"] or "not installed").endswith("not installed"), target["skipped"]
    measured = [name for name, t in targets.items() if not t["skipped"]]
    assert "plaintext" in measured and any(targets[n]["subject"] for n in measured)

    cells = {(c["target"], Cell(c["workload"], c["bs"], c["qd"])): c for c in data["cells"]}
    for name in measured:
        assert targets[name]["connect_ms"] > 0
        for cell in matrix(*QUICK):
            record = cells[name, cell]
            assert "error" not in record, record
            assert record["mbps"] > 0 and record["iops"] > 0 and record["lat_p99_us"] > 0
            # Every server, nbdcrypt's supervisor + nbdkit tree included, used some CPU per request.
            assert record["requests"] > 0 and record["server_cpu_us"] > 0, record
            assert 0 <= record["server_sys_us"] <= record["server_cpu_us"]

    markdown = (out / "results.md").read_text()
    assert all(name in markdown for name in measured)
    assert "The issue's targets" in markdown and "## Server CPU per request" in markdown
    assert {p.name for p in out.glob("*.png")} >= {"throughput_qd8.png", "latency_qd8.png", "cpu_qd8.png"}


def test_compare_puts_two_runs_side_by_side(quick_run, tmp_path):
    # A second, smaller run: the comparison covers what both runs measured.
    bench("bench.run", "--quick", "--targets", "plaintext,nbdcrypt", "--workloads", "mixed", "--bs", "4K",
          "--out", tmp_path / "new")
    printed = bench("bench.report", "--compare", quick_run / "results.json", tmp_path / "new" / "results.json",
                    "--out", tmp_path / "cmp").stdout

    markdown = (tmp_path / "cmp" / "compare.md").read_text()
    assert markdown == printed.removesuffix("\n")
    for title in ("## MB/s", "## Server CPU per request"):
        table = markdown.split(title, 1)[1].split("\n## ", 1)[0]
        assert "| cell | nbdcrypt | plaintext |" in table
        rows = [line for line in table.splitlines() if line.startswith("| mixed")]
        assert [row.split(" | ")[0] for row in rows] == ["| mixed 4 KiB QD8"]
        assert rows[0].count("->") == 2 and "x)" in rows[0]
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0
