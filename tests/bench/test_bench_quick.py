"""`python -m bench.run --quick` runs every target and writes every file; it never judges speed."""

import json
import subprocess
import sys
from pathlib import Path

from bench.fio import QUICK, Cell, matrix
from bench.targets import TARGETS
from tests.tools import require

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_writes_every_target_and_cell(tmp_path):
    require("fio", "nbdkit", "qemu-img", "qemu-io", "qemu-nbd")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    data = json.loads((out / "results.json").read_text())
    assert data["machine"]["cpu"] and data["machine"]["cores"]

    targets = {t["name"]: t for t in data["targets"]}
    assert set(targets) == {t.name for t in TARGETS if t.default}
    for name, target in targets.items():
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

    markdown = (out / "results.md").read_text()
    assert all(name in markdown for name in measured)
    assert "The issue's targets" in markdown
    assert {p.name for p in out.glob("*.png")} >= {"throughput_qd8.png", "latency_qd8.png"}
