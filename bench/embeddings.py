"""Embeddings/s of all-MiniLM-L6-v2: in-process against 2 pool workers, one sentence or 32 per call.

    python -m isopool.bench.embeddings

"batched_32" means each request (or in-process call) carries 32 sentences, encoded as one
batch; "single" means one sentence per request. In the pool, single-sentence requests are
run with dynamic batching off (--max-batch-size 1) and on (8: the Embedder's batch() gets
up to 8 concurrent requests at once).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import time

import torch

from isopool import Client
from isopool.examples.embeddings import load

from .pool import serve

WORDS = "the supervisor restarts crashed workers while tensors travel as zero copy frames between processes".split()


def corpus(n: int) -> list[str]:
    return [" ".join(WORDS[(i + k) % len(WORDS)] for k in range(8 + i % 8)) for i in range(n)]


def in_process(texts: list[str], batch: int) -> float:
    model = load()
    model.encode(texts[:64])
    t = time.perf_counter()
    for i in range(0, len(texts), batch):
        model.encode(texts[i:i + batch], batch_size=batch)
    return len(texts) / (time.perf_counter() - t)


def through_pool(endpoint: str, texts: list[str], batch: int, in_flight: int = 8) -> float:
    chunks = [texts[i:i + batch] if batch > 1 else texts[i] for i in range(0, len(texts), batch)]
    with Client(endpoint, timeout=300) as c, cf.ThreadPoolExecutor(in_flight) as ex:
        list(ex.map(c.infer, chunks[:16]))
        t = time.perf_counter()
        list(ex.map(c.infer, chunks))
        return len(texts) / (time.perf_counter() - t)


def main() -> None:
    texts = corpus(2048)
    rows = {"threads_in_process": torch.get_num_threads()}
    rows["in_process_single"] = round(in_process(texts[:512], 1))
    rows["in_process_batched_32"] = round(in_process(texts, 32))
    model = ("--workers", "2", "--model", "isopool.examples.embeddings:Embedder")
    with serve(*model, "--max-batch-size", "1") as endpoint:
        rows["pool_2_workers_single_no_dynamic_batching"] = round(through_pool(endpoint, texts[:1024], 1))
    with serve(*model, "--max-batch-size", "8") as endpoint:
        rows["pool_2_workers_single_dynamic_batching"] = round(through_pool(endpoint, texts[:1024], 1, in_flight=16))
        rows["pool_2_workers_batched_32"] = round(through_pool(endpoint, texts, 32, in_flight=4))
    print(json.dumps({"embeddings_per_s": rows}))


if __name__ == "__main__":
    main()
