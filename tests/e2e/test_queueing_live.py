"""The queueing layer live: fio runs while flags flip; throttles; the control endpoint."""

import itertools
import json
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from nbdcrypt.daemon.ctl import request
from nbdcrypt.datapath.settings import PERF_FLAGS
from tests.conftest import serving
from tests.tools import nbdcrypt_cmd, require, run


def fio_json(result):
    return json.loads(result.stdout[result.stdout.index("{"):])["jobs"]


def test_fio_verify_while_flags_flip_every_100ms(image, key_file, tmp_path):
    require("fio")
    control = str(tmp_path / "control.sock")
    with serving(image, key_file, "--control", control, "--inline-below", "0") as uri:
        stop = threading.Event()
        flips = []

        def flipper():
            for bits in itertools.cycle(itertools.product(["off", "on"], repeat=4)):
                if stop.wait(0.1):
                    return
                request(control, "set", {**dict(zip(PERF_FLAGS, bits, strict=True)), "workers": 1 + len(flips) % 3})
                flips.append(bits)

        request(control, "reset-stats")
        thread = threading.Thread(target=flipper)
        thread.start()
        try:
            result = run(["fio", "--name=flip", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
                          "--bssplit=4k/40:16k/20:64k/20:1m/20", "--size=12M", "--numjobs=3",
                          "--offset_increment=16M", "--iodepth=8", "--verify=crc32c", "--verify_fatal=1",
                          "--output-format=json"], cwd=tmp_path)
        finally:
            stop.set()
            thread.join()
        stats = request(control, "stats")
    jobs = fio_json(result)
    assert all(job["error"] == 0 for job in jobs)
    assert len(flips) >= 5, "the run was too short to flip anything"
    for direction in ("read", "write"):
        issued = sum(job[direction]["total_ios"] for job in jobs)
        assert issued > 0
        assert stats[direction]["ops"] == issued
        assert stats[direction]["errors"] == 0
    assert {"inline", "queued"} <= set(stats["write"]["latency_us"])


def test_fio_verify_while_inline_below_changes(image, key_file, tmp_path):
    """Small requests run inline below the threshold, large ones queued, as ctl set moves it."""
    require("fio")
    control = str(tmp_path / "control.sock")
    with serving(image, key_file, "--control", control, "--inline-below", "0") as uri:
        stop = threading.Event()
        thresholds = itertools.cycle([64 << 10, 1 << 20, 16 << 10])  # each splits 4k, 64k and 1m

        def changer():
            while not stop.wait(0.1):
                request(control, "set", {"inline_below": next(thresholds)})

        thread = threading.Thread(target=changer)
        thread.start()
        try:
            result = run(["fio", "--name=threshold", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
                          "--bssplit=4k/50:64k/25:1m/25", "--size=8M", "--numjobs=2", "--offset_increment=16M",
                          "--iodepth=8", "--verify=crc32c", "--verify_fatal=1", "--output-format=json"],
                         cwd=tmp_path)
        finally:
            stop.set()
            thread.join()
        stats = request(control, "stats")
    assert all(job["error"] == 0 for job in fio_json(result))
    for direction in ("read", "write"):
        assert stats[direction]["errors"] == 0
        assert {"inline", "queued"} <= set(stats[direction]["latency_us"])


def measure_read_rate(h, seconds, bs=64 << 10):
    start, done = time.monotonic(), 0
    while time.monotonic() - start < seconds:
        h.pread(bs, (done // bs % 512) * bs)
        done += bs
    return done / (time.monotonic() - start)


def test_throttles_hold_and_lift(image, key_file, tmp_path, nbd_handle):
    control = str(tmp_path / "control.sock")
    limit = 4 << 20
    with serving(image, key_file, "--control", control, "--throttle-bps", str(limit), "--inline-below", "0") as uri:
        h = nbd_handle(uri)
        measure_read_rate(h, 1.2)  # spend the one-second burst
        assert 0.9 * limit <= measure_read_rate(h, 3) <= 1.1 * limit
        request(control, "set", {"throttle_bps": 0, "throttle_ops": 100})
        measure_read_rate(h, 1.2, bs=4096)
        ops = measure_read_rate(h, 3, bs=4096) / 4096
        assert 90 <= ops <= 110
        request(control, "set", {"throttle_ops": 0})
        assert measure_read_rate(h, 1) > 3 * limit
        stats = request(control, "stats")
    assert stats["read"]["latency_us"]["queued"]["throttle"]["count"] > 0


@pytest.fixture
def public_dir():
    """A directory other users may traverse (pytest's own tmp dirs are private)."""
    with tempfile.TemporaryDirectory(dir="/tmp") as path:
        os.chmod(path, 0o711)
        yield Path(path)


def test_control_endpoint_checks_peer_and_input(image, key_file, public_dir):
    control = public_dir / "control.sock"
    with serving(image, key_file, "--control", str(control)):
        assert oct(control.stat().st_mode & 0o777) == "0o600"
        result = subprocess.run(nbdcrypt_cmd() + ["ctl", str(control), "set", "no_read_workqueue=perhaps"],
                                capture_output=True, text=True)
        assert result.returncode == 2 and "takes on/off" in result.stderr and "Traceback" not in result.stderr
        result = run(nbdcrypt_cmd() + ["ctl", str(control), "refresh", "--perf-no_read_workqueue"])
        assert json.loads(result.stdout)["settings"]["no_read_workqueue"] is True
        assert "read:" in run(nbdcrypt_cmd() + ["ctl", str(control), "stats"]).stdout
        if os.geteuid() == 0 and run(["which", "setpriv"], check=False).returncode == 0:
            os.chmod(control, 0o666)  # let the socket's mode pass so SO_PEERCRED is what refuses
            probe = (f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({str(control)!r}); "
                     "s.sendall(b'{\"command\": \"status\"}\\n'); print(s.recv(200))")
            other = run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3",
                         "-c", probe])
            assert "permission denied" in other.stdout
