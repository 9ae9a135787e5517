"""Counters and a one-minute latency window for status (and, later, metrics)."""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter, deque

from .metrics import BUCKETS

WINDOW_S = 60.0


class Stats:
    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.recent: deque[tuple[float, float]] = deque(maxlen=500_000)  # (done at, latency s)
        self.buckets = [0] * (len(BUCKETS) + 1)  # latency histogram, for metrics
        self.latency_sum = 0.0

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] += 1

    def done(self, outcome: str, latency: float, now: float) -> None:
        self.outcomes[outcome] += 1
        self.recent.append((now, latency))
        self.buckets[bisect_left(BUCKETS, latency)] += 1
        self.latency_sum += latency

    @property
    def total(self) -> int:
        return sum(self.outcomes.values())

    def window(self, now: float, uptime: float) -> dict:
        while self.recent and self.recent[0][0] < now - WINDOW_S:
            self.recent.popleft()
        lat = sorted(x[1] for x in self.recent)
        span = max(1e-9, min(WINDOW_S, uptime))
        return {
            "throughput_rps": round(len(lat) / span, 2),
            "latency_p50_ms": round(_pct(lat, 0.50) * 1000, 3) if lat else None,
            "latency_p99_ms": round(_pct(lat, 0.99) * 1000, 3) if lat else None,
        }


def _pct(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
