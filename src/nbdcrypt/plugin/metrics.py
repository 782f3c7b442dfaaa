"""Prometheus metrics of the data path: ``serve --metrics PATH|PORT|HOST:PORT``.

Inside nbdkit, one thread serves HTTP ``GET /metrics`` in Prometheus' text format
0.0.4: the numbers of ``nbdcrypt ctl stats`` as counters, gauges and histograms
(latencies in seconds, buckets 10 us .. 10 s).  A PATH is a Unix socket, mode
0600 and for our own user or root only (SO_PEERCRED), as the control socket;
PORT listens on 127.0.0.1, HOST:PORT where it says.  Metrics hold counts and
timings, nothing secret, so TCP has no authentication; the default keeps them on
the host.  Each connection is one request with its own thread inside nbdkit, so
at most MAX_CONNECTIONS are served at once (more are closed unanswered) and a
request must arrive within REQUEST_TIMEOUT seconds.

prometheus_client writes the text; our own HTTP server serves it, since the
client's servers cannot listen on a Unix socket or check peer credentials.
"""

import io
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, HTTPServer
from socketserver import BaseRequestHandler, BaseServer, ThreadingMixIn, UnixStreamServer
from typing import TYPE_CHECKING, Any, Literal, cast
from urllib.parse import urlsplit

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from ..control import JsonObject
from ..datapath.queueing import CryptPath
from ..datapath.stats import BUCKETS_US
from ..errors import InputError
from .control_server import bind_private, peer_allowed

if TYPE_CHECKING:
    from typing_extensions import Buffer  # typeshed's; not needed at run time

DIRECTIONS = ("read", "write")
MAX_CONNECTIONS = 8  # a scraper or two, and an operator with curl
REQUEST_TIMEOUT = 5.0  # seconds for a whole request: scrapers send theirs at once

# Per direction: key in the statistics, metric family, help, scale.
_PER_DIRECTION = (
    ("ops", CounterMetricFamily, "nbdcrypt_requests_total", "NBD requests finished, failed ones included", 1),
    ("bytes", CounterMetricFamily, "nbdcrypt_bytes_total", "bytes read or written by successful requests", 1),
    ("errors", CounterMetricFamily, "nbdcrypt_request_errors_total",
     "requests that failed (the client got an error)", 1),
    ("throttled_us", CounterMetricFamily, "nbdcrypt_throttled_seconds_total",
     "time requests were held by the throttle", 1e-6),
    ("in_flight", GaugeMetricFamily, "nbdcrypt_requests_in_flight", "requests being served now", 1),
    ("peak_in_flight", GaugeMetricFamily, "nbdcrypt_requests_in_flight_peak",
     "most requests in flight at once since the statistics were reset", 1),
)
_DURATION = ("nbdcrypt_request_duration_seconds", "latency of successful requests, by path mode (inline/queued)")
_PHASE = ("nbdcrypt_request_phase_duration_seconds",
          "time successful requests spent in each phase: throttle, queue (waiting for and handing over to "
          "a crypt worker), crypto, io")

Address = tuple[Literal["unix"], str] | tuple[Literal["tcp"], tuple[str, int]]


def parse_address(text: str) -> Address:
    """``("tcp", (host, port))`` for PORT or HOST:PORT (host 127.0.0.1 unless given),
    else ``("unix", path)``."""
    host, colon, port = str(text).rpartition(":")
    if not (port.isascii() and port.isdigit()) or "/" in text:
        return "unix", str(text)
    if int(port) > 65535 or (colon and not host):
        raise InputError(f"--metrics {text}: expected PATH, PORT or HOST:PORT")
    return "tcp", (host.strip("[]") if colon else "127.0.0.1", int(port))


def absolute_address(text: str) -> str:
    """``text`` checked, with a socket path made absolute (nbdkit may run elsewhere)."""
    _, where = parse_address(text)
    return os.path.abspath(where) if isinstance(where, str) else str(text)


def render(stats: JsonObject, worker_pids: Sequence[int] = ()) -> str:
    """The text exposition of a :meth:`Stats.snapshot` taken with ``buckets=True``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(stats, worker_pids))
    return generate_latest(registry).decode()


class _Snapshot(Collector):
    """A prometheus_client collector of one statistics snapshot."""

    def __init__(self, stats: JsonObject, worker_pids: Sequence[int]) -> None:
        self.stats, self.worker_pids = stats, worker_pids

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        for key, family, name, help_text, scale in _PER_DIRECTION:
            metric = family(name, help_text, labels=["direction"])
            for d in DIRECTIONS:
                metric.add_metric([d], stats[d][key] * scale)
            yield metric
        duration = HistogramMetricFamily(*_DURATION, labels=["direction", "mode"])
        phases = HistogramMetricFamily(*_PHASE, labels=["direction", "mode", "phase"])
        for d in DIRECTIONS:
            for mode, by_phase in stats[d].get("latency_us", {}).items():
                for phase, summary in by_phase.items():
                    if phase == "total":
                        duration.add_metric([d, mode], *_histogram(summary))
                    else:
                        phases.add_metric([d, mode, phase], *_histogram(summary))
        yield duration
        yield phases
        yield GaugeMetricFamily("nbdcrypt_worker_processes", "crypt worker processes running (0: worker threads)",
                                value=len(self.worker_pids))
        yield CounterMetricFamily("nbdcrypt_worker_restarts_total",
                                  "crypt worker processes that died and were replaced",
                                  value=stats["worker_restarts"])


def _histogram(summary: JsonObject) -> tuple[list[tuple[str, float]], float]:
    """(cumulative buckets in seconds, sum) of a latency summary in microseconds."""
    buckets = [(repr(bound / 1e6), count) for bound, count in zip(BUCKETS_US, summary["buckets"], strict=True)]
    return buckets + [("+Inf", summary["count"])], summary["sum"] / 1e6


class MetricsServer:
    """Serves the statistics of ``crypt_path`` (a CryptPath) at ``address`` from a
    daemon thread; InputError if it cannot listen there."""

    def __init__(self, address: str, crypt_path: CryptPath) -> None:
        _, where = parse_address(address)
        self._path = where if isinstance(where, str) else None  # a Unix socket's
        try:
            self._server: _Bounded = (_UnixServer(where, _Handler) if isinstance(where, str)
                                      else _TcpServer(where, _Handler))
        except OSError as e:
            raise InputError(f"--metrics {address}: cannot listen: {e.strerror or e}") from None
        self._server.crypt_path = crypt_path
        threading.Thread(target=self._server.serve_forever, name="nbdcrypt-metrics", daemon=True).start()

    @property
    def address(self) -> str:
        """The socket's path, or HOST:PORT (with the port chosen for 0)."""
        if self._path is not None:
            return self._path
        host, port = cast(tuple[Any, ...], self._server.server_address)[:2]  # IPv6: also flow and scope
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._path is not None and os.path.exists(self._path):
            os.unlink(self._path)


class _Handler(BaseHTTPRequestHandler):
    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # StreamRequestHandler's, replaced by one with a deadline
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, time.monotonic() + REQUEST_TIMEOUT))

    def do_GET(self) -> None:
        if urlsplit(self.path).path != "/metrics":
            self.send_error(404, "metrics are at /metrics")
            return
        path = cast(_Bounded, self.server).crypt_path
        body = render(path.stats.snapshot(buckets=True), path.worker_pids()).encode()
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every few seconds is not news


class _DeadlineReader(io.RawIOBase):
    """Reads ``sock`` until ``deadline`` (time.monotonic()), then TimeoutError: a client
    that trickles its request byte by byte is dropped as one that sends nothing."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock, self._deadline = sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: "Buffer") -> int:
        self._sock.settimeout(max(self._deadline - time.monotonic(), 1e-3))
        return self._sock.recv_into(buffer)


class _Bounded(ThreadingMixIn, BaseServer):
    """A threading server that serves at most MAX_CONNECTIONS connections at once and
    closes the others at once, so a flood cannot pile up threads in nbdkit."""

    daemon_threads = True
    crypt_path: CryptPath  # whose statistics are served

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()  # no thread started to release it
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _UnixServer(_Bounded, UnixStreamServer):
    def server_bind(self) -> None:
        bind_private(self.socket, cast(str, self.server_address))  # MetricsServer's path

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return peer_allowed(request)


class _TcpServer(_Bounded, HTTPServer):
    def __init__(self, address: tuple[str, int], handler: type[BaseRequestHandler]) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, handler)
