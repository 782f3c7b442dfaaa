"""Prometheus metrics of a served export, scraped over a Unix socket and over TCP and
parsed with prometheus_client (an implementation nobody here wrote): they count
exactly the I/O done and agree with ``ctl stats``."""

import http.client
import socket

import pytest
from prometheus_client import parser

from nbdcrypt.daemon.ctl import request
from tests.conftest import serving

WRITES = [4096, 65536, 1 << 20, 1536]  # the last one partial: read-modify-write inside one request
READS = [4096, 1 << 20, 100]


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=30)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def scrape(connection, path="/metrics"):
    connection.request("GET", path)
    response = connection.getresponse()
    return response.status, response.getheader("Content-Type"), response.read().decode()


def parse(text):
    """{(sample name, frozenset of labels): value}, and the families' types."""
    families = list(parser.text_string_to_metric_families(text))
    samples = {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}
    return samples, {f.name: f.type for f in families}


def labels(**kw):
    return frozenset(kw.items())


def do_io(h):
    for i, length in enumerate(WRITES):
        h.pwrite(bytes([i]) * length, i << 20)
    for length in READS:
        h.pread(length, 0)
    h.shutdown()  # so the server stops at once, not after its grace period for idle clients


def test_unix_socket_metrics_count_the_io_done(image, key_file, tmp_path, nbd_handle):
    metrics, control = tmp_path / "metrics.sock", str(tmp_path / "control.sock")
    with serving(image, key_file, "--metrics", str(metrics), "--control", str(control),
                 "--perf-no_read_workqueue", "--inline-below", "0") as uri:
        assert oct(metrics.stat().st_mode & 0o777) == "0o600"
        do_io(nbd_handle(uri))
        status, content_type, text = scrape(UnixHTTPConnection(str(metrics)))
        stats = request(control, "stats")
        assert scrape(UnixHTTPConnection(str(metrics)), "/")[0] == 404
    assert status == 200 and content_type == "text/plain; version=0.0.4; charset=utf-8"
    samples, types = parse(text)
    assert types["nbdcrypt_requests"] == "counter" and types["nbdcrypt_request_duration_seconds"] == "histogram"
    read, write = labels(direction="read"), labels(direction="write")
    assert samples["nbdcrypt_requests_total", write] == len(WRITES) == stats["write"]["ops"]
    assert samples["nbdcrypt_requests_total", read] == len(READS) == stats["read"]["ops"]
    assert samples["nbdcrypt_bytes_total", write] == sum(WRITES)
    assert samples["nbdcrypt_bytes_total", read] == sum(READS)
    assert samples["nbdcrypt_request_errors_total", write] == samples["nbdcrypt_request_errors_total", read] == 0
    assert samples["nbdcrypt_requests_in_flight", write] == 0
    assert samples["nbdcrypt_requests_in_flight_peak", read] == stats["read"]["peak_in_flight"] >= 1
    assert samples["nbdcrypt_throttled_seconds_total", read] == 0
    # Reads took the inline path, writes the queued one: each counted once, in its mode.
    duration = "nbdcrypt_request_duration_seconds"
    assert samples[f"{duration}_count", labels(direction="read", mode="inline")] == len(READS)
    assert samples[f"{duration}_count", labels(direction="write", mode="queued")] == len(WRITES)
    assert samples[f"{duration}_bucket", labels(direction="write", mode="queued", le="+Inf")] == len(WRITES)
    assert samples[f"{duration}_sum", labels(direction="write", mode="queued")] == pytest.approx(
        stats["write"]["latency_us"]["queued"]["total"]["sum"] / 1e6)
    phase = "nbdcrypt_request_phase_duration_seconds"
    for name in ("queue", "crypto", "io"):
        assert samples[f"{phase}_count", labels(direction="write", mode="queued", phase=name)] == len(WRITES)
    assert (f"{phase}_count", labels(direction="read", mode="inline", phase="queue")) not in samples
    assert samples["nbdcrypt_worker_processes", labels()] == 0


def test_tcp_metrics_from_the_config_file_with_worker_processes(image, key_file, tmp_path, nbd_handle):
    control = str(tmp_path / "control.sock")
    config = tmp_path / "serve.toml"
    config.write_text(f'metrics = "127.0.0.1:0"\nworker-type = "process"\nworkers = 2\ncontrol = "{control}"\n')
    with serving(image, key_file, "--config", str(config)) as uri:
        do_io(nbd_handle(uri))
        status = request(control, "status")
        host, port = status["metrics"].rsplit(":", 1)
        assert host == "127.0.0.1"
        code, _, text = scrape(http.client.HTTPConnection(host, int(port), timeout=30))
    assert code == 200
    samples, _ = parse(text)
    assert samples["nbdcrypt_requests_total", labels(direction="write")] == len(WRITES)
    assert samples["nbdcrypt_requests_total", labels(direction="read")] == len(READS)
    assert samples["nbdcrypt_worker_processes", labels()] == len(status["worker_pids"]) == 2
    assert samples["nbdcrypt_worker_restarts_total", labels()] == 0
    assert status["settings"]["worker_type"] == "process"
