"""The HTTP front: the Open Inference Protocol (v2) REST API as a plain ASGI application.

    GET  /v2/health/live                              200 while this gateway runs
    GET  /v2/health/ready                             200 when every model can serve (isopool health)
    GET  /v2                                          server metadata and extensions
    GET  /v2/models/{name}[/versions/{v}]             model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready       200 when that model can serve
    POST /v2/models/{name}[/versions/{v}]/infer       JSON tensors, or the binary tensor extension
    POST /v2/models/{name}/generate_stream            a streaming model's parts as server-sent events
    GET  /v1/models, POST /v1/embeddings              OpenAI-compatible, for embedding models (openai_compat.py)

It talks to the supervisor as any client does (AsyncClient over the private ipc endpoint):
the supervisor never parses HTTP, and a gateway that dies costs only its own open requests.
Errors are {"error": "..."} with the status of their type (ERRORS); anything the client
sent wrong is a 4xx, never a 500.
"""

from __future__ import annotations

import json
import time
from typing import Any, Awaitable, Callable

from isopool import __version__
from isopool.client import AsyncClient
from isopool.errors import (BadRequest, IsopoolError, Overloaded, RequestTimeout, ShuttingDown, Unavailable,
                            UnknownModel)

from . import oip, openai_compat, sse

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

HEADER_LENGTH = b"inference-header-content-length"
STATUS_TTL_S = 0.5  # how long one status answer serves health and metadata requests
RETRY_AFTER_S = 1
DRAIN_MAX = 64 << 20  # bytes of a too-large body read (and dropped) before the 413
# the typed errors and their HTTP status (../shared/design.md, "HTTP")
ERRORS: list[tuple[type, int]] = [(BadRequest, 400), (UnknownModel, 404), (Overloaded, 503), (ShuttingDown, 503),
                                  (Unavailable, 503), (RequestTimeout, 504), (IsopoolError, 500)]


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class App:
    def __init__(self, endpoint: str, max_body: int = 256 << 20):
        self.endpoint = endpoint
        self.max_body = max_body
        self.client: AsyncClient | None = None
        self.status_cache: tuple[float, dict] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await self.lifespan(receive, send)
        if scope["type"] != "http":
            return
        error = _openai_error if scope["path"].startswith("/v1/") else _error  # each API's own error shape
        try:
            answer = await self.route(scope, receive, send)
            if answer is None:
                return  # streamed: sent already
            status, body, headers = answer
        except HTTPError as err:
            status, body, headers = err.status, error(str(err), err.status), []
        except oip.BadInput as err:
            status, body, headers = 400, error(str(err), 400), []
        except IsopoolError as err:
            status = next(code for kind, code in ERRORS if isinstance(err, kind))
            body, headers = error(f"{type(err).__name__}: {err}", status), []
            if status == 503:
                headers = [(b"retry-after", str(RETRY_AFTER_S).encode())]
        except Exception as exc:  # a bug of ours: said as a 500, the gateway serves on
            status, headers = 500, []
            body = error(f"internal error in the gateway: {type(exc).__name__}: {exc}", 500)
        if not any(k == b"content-type" for k, _ in headers):
            headers = [(b"content-type", b"application/json"), *headers]
        await send({"type": "http.response.start", "status": status,
                    "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.client is not None:
                    await self.client.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # ------------------------------------------------------------ routes

    async def route(self, scope: Scope, receive: Receive, send: Send) -> tuple[int, bytes, list] | None:
        method, parts = scope["method"], [p for p in scope["path"].split("/") if p]
        if parts == ["v1", "models"] and method == "GET":
            return 200, _json(await openai_compat.models(self)), []
        if parts == ["v1", "embeddings"] and method == "POST":
            return 200, _json(await openai_compat.embeddings(self, scope, receive)), []
        if parts[:1] != ["v2"]:
            raise HTTPError(404, f"no route {scope['path']}; this server speaks the Open Inference Protocol under /v2")
        rest = parts[1:]
        if rest == [] and method == "GET":
            return 200, _json({"name": "isopool", "version": __version__, "extensions": ["binary_tensor_data"]}), []
        if rest == ["health", "live"] and method == "GET":
            return 200, _json({"live": True}), []
        if rest == ["health", "ready"] and method == "GET":
            pool = (await self.status())["pool"]
            ready = pool["healthy"] and pool["workers_ready"] > 0
            return (200 if ready else 503), _json({"ready": ready, "reason": pool["health_reason"]}), []
        if rest[:1] == ["models"] and len(rest) >= 2:
            name, tail = rest[1], rest[2:]
            if tail[:1] == ["versions"] and len(tail) >= 2:
                tail = tail[2:]  # one version per model: any version names it
            if tail == [] and method == "GET":
                return 200, _json(await self.metadata(name)), []
            if tail == ["ready"] and method == "GET":
                model = await self.model(name)
                ready = model["healthy"] and model["workers_ready"] > 0
                return (200 if ready else 503), _json({"name": name, "ready": ready}), []
            if tail == ["infer"] and method == "POST":
                return await self.infer(name, scope, receive)
            if tail == ["generate_stream"] and method == "POST":
                return await sse.generate_stream(self, name, scope, receive, send)
        raise HTTPError(404 if method in ("GET", "POST") else 405, f"no route {method} {scope['path']}")

    async def status(self) -> dict:
        now = time.monotonic()
        if self.status_cache is None or now - self.status_cache[0] > STATUS_TTL_S:
            self.status_cache = (now, await self.connect().status())
        return self.status_cache[1]

    async def model(self, name: str) -> dict:
        models = (await self.status()).get("models", {})
        if name not in models:
            raise HTTPError(404, f"no model named {name!r} is served here; the models are: {', '.join(models)}")
        return models[name]

    async def metadata(self, name: str) -> dict:
        model = await self.model(name)
        return {"name": name, "versions": ["1"], "platform": "isopool", "inputs": [], "outputs": [],
                "parameters": {"implementation": model["model"],
                               "signature": "not declared: any tensors the model accepts"}}

    async def infer(self, name: str, scope: Scope, receive: Receive) -> tuple[int, bytes, list]:
        headers = dict(scope["headers"])
        length = headers.get(HEADER_LENGTH)
        try:
            header_length = int(length) if length is not None else None
        except ValueError:
            raise HTTPError(400, "Inference-Header-Content-Length must be an integer") from None
        body = await self.body(receive, headers)
        client = self.connect()
        request = oip.parse_request(body, header_length, client._session.limits.max_elements)
        result = await client.infer(oip.model_input(request), model=name)
        try:
            outputs = oip.outputs_of(result)
        except ValueError as exc:
            raise HTTPError(500, f"the model's answer cannot be sent as tensors: {exc}") from None
        head, blobs = oip.response(name, request, outputs)
        if not blobs:
            return 200, head, []
        return 200, head + blobs, [(b"content-type", b"application/octet-stream"),
                                   (HEADER_LENGTH, str(len(head)).encode())]

    async def body(self, receive: Receive, headers: dict) -> bytes:
        declared = headers.get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.max_body
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise HTTPError(400, "the client went away before sending its body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                too_big = True
            if not too_big:
                chunks.append(chunk)
            # past the limit the rest is read and let go (up to DRAIN_MAX), so the client, still
            # sending, reads the 413 instead of a reset connection
            if not message.get("more_body") or size > DRAIN_MAX:
                break
        if too_big:
            raise HTTPError(413, f"the body is {int(declared) if declared and declared.isdigit() else size} bytes, "
                                 f"over max_message_bytes={self.max_body}; send less, or raise --max-message-bytes")
        return b"".join(chunks)

    def connect(self) -> AsyncClient:
        if self.client is None:
            self.client = AsyncClient(self.endpoint, timeout=300.0)
        return self.client


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _error(message: str, status: int = 400) -> bytes:
    return _json({"error": message})


def _openai_error(message: str, status: int) -> bytes:
    """The error shape OpenAI's clients read (their message comes from error.message)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return _json({"error": {"message": message, "type": kind, "param": None, "code": status}})
