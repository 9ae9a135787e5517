"""Counters, and the last minute's throughput and latency percentiles for status.

The minute is kept as one latency histogram per second (at most 61 of them), with bins 2%
wide on a log scale, so its memory and the cost of `status` do not grow with the request
rate; percentiles are exact to within a bin (±1%). Keeping each latency instead cost ~110
bytes a request (56 MB at 8,000 req/s) and a sort of every one of them per status call.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import Counter, deque


WINDOW_S = 60
# the latency histogram's bucket edges, seconds (Prometheus: isopool_request_latency_seconds)
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
GROWTH = 1.02  # each bin's upper edge is 2% above the one below it
FLOOR_S = 1e-6  # latencies at or below this share bin 0
_LOG_GROWTH = math.log(GROWTH)


def latency_bin(latency: float) -> int:
    """Bin b >= 1 holds latencies in (FLOOR_S * GROWTH**(b-1), FLOOR_S * GROWTH**b]."""
    if latency <= FLOOR_S:
        return 0
    return math.ceil(math.log(latency / FLOOR_S) / _LOG_GROWTH)


def bin_value(b: int) -> float:
    """The latency a bin stands for: its geometric middle (within 1% of any latency in it)."""
    return FLOOR_S if b == 0 else FLOOR_S * GROWTH ** (b - 0.5)


class Stats:
    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.seconds: deque[tuple[int, Counter[int]]] = deque()  # (whole second, latency bin -> count)
        self.buckets = [0] * (len(BUCKETS) + 1)  # latency histogram, for metrics
        self.latency_sum = 0.0

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] += 1

    def done(self, outcome: str, latency: float, now: float) -> None:
        self.outcomes[outcome] += 1
        second = int(now)
        seconds = self.seconds
        if not seconds or seconds[-1][0] != second:
            seconds.append((second, Counter()))
            while seconds[0][0] < second - WINDOW_S:
                seconds.popleft()
        seconds[-1][1][latency_bin(latency)] += 1
        self.buckets[bisect_left(BUCKETS, latency)] += 1
        self.latency_sum += latency

    @property
    def total(self) -> int:
        return sum(self.outcomes.values())

    def window(self, now: float, uptime: float) -> dict:
        """Requests answered in the last minute (whole seconds), their rate and p50/p99."""
        start = int(now) - WINDOW_S
        merged: Counter[int] = Counter()
        for second, bins in self.seconds:
            if second >= start:
                merged.update(bins)
        n = sum(merged.values())
        span = max(1e-9, min(now - start, uptime))
        return {
            "throughput_rps": round(n / span, 2),
            "latency_p50_ms": round(_percentile(merged, n, 0.50) * 1000, 3) if n else None,
            "latency_p99_ms": round(_percentile(merged, n, 0.99) * 1000, 3) if n else None,
        }


def merged_window(stats: list[Stats], now: float, uptime: float) -> dict:
    """Stats.window() over several models' requests together (their histograms merged)."""
    both = Stats()
    for st in stats:
        both.seconds.extend(st.seconds)
    return both.window(now, uptime)


def _percentile(bins: Counter[int], n: int, q: float) -> float:
    """The latency of the request ranked q*n (0-based) in the merged histogram."""
    rank = min(n - 1, int(q * n))
    seen = 0
    for b in sorted(bins):
        seen += bins[b]
        if seen > rank:
            break
    return bin_value(b)
