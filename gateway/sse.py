"""POST /v2/models/{name}/generate_stream: a streaming model's parts as server-sent events.

    body (JSON) ──► the model's input ──► stream() ──► data: <part as JSON>\\n\\n  (one event per part)
                                              └──► event: error  (the typed error, parts delivered)

The first part is awaited before the response starts, so an unknown model or a bad input
is still an HTTP error (404, 400). When the HTTP client goes away, the stream is closed,
which cancels it in the worker (its generator stops at its next part).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import orjson

from isopool.errors import IsopoolError
from isopool.protocol.codec import json_default

END = object()


def event(data: Any, kind: str | None = None) -> bytes:
    line = json.dumps(data, separators=(",", ":"), default=json_default)
    return (f"event: {kind}\n" if kind else "").encode() + b"data: " + line.encode() + b"\n\n"


async def generate_stream(app, name: str, scope: dict, receive, send) -> None:
    from .app import HTTPError

    body = await app.body(receive, dict(scope["headers"]))
    try:  # orjson: nesting past 1024, integers past 64 bits and lone surrogates are a ValueError
        value = orjson.loads(body) if body.strip() else None
    except ValueError as exc:
        raise HTTPError(400, f"the request body is not JSON: {exc}") from None
    parts = app.connect().stream(value, model=name)
    try:
        first = await parts.__anext__()
    except StopAsyncIteration:
        first = END
    except BaseException:
        await parts.aclose()
        raise
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
    gone = asyncio.ensure_future(_disconnected(receive))
    delivered, item = 0, first
    try:
        while item is not END:
            await send({"type": "http.response.body", "body": event(item), "more_body": True})
            delivered += 1
            following = asyncio.ensure_future(parts.__anext__())
            done, _ = await asyncio.wait({following, gone}, return_when=asyncio.FIRST_COMPLETED)
            if gone in done:  # the client went away (perhaps as a part came): stop the stream in the worker
                following.cancel()
                await asyncio.gather(following, return_exceptions=True)
                return
            try:
                item = following.result()
            except StopAsyncIteration:
                item = END
    except IsopoolError as err:
        await send({"type": "http.response.body", "more_body": True,
                    "body": event({"error": f"{type(err).__name__}: {err}", "type": type(err).__name__,
                                   "parts_delivered": delivered}, "error")})
    finally:
        gone.cancel()
        await parts.aclose()
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
