"""Prometheus metrics of the data path: ``serve --metrics PATH|PORT|HOST:PORT``.

Inside nbdkit, one thread serves HTTP ``GET /metrics`` in Prometheus' text format
0.0.4: the numbers of ``nbdcrypt ctl stats`` as counters, gauges and histograms
(latencies in seconds, buckets 10 us .. 10 s).  A PATH is a Unix socket, mode
0600 and for our own user or root only (SO_PEERCRED), as the control socket;
PORT listens on 127.0.0.1, HOST:PORT where it says.  Metrics hold counts and
timings, nothing secret, so TCP has no authentication; the default keeps them on
the host.

The text is written here, a few lines, so the plugin imports no client library;
the tests parse it with prometheus_client, an implementation nobody here wrote.
"""

import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import ThreadingMixIn, UnixStreamServer
from urllib.parse import urlsplit

from ..errors import InputError
from .control_server import bind_private, peer_allowed
from .stats import BUCKETS_US

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DIRECTIONS = ("read", "write")

# Per direction: key in the statistics, metric, type, help, scale.
_PER_DIRECTION = (
    ("ops", "nbdcrypt_requests_total", "counter", "NBD requests finished, failed ones included", 1),
    ("bytes", "nbdcrypt_bytes_total", "counter", "bytes read or written by successful requests", 1),
    ("errors", "nbdcrypt_request_errors_total", "counter", "requests that failed (the client got an error)", 1),
    ("throttled_us", "nbdcrypt_throttled_seconds_total", "counter", "time requests were held by the throttle",
     1e-6),
    ("in_flight", "nbdcrypt_requests_in_flight", "gauge", "requests being served now", 1),
    ("peak_in_flight", "nbdcrypt_requests_in_flight_peak", "gauge",
     "most requests in flight at once since the statistics were reset", 1),
)
_DURATION = ("nbdcrypt_request_duration_seconds", "histogram",
             "latency of successful requests, by path mode (inline/queued)")
_PHASE = ("nbdcrypt_request_phase_duration_seconds", "histogram",
          "time successful requests spent in each phase: throttle, queue (waiting for and handing over to "
          "a crypt worker), crypto, io")


def parse_address(text):
    """``("tcp", (host, port))`` for PORT or HOST:PORT (host 127.0.0.1 unless given),
    else ``("unix", path)``."""
    host, colon, port = str(text).rpartition(":")
    if not port.isdigit() or "/" in text:
        return "unix", str(text)
    if int(port) > 65535 or (colon and not host):
        raise InputError(f"--metrics {text}: expected PATH, PORT or HOST:PORT")
    return "tcp", (host.strip("[]") if colon else "127.0.0.1", int(port))


def absolute_address(text):
    """``text`` checked, with a socket path made absolute (nbdkit may run elsewhere)."""
    kind, where = parse_address(text)
    return os.path.abspath(where) if kind == "unix" else str(text)


def render(stats, worker_pids=()):
    """The text exposition of a :meth:`Stats.snapshot` taken with ``buckets=True``."""
    lines = []

    def family(name, kind, help_text, samples):
        lines.extend((f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"))
        lines.extend(f"{name}{suffix}{_labels(labels)} {value!r}" for suffix, labels, value in samples)

    for key, name, kind, help_text, scale in _PER_DIRECTION:
        family(name, kind, help_text, [("", {"direction": d}, stats[d][key] * scale) for d in DIRECTIONS])
    latencies = [(d, mode, phase, summary) for d in DIRECTIONS
                 for mode, phases in stats[d].get("latency_us", {}).items() for phase, summary in phases.items()]
    family(*_DURATION, [s for d, mode, phase, h in latencies if phase == "total"
                        for s in _histogram({"direction": d, "mode": mode}, h)])
    family(*_PHASE, [s for d, mode, phase, h in latencies if phase != "total"
            for s in _histogram({"direction": d, "mode": mode, "phase": phase}, h)])
    family("nbdcrypt_worker_processes", "gauge", "crypt worker processes running (0: worker threads)",
           [("", {}, len(worker_pids))])
    family("nbdcrypt_worker_restarts_total", "counter", "crypt worker processes that died and were replaced",
           [("", {}, stats["worker_restarts"])])
    return "\n".join(lines) + "\n"


def _histogram(labels, summary):
    buckets = [(bound / 1e6, count) for bound, count in zip(BUCKETS_US, summary["buckets"])]
    yield from (("_bucket", {**labels, "le": repr(le)}, count) for le, count in buckets)
    yield "_bucket", {**labels, "le": "+Inf"}, summary["count"]
    yield "_sum", labels, summary["sum"] / 1e6
    yield "_count", labels, summary["count"]


def _labels(labels):
    # Label values are our own words (read, queued, crypto ...): nothing to escape.
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""


class MetricsServer:
    """Serves the statistics of ``crypt_path`` (a CryptPath) at ``address`` from a
    daemon thread; InputError if it cannot listen there."""

    def __init__(self, address, crypt_path):
        kind, where = parse_address(address)
        self._path = where if kind == "unix" else None
        try:
            self._server = _UnixServer(where, _Handler) if kind == "unix" else _TcpServer(where, _Handler)
        except OSError as e:
            raise InputError(f"--metrics {address}: cannot listen: {e.strerror or e}") from None
        self._server.crypt_path = crypt_path
        threading.Thread(target=self._server.serve_forever, name="nbdcrypt-metrics", daemon=True).start()

    @property
    def address(self):
        """The socket's path, or HOST:PORT (with the port chosen for 0)."""
        if self._path is not None:
            return self._path
        host, port = self._server.server_address[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def close(self):
        self._server.shutdown()
        self._server.server_close()
        if self._path is not None and os.path.exists(self._path):
            os.unlink(self._path)


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if urlsplit(self.path).path != "/metrics":
            self.send_error(404, "metrics are at /metrics")
            return
        path = self.server.crypt_path
        body = render(path.stats.snapshot(buckets=True), path.worker_pids()).encode()
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass  # a scrape every few seconds is not news


class _UnixServer(ThreadingMixIn, UnixStreamServer):
    daemon_threads = True

    def server_bind(self):
        bind_private(self.socket, self.server_address)

    def verify_request(self, request, client_address):
        return peer_allowed(request)


class _TcpServer(ThreadingHTTPServer):
    def __init__(self, address, handler):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, handler)
