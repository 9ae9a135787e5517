"""Where a loaded pool's idle CPU time goes: a trace of the kernel's scheduler.

    python -m isopool.bench.sched [--mechanism isopool|ppe|http] [--seconds 1.2] [--rounds 1] [--keep FILE]

Runs the tiny workload (64 in flight) through one mechanism, or with `http` MiniLM over
HTTP (bench/http.py's pool, wrk at 64 connections on /v1/embeddings), and records the scheduler's
sched_switch, sched_wakeup and sched_migrate_task events for --seconds (tracefs: needs root,
and mounts /sys/kernel/tracing if it is not). Then it reports each CPU's idle share, how
long its idle periods last, and for how much of that idle time other tasks stood runnable
on another CPU, waiting, and which. On a 2-vCPU guest (docs/performance.md, "Where the idle
time goes") most of it is such waiting: Linux does not move a task that ran within the last
half millisecond (sched_migration_cost) to an idle CPU, and every thread of a pool under
tiny load runs more often than that. --keep writes the raw trace and the threads' roles.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import re
import statistics
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import psutil

TRACING = Path("/sys/kernel/tracing")
EVENTS = ("sched_switch", "sched_wakeup", "sched_migrate_task")
LINE = re.compile(r"\[(\d+)\]\s+\S+\s+(\d+\.\d+): (sched_\w+): (.*)")
FIELD = re.compile(r"(\w+)=(\S+)")


def tracefs() -> Path:
    if not (TRACING / "trace").exists():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACING)], check=False, capture_output=True, timeout=30)
    if not (TRACING / "trace").exists():
        raise SystemExit(f"no tracefs at {TRACING}: run as root on a kernel with tracing (mount -t tracefs ...)")
    return TRACING


def put(name: str, value: str) -> None:
    (TRACING / name).write_text(value)


def record(load, seconds: float) -> tuple[str, float]:
    """The raw trace of `seconds` in the middle of load(at_least_s) (which returns its req/s)."""
    put("tracing_on", "0")
    put("trace", "")
    put("buffer_size_kb", "65536")
    for event in EVENTS:
        put(f"events/sched/{event}/enable", "1")
    done = threading.Event()

    def window() -> None:
        done.wait(0.3)  # past the start of the stretch
        put("tracing_on", "1")
        done.wait(seconds)
        put("tracing_on", "0")

    marker = threading.Thread(target=window)
    try:
        marker.start()
        rate = load(seconds + 0.6)
        marker.join(timeout=seconds + 5)
    finally:
        done.set()
        put("tracing_on", "0")
        for event in EVENTS:
            put(f"events/sched/{event}/enable", "0")
    return (TRACING / "trace").read_text(), rate


def roles() -> dict[str, str]:
    """tid -> "client:THREAD", "supervisor:THREAD", "worker PID:THREAD" for this tree."""
    me = psutil.Process()
    out = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            line = " ".join(proc.cmdline())
            role = ("client" if proc.pid == me.pid else "supervisor" if "isopool.cli" in line
                    else "gateway" if "isopool.gateway" in line else "wrk" if proc.name() == "wrk"
                    else "resource tracker" if "resource_tracker" in line
                    else f"worker {proc.pid}" if "worker" in line or "spawn_main" in line
                    else f"{proc.name()} {proc.pid}")
            for tid in os.listdir(f"/proc/{proc.pid}/task"):
                out[tid] = f"{role}:{Path(f'/proc/{proc.pid}/task/{tid}/comm').read_text().strip()}"
        except (psutil.Error, OSError):
            continue
    return out


def analyse(trace: str, names: dict[str, str], cpus: int) -> dict:
    """Idle time per CPU, idle periods, and which of the benchmark's threads (`names`: tid ->
    role) stood runnable on another CPU while a CPU idled."""
    queued: dict[int, set[str]] = {c: set() for c in range(cpus)}  # runnable (running or waiting) per CPU
    running: dict[int, str] = {}
    idle_since: dict[int, float] = {}
    idle = collections.Counter()
    periods: list[float] = []
    waiting_by = collections.Counter()  # how many waited elsewhere -> seconds
    who = collections.Counter()  # role -> seconds spent waiting while some CPU idled
    first = last = None
    for line in trace.splitlines():
        m = LINE.search(line)
        if not m:
            continue
        cpu, ts, event = int(m.group(1)), float(m.group(2)), m.group(3)
        f = dict(FIELD.findall(m.group(4).replace(" ==> ", " ")))
        if last is not None:
            dt = ts - last
            for c in range(cpus):
                if running.get(c) == "0":  # idle, as far as the trace has shown it
                    idle[c] += dt
                    waiters = [p for o in range(cpus) if o != c
                               for p in queued[o] if p != running.get(o) and p in names]
                    waiting_by[len(waiters)] += dt
                    for p in waiters:
                        who[names[p]] += dt
        first, last = first or ts, ts
        if event == "sched_switch":
            prev, nxt = f["prev_pid"], f["next_pid"]
            if prev != "0":  # preempted (R): still runnable here; else asleep
                (queued[cpu].add if f["prev_state"].startswith("R") else queued[cpu].discard)(prev)
            if nxt == "0":
                idle_since[cpu] = ts
            else:
                for c in queued:
                    queued[c].discard(nxt)
                queued[cpu].add(nxt)
                if prev == "0" and cpu in idle_since:
                    periods.append(ts - idle_since.pop(cpu))
            running[cpu] = nxt
        elif event == "sched_wakeup":
            for c in queued:
                queued[c].discard(f["pid"])
            queued.setdefault(int(f["target_cpu"]), set()).add(f["pid"])
        elif event == "sched_migrate_task":
            src, dst = int(f["orig_cpu"]), int(f["dest_cpu"])
            if f["pid"] in queued.get(src, ()):
                queued[src].discard(f["pid"])
                queued.setdefault(dst, set()).add(f["pid"])
    span = (last - first) if first is not None else 0.0
    total_idle = sum(idle.values()) or 1e-12
    return {"seconds": span, "idle_share": {c: idle[c] / span for c in sorted(idle)} if span else {},
            "idle_period_us": {q: round(1e6 * statistics.quantiles(periods, n=100)[int(q * 100) - 1])
                               for q in (0.5, 0.9, 0.99)} if len(periods) > 2 else {},
            "idle_with_others_waiting": sum(v for k, v in waiting_by.items() if k) / total_idle,
            "waiting": {k: round(v / total_idle, 3) for k, v in sorted(waiting_by.items())},
            "who_waits_ms": {k: round(v * 1e3, 1) for k, v in who.most_common(8)}}


@contextlib.contextmanager
def tiny(name: str):
    """A started mechanism on the tiny model; yields load(at_least_s) -> req/s through it."""
    from .suite import DIM, mechanisms

    x = np.random.default_rng(1).standard_normal(DIM).astype(np.float32)
    mechanism = mechanisms([name], "tiny")[name]()

    def load(at_least_s: float) -> float:
        began, served = time.perf_counter(), 0
        while time.perf_counter() - began < at_least_s:  # bounded: each stretch is 2,000 requests
            served += 2000
            mechanism.throughput(x, 2000)
        return served / (time.perf_counter() - began)

    try:
        mechanism.throughput(x, 3000)  # warm
        yield load
    finally:
        mechanism.close()


@contextlib.contextmanager
def embeddings_over_http():
    """MiniLM over HTTP as `isopool bench --http` serves it; yields load(at_least_s) -> req/s by wrk."""
    from .http import SENTENCE, isopool, wrk

    with isopool("embeddings") as served:
        url, body = served["base"] + "/v1/embeddings", json.dumps({"model": "default", "input": SENTENCE}).encode()
        wrk(url, body, "application/json", 3)  # warm
        yield lambda at_least_s: wrk(url, body, "application/json", math.ceil(at_least_s) + 1)["rps"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mechanism", choices=["isopool", "ppe", "http"], default="isopool",
                        help="the tiny workload through isopool or ProcessPoolExecutor, or MiniLM over HTTP")
    parser.add_argument("--seconds", type=float, default=1.2, help="how long each traced window is")
    parser.add_argument("--rounds", type=int, default=1, help="traced windows, each reported on its own")
    parser.add_argument("--keep", type=Path, help="write the raw trace here (and the roles beside it)")
    args = parser.parse_args()
    tracefs()
    with (embeddings_over_http() if args.mechanism == "http" else tiny(args.mechanism)) as load:
        for i in range(args.rounds):
            trace, rate = record(load, args.seconds)
            names = roles()
            if args.keep:
                args.keep.write_text(trace)
                args.keep.with_suffix(".roles.json").write_text(json.dumps(names))
            report = analyse(trace, names, os.cpu_count() or 1)
            print(json.dumps({"mechanism": args.mechanism, "round": i + 1, "req_per_s": round(rate), **report}))


if __name__ == "__main__":
    main()
