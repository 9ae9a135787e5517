"""The HTTP peers of the HTTP benchmark (bench/http.py): LitServe and Ray Serve serving the bench models.

    python -m isopool.bench.http_peers {litserve|ray} --kind {tiny|embeddings} --port P --workers N
                                       --max-batch-size B --max-batch-wait-ms W --pids DIR

Both serve POST /predict: {"input": [256 floats]} -> {"output": [256 floats]} for the tiny
model, {"input": "a sentence"} -> {"embedding": [384 floats]} for all-MiniLM-L6-v2 (batched
as isopool batches it: up to B requests, waiting at most W ms). Each worker (LitServe's
inference worker, Ray Serve's replica) has 1 torch thread, as isopool's have on 2 cores,
and writes its pid to DIR so the benchmark can SIGKILL one. Each peer runs as its docs
advise for throughput; nothing here is tuned against it.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from typing import Any

import numpy as np


def _worker_started(pids: str) -> Any:
    import torch

    torch.set_num_threads(1)
    with open(os.path.join(pids, str(os.getpid())), "w"):
        pass


def _model(kind: str) -> Any:
    from .models import build

    return build(kind)


def _embed(model: Any, texts: list[str]) -> list[list[float]]:
    return [v.reshape(-1).tolist() for v in model.batch(texts)]


try:  # LitServe starts its workers by spawn: the API class must be importable from here
    import litserve as ls
except ImportError:
    ls = None

if ls is not None:
    class LitModel(ls.LitAPI):
        def __init__(self, kind: str, pids: str, **batching: Any) -> None:
            super().__init__(**batching)
            self.kind, self.pids = kind, pids

        def setup(self, device: str) -> None:
            _worker_started(self.pids)
            self.model = _model(self.kind)

        def decode_request(self, request: dict) -> Any:
            if self.kind == "tiny":
                return np.asarray(request["input"], dtype=np.float32)
            return str(request["input"])

        def predict(self, x: Any) -> Any:
            if self.kind == "tiny":
                return self.model(x).tolist()
            return _embed(self.model, x if isinstance(x, list) else [x])  # a batch, or one

        def encode_response(self, output: Any) -> dict:
            if self.kind == "tiny":
                return {"output": output}
            return {"embedding": output[0] if output and isinstance(output[0], list) else output}


def litserve(args: argparse.Namespace) -> None:
    batching = {"max_batch_size": args.max_batch_size, "batch_timeout": args.max_batch_wait_ms / 1000} \
        if args.kind == "embeddings" and args.max_batch_size > 1 else {}
    server = ls.LitServer(LitModel(args.kind, args.pids, **batching), accelerator="cpu", devices=1, workers_per_device=args.workers,
                          timeout=60, restart_workers=True, fast_queue=True)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, log_level="warning",
               generate_client_file=False)


def ray_serve(args: argparse.Namespace) -> None:
    import ray
    from ray import serve
    from starlette.requests import Request

    @serve.deployment(num_replicas=args.workers, ray_actor_options={"num_cpus": 0},
                      max_ongoing_requests=64)
    class Model:
        def __init__(self) -> None:
            _worker_started(args.pids)
            self.model = _model(args.kind)

        @serve.batch(max_batch_size=max(1, args.max_batch_size), batch_wait_timeout_s=args.max_batch_wait_ms / 1000)
        async def embed(self, texts: list[str]) -> list[list[float]]:
            return _embed(self.model, texts)

        async def __call__(self, request: Request) -> dict:
            body = await request.json()
            if args.kind == "tiny":
                return {"output": self.model(np.asarray(body["input"], dtype=np.float32)).tolist()}
            return {"embedding": await self.embed(str(body["input"]))}

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="error")
    serve.start(http_options={"host": "127.0.0.1", "port": args.port}, logging_config={"log_level": "WARNING"})
    serve.run(Model.bind(), route_prefix="/predict", blocking=False)
    print("READY", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("peer", choices=["litserve", "ray"])
    parser.add_argument("--kind", choices=["tiny", "embeddings"], default="tiny")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-batch-wait-ms", type=float, default=2.0)
    parser.add_argument("--pids", required=True)
    args = parser.parse_args()
    (litserve if args.peer == "litserve" else ray_serve)(args)


if __name__ == "__main__":
    main()
