"""Time from SIGKILL of a worker to its replacement being READY, from the pool's own events.

    python -m isopool.bench.restart [--preload imports none model] [--kills 20]

Backoff is off (--backoff-base 0) so the figure is the raw restart: the victims are idle
workers killed right after they start, which the restart policy would otherwise (rightly)
treat as a slot that keeps dying without doing useful work.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import zmq

from isopool import Client


def measure(preload: str, kills: int, workers: int = 2, model: str | None = None) -> dict:
    tmp = tempfile.mkdtemp(prefix="iso-bench-")
    endpoint = f"ipc://{tmp}/pool.sock"
    args = [sys.executable, "-m", "isopool.cli", "serve", "--endpoint", endpoint, "--workers", str(workers),
            "--preload", preload, "--log-level", "error", "--backoff-base", "0"] + (["--model", model] if model else [])
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    samples = []
    try:
        with Client(endpoint, timeout=60) as c:
            _wait_ready(c, workers)
            sub.connect(endpoint + ".events")
            while c.status()["pool"]["event_subscribers"] == 0:
                time.sleep(0.01)
            for i in range(kills):
                victim = c.status()["workers"][i % workers]
                t0 = time.time()
                os.kill(victim["pid"], signal.SIGKILL)
                while True:
                    if not sub.poll(30_000):
                        raise RuntimeError("no ready event within 30s")
                    event = json.loads(sub.recv_multipart()[1])
                    if event["kind"] == "ready" and event["worker"] == victim["id"]:
                        samples.append(event["ts"] - t0)
                        break
    finally:
        sub.close(linger=0)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    samples.sort()
    return {"preload": preload, "kills": kills, "median_ms": round(statistics.median(samples) * 1000, 1),
            "p90_ms": round(samples[int(0.9 * (len(samples) - 1))] * 1000, 1),
            "max_ms": round(samples[-1] * 1000, 1)}


def _wait_ready(c: Client, workers: int) -> None:
    end = time.monotonic() + 60
    while time.monotonic() < end:
        try:
            if c.status(timeout=1)["pool"]["workers_ready"] >= workers:
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.05)
    raise RuntimeError("pool did not become ready")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preload", nargs="*", default=["imports", "none"])
    ap.add_argument("--kills", type=int, default=20)
    args = ap.parse_args()
    for preload in args.preload:
        print(json.dumps(measure(preload, args.kills if preload != "none" else min(args.kills, 5))))


if __name__ == "__main__":
    main()
