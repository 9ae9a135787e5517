"""A worker that floods its output: read in bounded chunks, lines capped, the excess over
--log-rate dropped and counted; the supervisor's memory stays bounded and others are served."""

from __future__ import annotations

import statistics
import threading
import time

import psutil

FAULTY = "isopool.examples.faulty:Faulty"
RATE = 64 * 1024


def _flooded(start_pool, lines: bool, mib: int) -> dict:
    pool = start_pool("--workers", "2", "--model", FAULTY, "--log-rate", str(RATE))
    sup = psutil.Process(pool.pid)
    rss_before = sup.memory_info().rss
    probe: list[float] = []
    done = threading.Event()

    def latency_probe() -> None:
        with pool.client() as c:
            while not done.is_set() and len(probe) < 20_000:
                t0 = time.perf_counter()
                assert c.infer({"do": "ok"})["echo"] == {"do": "ok"}
                probe.append(time.perf_counter() - t0)

    thread = threading.Thread(target=latency_probe)
    thread.start()
    t0 = time.monotonic()
    try:
        with pool.client() as c:
            assert c.infer({"do": "flood", "mib": mib, "lines": lines}, timeout=120)["echo"]["do"] == "flood"
    finally:
        done.set()
        thread.join(60)
    elapsed = time.monotonic() - t0
    status = pool.status()
    logged = sum(len(line) + 1 for line in pool.output().splitlines() if ("xxxxx" in line or "yyyyy" in line))
    return {"status": status, "logged": logged, "elapsed": elapsed, "probe": probe,
            "rss_growth": sup.memory_info().rss - rss_before}


def test_a_100_mib_flood_is_bounded_and_costs_the_others_nothing_but_a_little(start_pool):
    r = _flooded(start_pool, lines=True, mib=100)
    pool = r["status"]["pool"]
    assert pool["output_dropped_bytes"] >= 95 * (1 << 20)  # all but what the rate let through
    # the lines logged fit the rate (plus the bucket's second and the tags each line gets)
    assert r["logged"] <= 2 * RATE * (r["elapsed"] + 2)
    assert r["rss_growth"] < 64 << 20
    assert len(r["probe"]) > 0 and pool["healthy"]
    print({"probe_requests": len(r["probe"]), "probe_p50_ms": round(statistics.median(r["probe"]) * 1e3, 3),
           "probe_p99_ms": round(sorted(r["probe"])[int(0.99 * len(r["probe"]))] * 1e3, 3),
           "flood_s": round(r["elapsed"], 2), "dropped_mib": pool["output_dropped_bytes"] >> 20})


def test_output_without_newlines_is_cut_at_the_line_cap_not_held(start_pool):
    r = _flooded(start_pool, lines=False, mib=30)
    pool = r["status"]["pool"]
    assert pool["output_dropped_bytes"] >= 25 * (1 << 20)
    assert r["rss_growth"] < 64 << 20 and pool["healthy"]
