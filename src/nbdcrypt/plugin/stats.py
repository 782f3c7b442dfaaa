"""Live statistics of the data path, as virtio-crypto's query-cryptodev reports them.

Per direction: requests, bytes, errors, requests in flight and their peak.  Per
direction and path mode: latency histograms of the whole request and of its
phases (throttle, queue wait, crypto, backing I/O), in microseconds.
"""

import threading
import time
from contextlib import contextmanager

from hdrh.histogram import HdrHistogram

PHASES = ("total", "throttle", "queue", "crypto", "io")
PERCENTILES = (50, 99, 99.9)
MAX_MICROSECONDS = 3_600_000_000  # an hour: anything longer is clamped


class Timing:
    """Phase durations of one request, added up from whichever threads served it."""

    def __init__(self):
        self.phases = dict.fromkeys(PHASES, 0.0)

    def add(self, phase, seconds):
        self.phases[phase] += seconds

    def time(self, phase, call, *args):
        start = time.perf_counter()
        try:
            return call(*args)
        finally:
            self.add(phase, time.perf_counter() - start)


class _Direction:
    def __init__(self):
        self.ops = self.bytes = self.errors = self.in_flight = self.peak_in_flight = 0

    def as_dict(self):
        return dict(vars(self))


class Stats:
    """Thread-safe counters and histograms; :meth:`snapshot` is JSON-ready."""

    def __init__(self):
        self._lock = threading.Lock()
        self._directions = {"read": _Direction(), "write": _Direction()}
        self._histograms = {}  # (direction, mode, phase) -> HdrHistogram

    @contextmanager
    def request(self, direction, mode, nbytes):
        counters = self._directions[direction]
        with self._lock:
            counters.in_flight += 1
            counters.peak_in_flight = max(counters.peak_in_flight, counters.in_flight)
        timing = Timing()
        start = time.perf_counter()
        ok = False
        try:
            yield timing
            ok = True
        finally:
            timing.phases["total"] = time.perf_counter() - start
            self._finish(counters, direction, mode, nbytes, timing, ok)

    def _finish(self, counters, direction, mode, nbytes, timing, ok):
        with self._lock:
            counters.in_flight -= 1
            counters.ops += 1
            if not ok:
                counters.errors += 1
                return
            counters.bytes += nbytes
            for phase, seconds in timing.phases.items():
                if not seconds and phase != "total":
                    continue  # a phase this request's path did not have
                key = (direction, mode, phase)
                if key not in self._histograms:
                    self._histograms[key] = HdrHistogram(1, MAX_MICROSECONDS, 2)
                self._histograms[key].record_value(min(MAX_MICROSECONDS, max(1, round(seconds * 1e6))))

    def snapshot(self):
        with self._lock:
            result = {name: counters.as_dict() for name, counters in self._directions.items()}
            for (direction, mode, phase), hist in sorted(self._histograms.items()):
                latency = result[direction].setdefault("latency_us", {}).setdefault(mode, {})
                latency[phase] = {
                    "count": hist.get_total_count(),
                    "mean": round(hist.get_mean_value(), 1),
                    **{f"p{p:g}": hist.get_value_at_percentile(p) for p in PERCENTILES},
                    "max": hist.get_max_value(),
                }
        return result

    def reset(self):
        with self._lock:
            for counters in self._directions.values():
                in_flight = counters.in_flight
                counters.__init__()
                counters.in_flight = counters.peak_in_flight = in_flight
            self._histograms.clear()
