"""Live statistics of the data path, as virtio-crypto's query-cryptodev reports them.

Per direction: requests, bytes, errors, time held by the throttle, requests in
flight and their peak.  Per direction and path mode: latency histograms of the
whole request and of its phases (throttle, queue wait, crypto, backing I/O), in
microseconds: log-linear bins as HdrHistogram's with two significant digits for
percentiles, plus the exact sum and counts in fixed buckets that Prometheus
histograms need (:mod:`nbdcrypt.plugin.metrics`).

A request pays for its statistics with two short critical sections: the in-flight
count, then one append of its phase times to a batch.  The batch is folded into the
counters and histograms (a few numpy calls per phase) every FOLD requests and before
every snapshot, so a snapshot holds every request finished before it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

PHASES = ("total", "throttle", "queue", "crypto", "io")
PERCENTILES = (50, 99, 99.9)
MAX_MICROSECONDS = 3_600_000_000  # an hour: anything longer is clamped
# Upper bounds of the fixed buckets (10 us .. 10 s, 1-2.5-5 steps); above the last: +Inf.
BUCKETS_US = (10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000,
              250_000, 500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000)
FOLD = 256  # finished requests batched before they are folded in
# Log-linear bins: values below 2**EXACT_BITS have a bin each; each higher power of two
# is cut into 2**(EXACT_BITS - 1) bins, so a bin is less than 1.6 % of its values wide.
EXACT_BITS = 7
HALF = 1 << (EXACT_BITS - 1)
BINS = (MAX_MICROSECONDS.bit_length() - EXACT_BITS + 2) * HALF


class Timing:
    """Phase durations of one request, added up from whichever threads served it."""

    __slots__ = ("phases",)

    def __init__(self):
        self.phases = dict.fromkeys(PHASES, 0.0)

    def add(self, phase: str, seconds: float) -> None:
        self.phases[phase] += seconds

    def time(self, phase: str, call: Callable[..., T], *args: Any) -> T:
        start = time.perf_counter()
        try:
            return call(*args)
        finally:
            self.phases[phase] += time.perf_counter() - start


class _Direction:
    def __init__(self):
        self.ops = self.bytes = self.errors = self.in_flight = self.peak_in_flight = self.throttled_us = 0

    def as_dict(self):
        return dict(vars(self))


def _bins(microseconds):
    """The log-linear bin of each value (an int64 array of values >= 1)."""
    shift = np.maximum(np.frexp(microseconds)[1] - EXACT_BITS, 0)
    return (shift * HALF) + (microseconds >> shift)


def _highest_in_bin(index):
    shift = max(index // HALF, 1) - 1
    return ((index - shift * HALF + 1) << shift) - 1


class _Latencies:
    """The histograms of one direction and mode, a row per phase."""

    def __init__(self):
        self.in_bin = np.zeros((len(PHASES), BINS), np.int64)
        self.in_bucket = np.zeros((len(PHASES), len(BUCKETS_US) + 1), np.int64)  # last: above every bound
        self.seconds = np.zeros(len(PHASES))
        self.max = np.zeros(len(PHASES), np.int64)

    def record(self, seconds):
        """Count requests by their phase times: ``seconds`` has a row per request and a
        column per phase; 0 is a phase the request's path did not have (but every request
        has a total)."""
        had = seconds > 0
        had[:, 0] = True
        microseconds = np.minimum(np.maximum(np.rint(seconds * 1e6), 1), MAX_MICROSECONDS).astype(np.int64)
        row = np.arange(len(PHASES))  # spreads each phase to its own row of the flat counts
        self.in_bin += np.bincount((_bins(microseconds) + row * BINS)[had],
                                   minlength=self.in_bin.size).reshape(self.in_bin.shape)
        self.in_bucket += np.bincount((np.searchsorted(BUCKETS_US, seconds * 1e6) + row * self.in_bucket.shape[1])[had],
                                      minlength=self.in_bucket.size).reshape(self.in_bucket.shape)
        self.seconds += seconds.sum(axis=0)
        np.maximum(self.max, microseconds.max(axis=0, where=had, initial=0), out=self.max)

    def summary(self, phase, buckets):
        """Phase ``phase`` (an index of PHASES) summed up; None if no request had it."""
        in_bin, count, largest = self.in_bin[phase], int(self.in_bin[phase].sum()), int(self.max[phase])
        if not count:
            return None
        below = np.cumsum(in_bin)
        result = {
            "count": count,
            "mean": round(self.seconds[phase] * 1e6 / count, 1),
            **{f"p{p:g}": min(largest, _highest_in_bin(int(np.searchsorted(below, max(1, round(p / 100 * count))))))
               for p in PERCENTILES},
            "max": largest,
            "sum": round(float(self.seconds[phase]) * 1e6, 1),
        }
        if buckets:  # cumulative, as Prometheus counts them: requests <= each bound
            result["buckets"] = np.cumsum(self.in_bucket[phase, :-1]).tolist()
        return result


class Stats:
    """Thread-safe counters and histograms; :meth:`snapshot` is JSON-ready."""

    def __init__(self):
        self._lock = threading.Lock()
        self._directions = {"read": _Direction(), "write": _Direction()}
        self._latencies = {}  # (direction, mode) -> _Latencies
        self._finished = []  # (direction, mode, nbytes, phases, ok) not yet folded in
        self._worker_restarts = 0

    def started(self, direction: str) -> None:
        counters = self._directions[direction]
        with self._lock:
            counters.in_flight += 1
            if counters.in_flight > counters.peak_in_flight:
                counters.peak_in_flight = counters.in_flight

    def finished(self, direction: str, mode: str, nbytes: int, phases: dict[str, float], ok: bool) -> None:
        """Record a request that :meth:`started`: its ``phases`` (a Timing's) and whether it succeeded."""
        with self._lock:
            self._directions[direction].in_flight -= 1
            self._finished.append((direction, mode, nbytes, phases, ok))
            if len(self._finished) >= FOLD:
                self._fold()

    def count_worker_restart(self) -> None:
        with self._lock:
            self._worker_restarts += 1

    def _fold(self):
        """Count the finished requests in (lock held)."""
        finished, self._finished = self._finished, []
        times = {}  # (direction, mode) -> each successful request's phase times
        for direction, mode, nbytes, phases, ok in finished:
            counters = self._directions[direction]
            counters.ops += 1
            counters.throttled_us += round(phases["throttle"] * 1e6)
            if ok:
                counters.bytes += nbytes
                times.setdefault((direction, mode), []).append(list(phases.values()))
            else:
                counters.errors += 1
        for key, rows in times.items():
            if key not in self._latencies:
                self._latencies[key] = _Latencies()
            self._latencies[key].record(np.array(rows))

    def snapshot(self, buckets: bool = False) -> dict[str, Any]:
        """Counters and latency summaries (with ``buckets``: counts per BUCKETS_US bound)."""
        with self._lock:
            self._fold()
            result = {name: counters.as_dict() for name, counters in self._directions.items()}
            for (direction, mode), latencies in sorted(self._latencies.items()):
                phases = result[direction].setdefault("latency_us", {}).setdefault(mode, {})
                for index, phase in enumerate(PHASES):
                    if (summary := latencies.summary(index, buckets)) is not None:
                        phases[phase] = summary
            result["worker_restarts"] = self._worker_restarts
        return result

    def reset(self) -> None:
        with self._lock:
            self._finished = []
            for counters in self._directions.values():
                in_flight = counters.in_flight
                counters.__init__()
                counters.in_flight = counters.peak_in_flight = in_flight
            self._latencies.clear()
            self._worker_restarts = 0
