"""Does the supervisor stay the same size under sustained load, and `status` stay cheap?

    python -m isopool.bench.soak [--rounds 4] [--requests 60000] [--model MODULE:ATTR]

Sends --rounds bursts of --requests tiny requests (64 in flight) and after each prints the
supervisor's USS and how long a `status` call took. Anything kept per request (a timer, a
latency) shows as USS growing round after round; a status that walks per-request data
shows as its time growing with the load. Extra arguments go to `isopool serve`.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import psutil

from isopool import Client

from .pool import in_flight_rate, serve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--requests", type=int, default=60_000)
    ap.add_argument("--model", default="isopool.bench.models:BenchModel")
    args, serve_args = ap.parse_known_args()
    x = np.zeros(256 if args.model.startswith("isopool.bench") else 16, dtype=np.float32)
    with serve("--workers", "2", "--model", args.model, *serve_args) as endpoint, Client(endpoint) as client:
        supervisor = psutil.Process().children()[0]
        in_flight_rate(client.submit, x, 2000)  # warm up
        rows = []
        for r in range(args.rounds + 1):
            if r:
                in_flight_rate(client.submit, x, args.requests)
            t = time.perf_counter()
            client.status()
            rows.append({"requests": r * args.requests,
                         "supervisor_uss_mib": round(supervisor.memory_full_info().uss / 2**20, 1),
                         "status_ms": round((time.perf_counter() - t) * 1000, 1)})
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
