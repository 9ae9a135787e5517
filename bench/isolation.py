"""What each --isolation mode costs: requests/s of the default model, 2 workers, 16 in flight.

    python -m isopool.bench.isolation

Tenants are drawn at random per request; with more tenants than workers, tenant mode must
recycle workers to keep tenants apart, and request mode forks a fresh worker per request.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import random
import time

import numpy as np

from isopool import Client

from .pool import serve


def rate(endpoint: str, tenants: int, n: int) -> float:
    rng = random.Random(0)
    x = np.zeros(16, dtype=np.float32)
    with Client(endpoint) as c, cf.ThreadPoolExecutor(16) as ex:
        t = time.perf_counter()
        futures = [ex.submit(c.infer, x, tenant=f"t{rng.randrange(tenants)}") for _ in range(n)]
        for f in futures:
            f.result(timeout=300)
        return n / (time.perf_counter() - t)


def main() -> None:
    runs = [("none", 1, 4000), ("tenant", 2, 4000), ("tenant", 3, 400), ("tenant", 10, 400), ("request", 1, 400)]
    for mode, tenants, n in runs:
        with serve("--workers", "2", "--isolation", mode) as endpoint:
            rate(endpoint, tenants, 200)  # warm up
            print(json.dumps({"isolation": mode, "tenants": tenants,
                              "requests_per_s": round(rate(endpoint, tenants, n))}))


if __name__ == "__main__":
    main()
