"""SIGKILL one worker under load: requests failed, and how long throughput stays below 80%.

    python -m isopool.bench.fault [--preload auto imports] [--model embeddings|tiny] [--seconds 4]

Each run starts a pool of 2 workers with the default settings (but --preload), drives it at
64 requests in flight (the real model: one sentence each, batched by the pool), measures
the clean rate for `seconds`, SIGKILLs one worker, and goes on for `seconds` more. It
reports: the clean rate; requests failed; the time from the kill to the replacement's
`ready` event; and the longest stretch after the kill during which the rate, over every
200 ms window in it, stays below 80% of the clean rate (0 when it never drops so far), beside
the same figure for the clean period before the kill (batching alone makes some dips).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import zmq

from isopool import AsyncClient, Client

MODELS = {"embeddings": "isopool.examples.embeddings:Embedder", "tiny": None}
WINDOW_S = 0.2
IN_FLIGHT = 64


async def drive(endpoint: str, payload, stop_at: float, done: list[float], failed: list[str]) -> None:
    async with AsyncClient(endpoint, timeout=60) as c:
        async def one_lane() -> None:
            while time.monotonic() < stop_at:
                try:
                    await c.infer(payload)
                    done.append(time.monotonic())
                except Exception as exc:  # noqa: BLE001 - counted, never raised: the figure is how many
                    failed.append(type(exc).__name__)
        await asyncio.gather(*(one_lane() for _ in range(IN_FLIGHT)))


def below(done: list[float], clean: float, start: float, end: float) -> float:
    """The longest stretch between `start` and `end` during which the rate over every
    WINDOW_S window (one starting every 10 ms) was below 80% of `clean`, in seconds."""
    longest = run_from = 0.0
    in_run = False
    t = start
    while t + WINDOW_S <= end:
        n = bisect.bisect_left(done, t + WINDOW_S) - bisect.bisect_left(done, t)
        if n / WINDOW_S < 0.8 * clean:
            run_from = t if not in_run else run_from
            in_run = True
            longest = max(longest, t + 0.01 - run_from)
        else:
            in_run = False
        t += 0.01
    return longest


def run(preload: str, model: str, seconds: float) -> dict:
    tmp = tempfile.mkdtemp(prefix="iso-fault-")
    endpoint = f"ipc://{tmp}/pool.sock"
    args = [sys.executable, "-m", "isopool.cli", "serve", "--endpoint", endpoint, "--workers", "2",
            "--preload", preload, "--log-level", "error"] + (["--model", MODELS[model]] if MODELS[model] else [])
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    payload = "a sentence about isolation" if model == "embeddings" else [1.0] * 16
    try:
        with Client(endpoint, timeout=120) as c:
            end = time.monotonic() + 120
            while c.status()["pool"]["workers_ready"] < 2:
                if time.monotonic() > end:
                    raise RuntimeError("the pool did not become ready")
                time.sleep(0.05)
            sub.connect(endpoint + ".events")
            while c.status()["pool"]["event_subscribers"] == 0:
                time.sleep(0.01)
            victim = c.status()["workers"][0]
            template = c.status()["pool"].get("template_preload")
        done: list[float] = []
        failed: list[str] = []
        t0 = time.monotonic()
        warm, kill_at, stop_at = t0 + 1.0, t0 + 1.0 + seconds, t0 + 1.0 + 2 * seconds
        killed = {}

        def kill() -> None:
            killed["at"] = time.monotonic()
            killed["wall"] = time.time()
            os.kill(victim["pid"], signal.SIGKILL)

        async def main() -> None:
            asyncio.get_running_loop().call_at(kill_at - time.monotonic() + asyncio.get_running_loop().time(), kill)
            await drive(endpoint, payload, stop_at, done, failed)
        asyncio.run(main())
        done.sort()
        clean = (bisect.bisect_left(done, kill_at) - bisect.bisect_left(done, warm)) / (kill_at - warm)
        ready_ms = None
        while sub.poll(1000):
            event = json.loads(sub.recv_multipart()[1])
            if event["kind"] == "ready" and event["worker"] == victim["id"]:
                ready_ms = round((event["ts"] - killed["wall"]) * 1000, 1)
                break
        return {"preload": preload, "template_preload": template, "model": model, "clean_per_s": round(clean, 1),
                "requests": len(done), "failed": len(failed), "replacement_ready_ms": ready_ms,
                "below_80pct_ms": round(below(done, clean, killed["at"] - WINDOW_S, stop_at) * 1000, 1),
                "below_80pct_clean_ms": round(below(done, clean, warm, kill_at - WINDOW_S) * 1000, 1)}
    finally:
        sub.close(linger=0)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preload", nargs="*", default=["auto", "imports"])
    ap.add_argument("--model", choices=sorted(MODELS), default="embeddings")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    for _ in range(args.repeats):
        for preload in args.preload:
            print(json.dumps(run(preload, args.model, args.seconds)), flush=True)


if __name__ == "__main__":
    main()
