"""Round-trip latency and throughput of a pool through the sync Client.

    python -m isopool.bench.latency [--workers 2] [--model MODULE:ATTR] [--repeats 3]

Sequential p50/p99 (one request in flight), then requests/s with 64 in flight.
Each figure is the median of --repeats runs; the machine is noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from isopool import Client

from .pool import in_flight_rate, serve


def sequential(client: Client, x, n: int) -> tuple[float, float]:
    for _ in range(min(200, n)):
        client.infer(x)
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        client.infer(x)
        lat.append(time.perf_counter() - t)
    lat.sort()
    return lat[len(lat) // 2] * 1e6, lat[int(len(lat) * 0.99)] * 1e6


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
    with serve(*extra) as endpoint, Client(endpoint) as client:
        for _ in range(args.repeats):
            p50, p99 = sequential(client, x, 2000)
            p50s.append(p50)
            p99s.append(p99)
            rates.append(in_flight_rate(client.submit, x, args.requests))
    print(json.dumps({"model": args.model or "default", "workers": args.workers,
                      "p50_us": round(statistics.median(p50s)), "p99_us": round(statistics.median(p99s)),
                      "requests_per_s": round(statistics.median(rates))}))


if __name__ == "__main__":
    main()
