"""What every peer executor runs in its worker processes: the same models as isopool's workers."""

from __future__ import annotations

from typing import Any

_MODEL = None


def init(kind: str = "tiny") -> None:
    """Worker initializer: one thread per worker for torch and the tokenizer (the same share
    isopool's workers give a model), one model."""
    global _MODEL
    from isopool.worker.environment import share_threads

    share_threads(1)
    from .models import build

    _MODEL = build(kind)


def run(x: Any) -> Any:
    if _MODEL is None:
        init()
    return _MODEL(x)


def run_batches(x: Any, size: int, count: int) -> int:
    """`count` calls of the model's batch() on `size` copies of x, back to back: the model's
    own batched throughput in one process (the ceiling of a pool that forms such batches)."""
    if _MODEL is None:
        init()
    for _ in range(count):
        _MODEL.batch([x] * size)
    return size * count
