"""What one peer may cost us: a token bucket of exchanges, and a spacing between whole models. Time passed in.

A certified peer can still be compromised. Each push it makes costs a decode and a merge, and each pull may
cost a whole model (a pull that names a base we do not hold gets one): one 261-byte push and a pull made a
node send a 1.1M-parameter model again and again. So every peer gets a budget: ``rate`` exchanges per second
on average with bursts up to ``burst``, and a whole model at most once every ``full_every`` seconds, which is
all an honest peer that restarted needs.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

MAX_TRACKED = 1024  # peers whose budget is remembered; the least recently seen are forgotten


@dataclass
class _Bucket:
    tokens: float
    at: float
    last_full: float | None = None


class PeerBudget:
    def __init__(self, rate: float, burst: float, full_every: float) -> None:
        self.rate, self.burst, self.full_every = rate, burst, full_every
        self._buckets: OrderedDict[bytes, _Bucket] = OrderedDict()

    def _bucket(self, peer: bytes, now: float) -> _Bucket:
        bucket = self._buckets.get(peer)
        if bucket is None:
            bucket = self._buckets[peer] = _Bucket(self.burst, now)
            while len(self._buckets) > MAX_TRACKED:
                self._buckets.popitem(last=False)
        self._buckets.move_to_end(peer)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now
        return bucket

    def take_exchange(self, peer: bytes, now: float) -> bool:
        """Whether ``peer`` may have one more exchange now (and counts it if so)."""
        bucket = self._bucket(peer, now)
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True

    def may_send_full(self, peer: bytes, now: float) -> bool:
        last = self._bucket(peer, now).last_full
        return last is None or now - last >= self.full_every

    def sent_full(self, peer: bytes, now: float) -> None:
        self._bucket(peer, now).last_full = now
