"""The floor under isopool's latency: the leanest ZeroMQ paths with the same model, no isopool.

    python -m isopool.bench.floor [--calls 3000] [--rounds 3]

Sequential p50 (one request in flight), in rounds, each path once per round:

    zmq_direct   a DEALER in this process straight to one worker process over ipc://: the
                 raw array out, the model's output back; no broker, no protocol, no checks
    zmq_broker   the same through a third process that forwards frames between a frontend
                 ROUTER and a backend ROUTER: isopool's shape with none of its work
    isopool      this process's Client against `isopool serve` (2 workers)
    ppe, mp_pool ProcessPoolExecutor and multiprocessing.Pool with 2 workers, set up as in
                 the suite (bench/peers.py: one torch thread and one model per worker)

The difference between zmq_broker and isopool is what isopool's own code costs per round
trip (protocol, checks, bookkeeping, in the client, the supervisor and the worker); the
difference between zmq_broker and zmq_direct is what two more hops and a process cost.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile

import numpy as np
import zmq

from isopool import Client

from . import peers
from .models import DIM
from .pool import sequential, serve

STOP = b"\x00"  # one byte: no array is that short


def _worker(endpoint: str) -> None:
    """Answer each [route?, array bytes] with the model's output, until STOP."""
    peers.init()  # one torch thread and the model, as every executor's worker has
    ctx = zmq.Context(1)
    sock = ctx.socket(zmq.DEALER)
    sock.connect(endpoint)
    sock.send(b"ready")
    while True:
        *route, body = sock.recv_multipart(copy=False)
        if len(body) == 1:
            os._exit(0)
        y = peers.run(np.frombuffer(body, np.float32))
        sock.send_multipart([*route, y.tobytes()], copy=False)


def _broker(frontend: str, backend: str) -> None:
    """Forward frames between a frontend ROUTER and one worker on a backend ROUTER, until STOP."""
    ctx = zmq.Context(1)
    front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    front.bind(frontend)
    back.bind(backend)
    worker, _ = back.recv_multipart()
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    while True:
        ready = dict(poller.poll(10_000))
        if not ready:
            os._exit(1)  # the measuring process is gone
        if front in ready:
            frames = front.recv_multipart(copy=False)
            back.send_multipart([worker, *frames], copy=False)
            if len(frames[-1]) == 1:
                os._exit(0)
        if back in ready:
            frames = back.recv_multipart(copy=False)
            front.send_multipart(frames[1:], copy=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="iso-floor-")
    fork = mp.get_context("fork")
    direct_ep, front_ep, back_ep = (f"ipc://{tmp}/{name}.sock" for name in ("direct", "front", "back"))
    children = [fork.Process(target=_worker, args=(direct_ep,)), fork.Process(target=_broker, args=(front_ep, back_ep)),
                fork.Process(target=_worker, args=(back_ep,))]
    for child in children:  # forked before this process has a ZeroMQ context (and its thread)
        child.start()
    ctx = zmq.Context(1)
    direct = ctx.socket(zmq.ROUTER)
    direct.bind(direct_ep)  # the worker's connect retries until this exists
    via = ctx.socket(zmq.DEALER)
    via.connect(front_ep)
    for sock in (direct, via):
        sock.setsockopt(zmq.RCVTIMEO, 10_000)  # a dead child fails the run instead of hanging it
    peer, _ = direct.recv_multipart()

    def zmq_direct(x: np.ndarray) -> bytes:
        direct.send_multipart([peer, x.tobytes()], copy=False)
        return direct.recv_multipart()[1]

    def zmq_broker(x: np.ndarray) -> bytes:
        via.send(x.tobytes(), copy=False)
        return via.recv()

    results: dict[str, list[float]] = {}
    try:
        with serve("--workers", "2", "--model", "isopool.bench.models:BenchModel") as endpoint, \
                Client(endpoint) as client, \
                cf.ProcessPoolExecutor(2, mp_context=fork, initializer=peers.init) as ppe, \
                fork.Pool(2, initializer=peers.init) as pool:
            paths = {"zmq_direct": zmq_direct, "zmq_broker": zmq_broker, "isopool": client.infer,
                     "ppe": lambda x: ppe.submit(peers.run, x).result(timeout=30),
                     "mp_pool": lambda x: pool.apply_async(peers.run, (x,)).get(timeout=30)}
            x = np.random.default_rng(0).standard_normal(DIM).astype(np.float32)
            for _ in range(args.rounds):
                for name, call in paths.items():
                    results.setdefault(name, []).append(sequential(call, x, args.calls, warm=300)[0])
    finally:
        direct.send_multipart([peer, STOP])
        via.send(STOP)
        for child in children:
            child.join(10)
            if child.is_alive():
                child.kill()
        ctx.destroy(linger=0)
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({"p50_us": {name: round(statistics.median(v)) for name, v in results.items()},
                      "rounds": {name: [round(p) for p in v] for name, v in results.items()}}))


if __name__ == "__main__":
    main()
