"""QoS: token buckets limiting bytes and requests per second, alone or together.

Each bucket refills at its rate and holds at most one second's worth (the burst).
A request takes its tokens at once, possibly going into debt, and sleeps until the
debt is repaid; so concurrent requests queue fairly and the long-run rate holds.
"""

from __future__ import annotations

import threading
import time

BURST_SECONDS = 1.0


class _Bucket:
    def __init__(self, rate):
        self.rate = rate
        self.tokens = rate * BURST_SECONDS
        self.stamp = time.monotonic()

    def take(self, amount, now):
        """Take ``amount`` tokens; return how long the taker must wait for them."""
        if not self.rate:
            return 0.0
        self.tokens = min(self.rate * BURST_SECONDS, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= amount
        return max(0.0, -self.tokens / self.rate)


class Throttle:
    """``bps`` bytes and ``ops`` requests per second; 0 means no limit."""

    def __init__(self, bps: int = 0, ops: int = 0) -> None:
        self._lock = threading.Lock()
        self.set_rates(bps, ops)

    def set_rates(self, bps: int, ops: int) -> None:
        with self._lock:
            self._buckets = (_Bucket(bps), _Bucket(ops))

    def wait(self, nbytes: int) -> float:
        """Block until a request of ``nbytes`` may go; return the seconds waited."""
        with self._lock:
            now = time.monotonic()
            delay = max(self._buckets[0].take(nbytes, now), self._buckets[1].take(1, now))
        if delay:
            time.sleep(delay)
        return delay
