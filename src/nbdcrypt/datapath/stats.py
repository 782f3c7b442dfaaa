"""Live statistics of the data path, as virtio-crypto's query-cryptodev reports them.

Per direction: requests, bytes, errors, time held by the throttle, requests in
flight and their peak.  Per direction and path mode: latency histograms of the
whole request and of its phases (throttle, queue wait, crypto, backing I/O), in
microseconds: an HdrHistogram for percentiles, plus the exact sum and counts in
fixed buckets that Prometheus histograms need (:mod:`nbdcrypt.plugin.metrics`).
"""

import bisect
import itertools
import threading
import time
from contextlib import contextmanager

from hdrh.histogram import HdrHistogram

PHASES = ("total", "throttle", "queue", "crypto", "io")
PERCENTILES = (50, 99, 99.9)
MAX_MICROSECONDS = 3_600_000_000  # an hour: anything longer is clamped
# Upper bounds of the fixed buckets (10 us .. 10 s, 1-2.5-5 steps); above the last: +Inf.
BUCKETS_US = (10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000,
              250_000, 500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000)


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
        self.ops = self.bytes = self.errors = self.in_flight = self.peak_in_flight = self.throttled_us = 0

    def as_dict(self):
        return dict(vars(self))


class _Latency:
    def __init__(self):
        self.hdr = HdrHistogram(1, MAX_MICROSECONDS, 2)
        self.seconds = 0.0
        self.in_bucket = [0] * (len(BUCKETS_US) + 1)  # the last one: above every bound

    def record(self, seconds):
        microseconds = min(MAX_MICROSECONDS, max(1, round(seconds * 1e6)))
        self.hdr.record_value(microseconds)
        self.seconds += seconds
        self.in_bucket[bisect.bisect_left(BUCKETS_US, seconds * 1e6)] += 1

    def summary(self, buckets):
        hdr = self.hdr
        result = {
            "count": hdr.get_total_count(),
            "mean": round(hdr.get_mean_value(), 1),
            **{f"p{p:g}": hdr.get_value_at_percentile(p) for p in PERCENTILES},
            "max": hdr.get_max_value(),
            "sum": round(self.seconds * 1e6, 1),
        }
        if buckets:  # cumulative, as Prometheus counts them: requests <= each bound
            result["buckets"] = list(itertools.accumulate(self.in_bucket[:-1]))
        return result


class Stats:
    """Thread-safe counters and histograms; :meth:`snapshot` is JSON-ready."""

    def __init__(self):
        self._lock = threading.Lock()
        self._directions = {"read": _Direction(), "write": _Direction()}
        self._latencies = {}  # (direction, mode, phase) -> _Latency
        self._worker_restarts = 0

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

    def count_worker_restart(self):
        with self._lock:
            self._worker_restarts += 1

    def _finish(self, counters, direction, mode, nbytes, timing, ok):
        with self._lock:
            counters.in_flight -= 1
            counters.ops += 1
            counters.throttled_us += round(timing.phases["throttle"] * 1e6)
            if not ok:
                counters.errors += 1
                return
            counters.bytes += nbytes
            for phase, seconds in timing.phases.items():
                if not seconds and phase != "total":
                    continue  # a phase this request's path did not have
                key = (direction, mode, phase)
                if key not in self._latencies:
                    self._latencies[key] = _Latency()
                self._latencies[key].record(seconds)

    def snapshot(self, buckets=False):
        """Counters and latency summaries (with ``buckets``: counts per BUCKETS_US bound)."""
        with self._lock:
            result = {name: counters.as_dict() for name, counters in self._directions.items()}
            for (direction, mode, phase), latency in sorted(self._latencies.items()):
                modes = result[direction].setdefault("latency_us", {})
                modes.setdefault(mode, {})[phase] = latency.summary(buckets)
            result["worker_restarts"] = self._worker_restarts
        return result

    def reset(self):
        with self._lock:
            for counters in self._directions.values():
                in_flight = counters.in_flight
                counters.__init__()
                counters.in_flight = counters.peak_in_flight = in_flight
            self._latencies.clear()
            self._worker_restarts = 0
