"""What --sandbox costs: the same pool with and without it, in the same run (root needed).

    sudo isopool bench --sandbox [--quick]   (or python -m isopool.bench.sandbox [--requests 20000] [--kills 10])

Two workers of the tiny model (bench/models.py) each time: requests/s at 64 in flight, one
request at a time (p50/p99), and the median time from SIGKILL of an idle worker to its
replacement's `ready` (the replacement forks from the template, then enters its sandbox
and, sandboxed, imports and builds the model: the template never imports it).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from isopool import Client

from .models import DIM
from .pool import in_flight_rate, sequential, serve
from .several import restart_s

TINY = "isopool.bench.models:BenchModel"


def measure(sandboxed: bool, n: int, kills: int) -> dict:
    x = np.random.default_rng(0).standard_normal(DIM).astype(np.float32)
    # no restart backoff: the kills measure a restart, not the policy that spaces repeated crashes
    args = ["--model", TINY, "--workers", "2", "--backoff-base", "0", *(["--sandbox"] if sandboxed else [])]
    with serve(*args) as endpoint:
        with Client(endpoint, timeout=60) as c:
            p50, p99 = sequential(c.infer, x, min(n, 3000))
            rps = in_flight_rate(c.submit, x, n, 64)
        return {"req_per_s": round(rps), "p50_us": round(p50), "p99_us": round(p99),
                "restart_ms": restart_s(endpoint, "default", kills)}


def report(requests: int, kills: int, rounds: int) -> int:
    """Each round measures the pool plain, then sandboxed; prints the rounds as JSON."""
    out = [{name: measure(name == "sandbox", requests, kills) for name in ("plain", "sandbox")}
           for _ in range(rounds)]
    print(json.dumps(out, indent=1))
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    report(args.requests, args.kills, args.rounds)


if __name__ == "__main__":
    main()
