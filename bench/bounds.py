"""What hostile loads cost the supervisor: the figures behind SECURITY.md's bounds table.

    python -m isopool.bench.bounds frames       [--frames 1500]     one message of many 1 MiB frames
    python -m isopool.bench.bounds connections  [--idle 1100]       idle clients at 1,024 descriptors

`frames` samples the supervisor's RSS every 5 ms while a raw client sends one message of
`--frames` frames of 1 MiB each, and prints the refusal. `connections` starts the pool
with RLIMIT_NOFILE 1,024 (soft and hard), connects `--idle` idle DEALERs from a process of
their own, makes a worker crash, and prints what stayed connected, what was shed and
whether the restart and the clients were served.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import zmq

from isopool import Client
from isopool.protocol import decode_error, ops, pack_header, unpack_header


def start(args: list[str], fd_limit: int | None = None) -> tuple[subprocess.Popen, str, Client]:
    tmp = tempfile.mkdtemp(prefix="iso-bench-")
    endpoint = f"ipc://{tmp}/pool.sock"
    limit = None if fd_limit is None else (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit)))
    proc = subprocess.Popen([sys.executable, "-m", "isopool.cli", "serve", "--endpoint", endpoint, *args],
                            preexec_fn=limit, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = Client(endpoint, timeout=120)
    client.infer({"do": "ok"})  # ready
    return proc, endpoint, client


def frames(n: int) -> dict:
    proc, endpoint, client = start(["--workers", "1", "--model", "isopool.examples.faulty:make_echo"])
    try:
        p = psutil.Process(proc.pid)
        base = p.memory_info().rss
        peak, done = [base], threading.Event()

        def sample() -> None:
            while not done.wait(0.005):
                peak[0] = max(peak[0], p.memory_info().rss)

        sampler = threading.Thread(target=sample)
        sampler.start()
        raw = zmq.Context.instance().socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(endpoint)
        t0 = time.monotonic()
        raw.send_multipart([pack_header(ops.INFER, 1), *[b"\0" * ((1 << 20) - 1)] * n])
        if not raw.poll(300_000):
            raise SystemExit("no answer in 300 s")
        reply = raw.recv_multipart()
        answered = time.monotonic() - t0
        done.set()
        sampler.join()
        raw.close()
        return {"frames": n, "reply": unpack_header(reply[0])["op"], "error": str(decode_error(reply[1:])),
                "answered_s": round(answered, 2), "rss_mib_before": base >> 20, "rss_mib_peak": peak[0] >> 20,
                "rss_mib_after": p.memory_info().rss >> 20, "served_after": client.infer({"n": 1}) == {"n": 1}}
    finally:
        client.close()
        proc.terminate()
        proc.wait(60)


def connections(idle: int, fd_limit: int = 1024) -> dict:
    proc, endpoint, client = start(["--workers", "2", "--model", "isopool.examples.faulty:Faulty"], fd_limit)
    crowd = subprocess.Popen([sys.executable, "-m", "isopool.bench.idle_peers", str(idle), endpoint],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        crowd.stdout.readline()
        peak = {}
        for _ in range(50):  # five seconds of the crowd, sampled
            time.sleep(0.1)
            peak = client.status()["pool"]
        fds = psutil.Process(proc.pid).num_fds()
        try:
            client.infer({"do": "exit"}, retry=False)
        except Exception as exc:  # noqa: BLE001 - the crash is the point
            crashed = type(exc).__name__
        for _ in range(100):
            status = client.status()["pool"]
            if status["restarts_total"] >= 1 and status["workers_ready"] == 2:
                break
            time.sleep(0.1)
        served = sum(client.infer({"do": "ok", "i": i})["echo"]["i"] == i for i in range(20))
    finally:
        crowd.stdin.close()
        crowd.wait(60)
    try:
        with Client(endpoint, timeout=30) as late:
            late_ok = late.infer({"do": "ok"})["echo"] == {"do": "ok"}
        return {"idle": idle, "fd_limit": fd_limit, "connections_open": peak["connections"],
                "connections_shed": peak["connections_shed"], "supervisor_fds": fds, "health": peak["health_reason"],
                "crash": crashed, "restarts": status["restarts_total"], "served_after_restart": served,
                "newcomer_served": late_ok, "supervisor_alive": proc.poll() is None}
    finally:
        client.close()
        proc.terminate()
        proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m isopool.bench.bounds", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("frames").add_argument("--frames", type=int, default=1500)
    sub.add_parser("connections").add_argument("--idle", type=int, default=1100)
    args = parser.parse_args()
    if not os.path.exists("/proc/self/fd"):
        raise SystemExit("needs Linux (/proc)")
    result = frames(args.frames) if args.what == "frames" else connections(args.idle)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
