"""Requests/s and p50 latency of tiny requests at each level of concurrency, isopool beside
the executors: where each mechanism leads, and by how much.

    python -m isopool.bench.concurrency [--in-flight 1,2,4,8,16,64] [--only isopool --only ppe] [--rounds 2]
                                        [--requests 6000]

`isopool bench` measures the tiny model at 64 in flight and one at a time; between the two
the order can change. Every mechanism is started and warmed first, then each level is
measured in rounds (each mechanism once per round, interleaved, as in the suite),
--requests a level. Prints JSON: the median of the rounds for each mechanism and level.
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np

from .models import DIM
from .pool import in_flight_rate, percentiles_us
from .suite import mechanisms

LEVELS = (1, 2, 4, 8, 16, 64)
REQUESTS = 6000


def measure(submit, x: np.ndarray, in_flight: int, n: int = REQUESTS) -> tuple[float, float]:
    """(requests/s, p50 µs from submit to answer) with `in_flight` requests outstanding."""
    latencies: list[float] = []
    rate = in_flight_rate(submit, x, n, in_flight, latencies=latencies)
    return rate, percentiles_us(latencies)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--in-flight", default=",".join(map(str, LEVELS)), help="levels, comma-separated")
    ap.add_argument("--only", action="append", default=None, help="a mechanism (repeatable; default isopool, ppe)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=REQUESTS, help="requests measured per level and round")
    args = ap.parse_args()
    levels = [int(v) for v in args.in_flight.split(",")]
    x = np.random.default_rng(0).standard_normal(DIM).astype(np.float32)
    mechs = {}
    runs: dict[str, dict[int, list[tuple[float, float]]]] = {}
    try:
        for name, make in mechanisms(args.only or ["isopool", "ppe"], "tiny").items():
            mechs[name] = mech = make()
            mech.wait_for_workers("tiny")
            in_flight_rate(mech.submit, x, min(3000, args.requests), 64)  # warm: every worker has run the model
        for _ in range(args.rounds):
            for k in levels:
                for name, mech in mechs.items():
                    runs.setdefault(name, {}).setdefault(k, []).append(measure(mech.submit, x, k, args.requests))
    finally:
        for mech in mechs.values():
            mech.close()
    print(json.dumps({name: {str(k): {"requests_per_s": round(statistics.median(r for r, _ in got)),
                                      "p50_us": round(statistics.median(p for _, p in got))}
                             for k, got in by_level.items()} for name, by_level in runs.items()}))


if __name__ == "__main__":  # the executors start their workers by spawn, which imports this module again
    main()
