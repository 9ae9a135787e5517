"""The status window: the last minute's rate and percentiles, in memory that does not grow with traffic."""

from __future__ import annotations

import pytest

from isopool.supervisor.stats import WINDOW_S, Stats, bin_value, latency_bin


@pytest.mark.parametrize("latency", [1e-7, 1e-6, 3.3e-5, 0.000789, 0.5, 1.0, 29.9, 3600.0])
def test_a_latency_is_reported_within_one_percent(latency):
    b = latency_bin(latency)
    assert abs(bin_value(b) - latency) <= 0.0101 * latency or (b == 0 and latency <= 1e-6)


def test_percentiles_and_rate_of_the_last_minute():
    stats = Stats()
    t0 = 1000.0
    for i in range(1000):  # 1..1000 ms, spread over 10 s
        stats.done("ok", (i + 1) / 1000, t0 + i / 100)
    w = stats.window(t0 + 10, uptime=10.0)
    assert w["latency_p50_ms"] == pytest.approx(501, rel=0.011)  # rank 500 of 1000 (0-based)
    assert w["latency_p99_ms"] == pytest.approx(991, rel=0.011)
    assert w["throughput_rps"] == pytest.approx(100, rel=0.01)
    assert stats.outcomes["ok"] == 1000


def test_old_seconds_leave_the_window_and_memory_stays_bounded():
    stats = Stats()
    for s in range(600):  # ten minutes, 50 requests a second, 1 ms each, then one slow minute
        for k in range(50):
            stats.done("ok", 0.001 if s < 540 else 0.1, 5000.0 + s + k / 50)
    assert len(stats.seconds) <= WINDOW_S + 1
    w = stats.window(5600.0, uptime=600.0)
    assert w["latency_p50_ms"] == pytest.approx(100, rel=0.011)  # only the last minute counts
    assert w["throughput_rps"] == pytest.approx(50, rel=0.02)
    assert stats.window(5800.0, uptime=800.0) == {"throughput_rps": 0.0, "latency_p50_ms": None,
                                                 "latency_p99_ms": None}
