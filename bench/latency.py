"""Round-trip latency and throughput of a pool through the sync Client.

    python -m isopool.bench.latency [--workers 2] [--model MODULE:ATTR] [--repeats 3]

Sequential p50/p99 (one request in flight) and the thread wake-ups each such request costs
across all the processes (voluntary context switches: the latency floor of a chain of hops
on a small machine), then requests/s with 64 in flight, and the CPU
time (user + system, all threads) each process spent per request during the in-flight runs:
this client, the supervisor, and the workers together, and the context switches per request
there (voluntary: a thread went to sleep; involuntary: a thread was preempted). Each figure is the median of
--repeats runs; the machine is noisy. `under_load` gives requests/s and the p50/p99 of each
request's latency (submit to answer) with 4, 16 and 64 in flight, from one more run each.
Extra arguments go to `isopool serve` (--prefetch 4).
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np
import psutil

from isopool import Client

from .pool import in_flight_rate, percentiles_us, sequential, serve, switches


LOADS = (4, 16, 64)


def loaded(client: Client, x, in_flight: int, n: int) -> dict:
    """Requests/s and per-request latency percentiles with `in_flight` requests outstanding."""
    lat: list[float] = []
    rate = in_flight_rate(client.submit, x, n, in_flight, latencies=lat)
    p50, p99 = percentiles_us(lat)
    return {"requests_per_s": round(rate), "p50_us": round(p50), "p99_us": round(p99)}


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:  # a spare the template replaced: it had done no requests
            continue
        total += t.user + t.system
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--model", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--requests", type=int, default=10_000)
    args, serve_args = ap.parse_known_args()
    extra = ["--workers", str(args.workers), *(["--model", args.model] if args.model else []), *serve_args]
    x = np.random.default_rng(0).standard_normal(16 if args.model is None else 256).astype(np.float32)
    p50s, p99s, rates = [], [], []
    cpu: dict[str, float] = {"client": 0.0, "supervisor": 0.0, "workers": 0.0}
    with serve(*extra) as endpoint, Client(endpoint) as client:
        me = psutil.Process()
        supervisor = me.children()[0]
        groups = {"client": [me], "supervisor": [supervisor], "workers": supervisor.children(recursive=True)}
        everyone = [p for group in groups.values() for p in group]
        slept = 0
        loaded_switches = [0, 0]
        for _ in range(args.repeats):
            before = switches(everyone)[0]
            p50, p99 = sequential(client.infer, x, 2000)
            slept += switches(everyone)[0] - before
            p50s.append(p50)
            p99s.append(p99)
            before = {k: cpu_seconds(v) for k, v in groups.items()}
            switched = switches(everyone)
            rates.append(in_flight_rate(client.submit, x, args.requests))
            loaded_switches = [a + b - c for a, b, c in zip(loaded_switches, switches(everyone), switched)]
            for k, v in groups.items():
                cpu[k] += cpu_seconds(v) - before[k]
        under_load = {n: loaded(client, x, n, args.requests) for n in LOADS}
    done = args.repeats * args.requests
    print(json.dumps({"model": args.model or "default", "workers": args.workers,
                      "p50_us": round(statistics.median(p50s)), "p99_us": round(statistics.median(p99s)),
                      "wakeups_per_sequential_request": round(slept / (args.repeats * 2200), 1),
                      "requests_per_s": round(statistics.median(rates)),
                      "cpu_us_per_request": {k: round(v * 1e6 / done) for k, v in cpu.items()},
                      "switches_per_request": dict(zip(("voluntary", "involuntary"),
                                                       (round(n / done, 2) for n in loaded_switches))),
                      "under_load": under_load}))


if __name__ == "__main__":
    main()
