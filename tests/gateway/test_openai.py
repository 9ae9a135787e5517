"""The openai SDK's embeddings.create against the MiniLM example over isopool's HTTP."""

from __future__ import annotations

import numpy as np
import openai

from isopool.examples.embeddings import Embedder
from tests.helpers import http_pool

SENTENCES = ["the supervisor restarts a crashed worker", "requests are data, never code", "a third, shorter one"]


class _Context:
    device, config, worker_id, generation, threads = "cpu", {}, 0, 1, 1


def test_openai_sdk_embeddings_equal_the_model_in_process(start_pool):
    pool = http_pool(start_pool, "--model", "mini=isopool.examples.embeddings:Embedder", "--model",
                     "isopool.examples.faulty:make_echo", "--workers", "1")
    client = openai.OpenAI(base_url=f"http://{pool.address}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["mini"]  # only models that say they embed
    want = Embedder(_Context()).batch([SENTENCES])[0]
    for fmt in ("float", "base64"):  # the SDK asks base64 unless told otherwise
        result = client.embeddings.create(model="mini", input=SENTENCES, **({"encoding_format": fmt}
                                                                             if fmt == "float" else {}))
        got = np.array([d.embedding for d in sorted(result.data, key=lambda d: d.index)], dtype=np.float32)
        cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        assert got.shape == (3, 384) and cosine.min() >= 0.9999
        assert result.usage.total_tokens > 0 and result.model == "mini"
    one = client.embeddings.create(model="mini", input="just one")
    assert len(one.data) == 1 and len(one.data[0].embedding) == 384
    try:
        client.embeddings.create(model="default", input="x")  # the echo model does not embed
        raise AssertionError("an embedding request to a model that does not embed was answered")
    except openai.BadRequestError as err:
        assert "not an embedding model" in str(err)
