"""Start a pool for a benchmark and wait until it serves (sd_notify READY=1, never a sleep)."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import glob
import threading
import time
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from typing import Any, Callable, Iterator

import psutil


@contextlib.contextmanager
def serve(*args: str, timeout: float = 120.0, endpoint: str | None = None, prefix: list[str] | None = None,
          started: list | None = None) -> Iterator[str]:
    """Run `isopool serve ARGS` on a private ipc endpoint (or `endpoint`; under `prefix`, e.g.
    `ip netns exec NS`); yield the endpoint; stop it after. `started` gets the process."""
    tmp = tempfile.mkdtemp(prefix="iso-bench-")
    endpoint = endpoint or f"ipc://{tmp}/pool.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(f"{tmp}/notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": f"{tmp}/notify.sock"}
    proc = subprocess.Popen([*(prefix or []), sys.executable, "-m", "isopool.cli", "serve", "--endpoint", endpoint,
                             "--log-level", "error", *args], env=env, stdin=subprocess.DEVNULL)
    if started is not None:
        started.append(proc)
    try:
        while True:
            if not select.select([notify], [], [], timeout)[0]:
                raise RuntimeError(f"the pool did not become ready within {timeout}s")
            if b"READY=1" in notify.recv(4096):
                break
        yield endpoint
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        notify.close()
        shutil.rmtree(tmp, ignore_errors=True)


def percentiles_us(latencies: list[float]) -> tuple[float, float]:
    """(p50, p99) in microseconds of latencies in seconds (sorted in place)."""
    latencies.sort()
    n = len(latencies)
    return latencies[n // 2] * 1e6, latencies[min(n - 1, int(n * 0.99))] * 1e6


def sequential(call: Callable[[Any], Any], x: Any, n: int, warm: int = 200) -> tuple[float, float]:
    """(p50, p99) in microseconds of n calls of call(x), one at a time, after `warm` untimed ones."""
    for _ in range(min(warm, n)):
        call(x)
    latencies = []
    for _ in range(n):
        t = time.perf_counter()
        call(x)
        latencies.append(time.perf_counter() - t)
    return percentiles_us(latencies)


def in_flight_rate(submit: Callable[[Any], cf.Future], x: Any, n: int, in_flight: int = 64,
                   latencies: list[float] | None = None) -> float:
    """Requests/s of n calls of submit(x), keeping `in_flight` outstanding; raises the first error.
    With `latencies`, each call's seconds from submit to its answer are appended to it."""
    slots = threading.Semaphore(in_flight)
    errors: list[BaseException] = []

    def done(f: cf.Future) -> None:
        if f.exception() is not None:
            errors.append(f.exception())
        slots.release()

    def timed(started: float) -> Callable[[cf.Future], None]:
        def done_timed(f: cf.Future) -> None:
            latencies.append(time.perf_counter() - started)
            done(f)
        return done_timed

    t = time.perf_counter()
    for _ in range(n):
        slots.acquire()
        submit(x).add_done_callback(done if latencies is None else timed(time.perf_counter()))
    for _ in range(in_flight):
        slots.acquire()
    if errors:
        raise errors[0]
    return n / (time.perf_counter() - t)


def switches(procs: list[psutil.Process]) -> tuple[int, int]:
    """Context switches of every thread of these processes: (voluntary, involuntary). A
    voluntary one is a thread that went to sleep waiting for something, so it costs a wake-up
    later; an involuntary one is a thread preempted, often by a thread it had just woken."""
    voluntary = involuntary = 0
    for p in procs:
        for path in glob.glob(f"/proc/{p.pid}/task/*/status"):
            try:
                with open(path) as f:
                    for line in f:
                        if line.startswith("voluntary_ctxt_switches:"):
                            voluntary += int(line.split()[1])
                        elif line.startswith("nonvoluntary_ctxt_switches:"):
                            involuntary += int(line.split()[1])
            except OSError:  # a thread that ended meanwhile
                pass
    return voluntary, involuntary
