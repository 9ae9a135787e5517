"""OpenAI-compatible embeddings, for models that say they are embedding models (kind = "embedding").

    GET  /v1/models        {"object": "list", "data": [{"id": name, "object": "model", ...}]}
    POST /v1/embeddings    {"model", "input": str | [str], "encoding_format": "float" | "base64"}
                        -> {"object": "list", "data": [{"object": "embedding", "index", "embedding"}],
                            "model", "usage": {"prompt_tokens", "total_tokens"}}

So the `openai` SDK works with base_url=http://HOST:PORT/v1. The model is called with the
list of input strings and answers one row per string. Token counts are words (split on
white space): isopool does not know the model's tokenizer.
"""

from __future__ import annotations

import base64

import numpy as np
import orjson

from .hangup import until_hangup

EMBEDDING = "embedding"


async def models(app) -> dict:
    served = (await app.status()).get("models", {})
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "isopool"}
                                       for name, m in served.items() if m.get("kind") == EMBEDDING]}


async def embeddings(app, scope: dict, receive) -> dict:
    from .app import HTTPError

    body = await app.body(receive, dict(scope["headers"]))
    try:
        request = orjson.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HTTPError(400, f"the request body is not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise HTTPError(400, 'the request must be a JSON object with "model" and "input"')
    name, given = request.get("model"), request.get("input")
    if not isinstance(name, str):
        raise HTTPError(400, '"model" must name an embedding model (GET /v1/models lists them)')
    model = await app.model(name)
    scope["isopool.model"] = name  # for the metrics and the access log (app.MODEL_KEY)
    if model.get("kind") != EMBEDDING:
        raise HTTPError(400, f"model {name!r} is not an embedding model (its kind is {model.get('kind')!r}); "
                             "an embedding model says kind = \"embedding\"")
    texts = [given] if isinstance(given, str) else given
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise HTTPError(400, '"input" must be a string or a non-empty list of strings (token arrays are not taken)')
    fmt = request.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise HTTPError(400, f'"encoding_format" must be "float" or "base64", got {fmt!r}')
    vectors = np.asarray(await until_hangup(scope, app.connect().infer(texts, model=name)), dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != len(texts):
        raise HTTPError(500, f"model {name!r} answered shape {list(vectors.shape)} for {len(texts)} input(s); an "
                             "embedding model answers one row per input")
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if fmt == "base64" else v}
            for i, v in enumerate(vectors)]
    words = sum(len(t.split()) for t in texts)
    return {"object": "list", "data": data, "model": name, "usage": {"prompt_tokens": words, "total_tokens": words}}
