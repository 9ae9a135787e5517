"""Several hosts: what spreading over 3 daemons costs against 1, and a daemon killed under load.

    sudo python -m isopool.bench.hosts [--requests 20000] [--in-flight 32]

Each host is a network namespace joined by a veth link (bench/netns.py; root needed) running
`isopool serve` on tcp:// with CURVE, 1 worker of an echo model; the client is in this
namespace. In the same run: one request at a time (p50/p99) and --in-flight at once
(requests/s) against host 1 alone through Client(e1), then against all three through
Client([e1, e2, e3]); then 3 hosts under load with host 1's daemon SIGKILLed a third of the
way: requests, failovers, lost and crossed (every answer must echo its own request).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
import time

import zmq.auth

from isopool import Client

from .netns import Network
from .pool import percentiles_us, serve

ECHO = "isopool.examples.faulty:Echo"
PORT = 5555


def measure(client, n: int, in_flight: int) -> dict:
    for i in range(200):
        client.infer({"n": i})
    latencies = []
    for i in range(min(n, 2000)):
        t = time.perf_counter()
        client.infer({"n": i})
        latencies.append(time.perf_counter() - t)
    p50, p99 = percentiles_us(latencies)
    slots = threading.Semaphore(in_flight)
    t = time.perf_counter()
    for i in range(n):
        slots.acquire()
        client.submit({"n": i}).add_done_callback(lambda f: slots.release())
    for _ in range(in_flight):
        slots.acquire()
    return {"p50_us": round(p50), "p99_us": round(p99), "rps": round(n / (time.perf_counter() - t))}


def kill_run(client, n: int, in_flight: int, victim) -> dict:
    lock, slots = threading.Lock(), threading.Semaphore(in_flight)
    answered: dict[int, int] = {}
    lost = crossed = 0

    def done(i: int, f) -> None:
        nonlocal lost, crossed
        with lock:
            if f.exception() is not None:
                lost += 1
            else:
                crossed += f.result()["echo"] != {"n": i}
                answered[i] = answered.get(i, 0) + 1
        slots.release()

    for i in range(n):
        slots.acquire()
        if i == n // 3:
            os.kill(victim.pid, signal.SIGKILL)
        client.submit({"n": i}).add_done_callback(lambda f, i=i: done(i, f))
    for _ in range(in_flight):
        slots.acquire()
    return {"requests": n, "answered": len(answered), "answered_twice": sum(v > 1 for v in answered.values()),
            "lost": lost, "crossed": crossed, "failovers": client.spread.facts()["failovers"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--in-flight", type=int, default=32)
    args = parser.parse_args()
    network = Network(3)
    why = network.make()
    if why is not None:
        raise SystemExit(f"{why}: run as root, with iproute2")
    keys = tempfile.mkdtemp(prefix="iso-bench-keys-")
    try:
        server_public, server_secret = zmq.auth.create_certificates(keys, "server")
        os.makedirs(f"{keys}/clients")
        client_public, client_secret = zmq.auth.create_certificates(f"{keys}/clients", "client")
        curve = {"curve_secret_key": client_secret, "curve_server_key": server_public}
        endpoints = [f"tcp://{network.address(i)}:{PORT}" for i in (1, 2, 3)]
        procs: list = []
        with contextlib.ExitStack() as stack:
            for i, e in enumerate(endpoints, 1):
                stack.enter_context(serve("--model", ECHO, "--workers", "1", "--curve-secret-key", server_secret,
                                          "--curve-clients", f"{keys}/clients", endpoint=e,
                                          prefix=network.prefix(i), started=procs))
            with Client(endpoints[0], timeout=60, **curve) as one:
                single = measure(one, args.requests, args.in_flight)
            with Client(endpoints, timeout=60, **curve) as three:
                spread = measure(three, args.requests, args.in_flight)
                killed = kill_run(three, args.requests, args.in_flight, procs[0])
        out = {"one_host": single, "three_hosts": spread, "kill": killed,
               "cost_p50": round(spread["p50_us"] / single["p50_us"], 2),
               "gain_rps": round(spread["rps"] / single["rps"], 2)}
        print(json.dumps(out, indent=1))
    finally:
        network.close()
        shutil.rmtree(keys, ignore_errors=True)


if __name__ == "__main__":
    main()
