"""Several models in one daemon: what sharing a daemon costs, and how fast models come and go.

    python -m isopool.bench.several [--requests 20000] [--in-flight 32]

1. Throughput: two models of 1 worker each, each given its own stream of tiny requests
   (BenchModel) at the same time, against one model of 2 workers given both streams; the
   same process tree, one run after the other. Each figure is requests/s.
2. Load: time from `load` (a new model, 1 worker, while serving) to its first answer.
3. Restart: per model, time from SIGKILL of an idle worker to its replacement's `ready`
   event (from the model's template: a fork, not an interpreter start), median of --kills.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import threading
import time

import numpy as np
import zmq

from isopool import Client

from .models import DIM
from .pool import in_flight_rate, serve

TINY = "isopool.bench.models:BenchModel"


def rates(endpoint: str, models: list[str | None], n: int, in_flight: int) -> dict[str, float]:
    """Requests/s of each stream, all streams at once (one client each)."""
    x = np.random.default_rng(0).standard_normal(DIM).astype(np.float32)
    out: dict[str, float] = {}

    def stream(i: int, model: str | None) -> None:
        with Client(endpoint, timeout=120) as c:
            c.infer(x, model=model)  # warm
            out[f"stream {i} ({model or 'shared'})"] = in_flight_rate(lambda v: c.submit(v, model=model), x, n,
                                                                      in_flight)

    threads = [threading.Thread(target=stream, args=(i, m)) for i, m in enumerate(models)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {k: round(v) for k, v in sorted(out.items())}


def restart_s(endpoint: str, model: str, kills: int) -> float:
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint + ".events")
    times = []
    with Client(endpoint, timeout=60) as c:
        for _ in range(200):  # the subscription reaches the supervisor
            if c.status()["pool"]["event_subscribers"]:
                break
        for _ in range(kills):
            w = next(w for w in c.status()["workers"] if w["model"] == model and w["state"] == "idle")
            t0 = time.monotonic()
            os.kill(w["pid"], signal.SIGKILL)
            while True:
                if not sub.poll(30_000):
                    raise RuntimeError("no ready event within 30 s")
                event = json.loads(sub.recv_multipart()[1])
                if event["kind"] == "ready" and event.get("model") == model and event["worker"] == w["id"]:
                    times.append(time.monotonic() - t0)
                    break
    sub.close()
    return round(statistics.median(times) * 1000, 1)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m isopool.bench.several", description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=20000, help="requests per stream")
    ap.add_argument("--in-flight", type=int, default=32, help="outstanding requests per stream")
    ap.add_argument("--kills", type=int, default=10, help="restarts measured per model")
    args = ap.parse_args()
    result: dict = {}
    common = ["--backoff-base", "0", "--max-restarts", "1000"]
    with serve("--model", f"a={TINY}", "--model", f"b={TINY}", "--workers", "1", *common) as endpoint:
        result["two models of 1 worker"] = rates(endpoint, ["a", "b"], args.requests, args.in_flight)
        with Client(endpoint, timeout=120) as c:
            t0 = time.monotonic()
            c.load("c", TINY, workers=1)
            c.infer(np.zeros(DIM, np.float32), model="c")
            result["load to first answer ms"] = round((time.monotonic() - t0) * 1000, 1)
        result["restart ms (median)"] = {m: restart_s(endpoint, m, args.kills) for m in ("a", "b", "c")}
    with serve("--model", TINY, "--workers", "2", *common) as endpoint:
        result["one model of 2 workers"] = rates(endpoint, [None, None], args.requests, args.in_flight)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
