"""The HTTP front: the Open Inference Protocol (v2) REST API as a plain ASGI application.

    GET  /v2/health/live                              200 while the supervisor answers (its loop runs)
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

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

import orjson

from isopool import __version__
from isopool.client import AsyncClient
from isopool.logs import worth_a_line
from isopool.errors import (BadRequest, IsopoolError, Overloaded, RequestTimeout, ShuttingDown, Unavailable,
                            UnknownModel)

from . import auth, oip, openai_compat, openapi, repository, sse
from .auth import Tokens
from .body import BODY_KEY, DirectBody
from .hangup import ClientGone, until_hangup
from .metrics import HttpMetrics

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

access = logging.getLogger("isopool.http")
log = logging.getLogger("isopool.gateway")
HEADER_LENGTH = b"inference-header-content-length"
STATUS_TTL_S = 0.5  # how long one status answer serves health and metadata requests
STATUS_TIMEOUT_S = 2.0  # a supervisor that does not answer status within this is not live
RETRY_AFTER_S = 1
JOIN_BELOW = 64 << 10  # tensor bytes below which a response is one joined body (a copy is cheaper than a write)
DRAIN_MAX = 64 << 20  # bytes of a too-large body read (and dropped) before the 413
PARSE_ASIDE = 1 << 20  # a body this large is decoded on a thread, not the event loop
MIN_BODY_RATE = 500  # bytes/s: each byte of a body buys this much more time (as Apache's mod_reqtimeout)
# the typed errors and their HTTP status (../shared/design.md, "HTTP")
ERRORS: list[tuple[type, int]] = [(BadRequest, 400), (UnknownModel, 404), (Overloaded, 503), (ShuttingDown, 503),
                                  (Unavailable, 503), (RequestTimeout, 504), (IsopoolError, 500)]


MODEL_KEY = "isopool.model"  # where a route that reads its model from the body leaves its name, in the scope
ADMIN_ROUTES = {"/v2/repository/models/{name}/load", "/v2/repository/models/{name}/unload"}
# (method, template) of every route; a path's template is what metrics and logs name
ROUTES = [("GET", "/v1/models"), ("POST", "/v1/embeddings"), ("GET", "/openapi.json"), ("GET", "/v2"),
          ("GET", "/v2/health/live"), ("GET", "/v2/health/ready"), ("GET", "/v2/models/{name}"),
          ("GET", "/v2/models/{name}/ready"), ("POST", "/v2/models/{name}/infer"),
          ("POST", "/v2/models/{name}/generate_stream"), ("POST", "/v2/repository/index"),
          ("POST", "/v2/repository/models/{name}/load"), ("POST", "/v2/repository/models/{name}/unload")]
TEMPLATES = {t for _, t in ROUTES}


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: list | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or []


def resolve(path: str) -> tuple[str, str | None]:
    """(the route's template, the model it names) of a path; ("", None) if it is no route."""
    parts = [p for p in path.split("/") if p]
    model = None
    if parts[:2] == ["v2", "models"] and len(parts) >= 3:
        model, tail = parts[2], parts[3:]
        if tail[:1] == ["versions"] and len(tail) >= 2:
            tail = tail[2:]  # one version per model: any version names it
        parts = ["v2", "models", "{name}", *tail]
    elif parts[:3] == ["v2", "repository", "models"] and len(parts) == 5:
        model, parts = parts[3], ["v2", "repository", "models", "{name}", parts[4]]
    template = "/" + "/".join(parts)
    return (template, model) if template in TEMPLATES else ("", None)


class App:
    def __init__(self, endpoint: str, max_body: int = 256 << 20, tokens: Tokens | None = None,
                 metrics: HttpMetrics | None = None, access_log: bool = False, body_timeout: float = 10.0):
        self.endpoint = endpoint
        self.max_body = max_body
        self.tokens, self.metrics, self.access_log = tokens, metrics, access_log
        self.body_timeout = body_timeout  # a body that sends nothing this long is given up (a slow client)
        self.client: AsyncClient | None = None
        self.status_cache: tuple[float, dict] | None = None
        self.internal_errors = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await self.lifespan(receive, send)
        if scope["type"] != "http":
            return
        if self.metrics is None and not self.access_log:
            return await self.answer(scope, receive, send)
        began, answered = time.perf_counter(), [0]

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                answered[0] = message["status"]
            await send(message)

        try:
            await self.answer(scope, receive, sending)
        finally:
            self.record(scope, answered[0], time.perf_counter() - began)

    def record(self, scope: Scope, status: int, seconds: float) -> None:
        route, model = resolve(scope["path"])
        served = self.status_cache[1].get("models", {}) if self.status_cache else {}
        model = model if model in served else scope.get(MODEL_KEY, "")  # a served model's, never a new series
        if self.metrics is not None:
            self.metrics.record(route or "unmatched", scope["method"], status, model or "", seconds)
        if self.access_log:
            client = scope.get("client")
            access.info("%s %s %d %.1fms", scope["method"], scope["path"], status, seconds * 1e3,
                        extra={"method": scope["method"], "path": scope["path"], "route": route or "unmatched",
                               "model": model or "", "status": status, "duration_ms": round(seconds * 1e3, 3),
                               "client": f"{client[0]}:{client[1]}" if client else ""})

    async def answer(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = _openai_error if scope["path"].startswith("/v1/") else _error  # each API's own error shape
        direct = scope.get("extensions", {}).get(BODY_KEY)  # a body read into shared memory (body.py)
        try:
            answer = await self.route(scope, receive, send)
            if answer is None:
                return  # streamed: sent already
            status, body, headers = answer
        except HTTPError as err:
            status, body, headers = err.status, error(str(err), err.status), err.headers
        except ClientGone as err:  # answered to nobody: counted by the metrics and the access log
            status, body, headers = err.status, error(str(err), err.status), []
        except oip.BadInput as err:
            status, body, headers = 400, error(str(err), 400), []
        except IsopoolError as err:
            status = next(code for kind, code in ERRORS if isinstance(err, kind))
            body, headers = error(f"{type(err).__name__}: {err}", status), []
            if status == 503:
                headers = [(b"retry-after", str(RETRY_AFTER_S).encode())]
        except Exception as exc:  # a bug of ours: a 500, logged (a flood: one in 100); the gateway serves on
            self.internal_errors += 1
            if worth_a_line(self.internal_errors):
                log.exception("internal error answering %s %s (%d so far); the gateway serves on",
                              scope["method"], scope["path"], self.internal_errors)
            status, headers = 500, []
            body = error(f"internal error in the gateway: {type(exc).__name__}: {exc}", 500)
        finally:
            if direct is not None:  # whatever the route did: no view of the body is used past here
                direct.release()
        if not any(k == b"content-type" for k, _ in headers):
            headers = [(b"content-type", b"application/json"), *headers]
        parts = body if isinstance(body, list) else [body]  # the JSON, then each tensor's bytes as they are
        await send({"type": "http.response.start", "status": status,
                    "headers": [*headers, (b"content-length", str(sum(map(len, parts))).encode())]})
        for i, part in enumerate(parts):
            await send({"type": "http.response.body", "body": part, "more_body": i < len(parts) - 1})

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.connect()._ensure_tasks()  # its hello now: the first large body finds shared memory offered
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.client is not None:
                    await self.client.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # ------------------------------------------------------------ routes

    def authorize(self, method: str, template: str, headers: dict) -> None:
        """HTTPError 401 without a known token, 403 for a client token on an admin route."""
        if self.tokens is None:
            if template in ADMIN_ROUTES:
                raise HTTPError(403, "loading and unloading models over HTTP needs --http-tokens with an admin "
                                     "token; or use `isopool load` / `isopool unload` on the daemon's host")
            return
        if (method, template) in auth.OPEN_ROUTES:
            return
        role = self.tokens.role(headers.get(b"authorization"))
        if role is None:
            raise HTTPError(401, "this server needs a bearer token: send 'Authorization: Bearer TOKEN' with a "
                                 "token from its --http-tokens file", [(b"www-authenticate", b'Bearer realm="isopool"')])
        if template in ADMIN_ROUTES and role != "admin":
            raise HTTPError(403, f"{template} needs an admin token; this one is a client's")

    async def route(self, scope: Scope, receive: Receive, send: Send) -> tuple[int, bytes, list] | None:
        method = scope["method"]
        template, name = resolve(scope["path"])
        allowed = [m for m, t in ROUTES if t == template]
        if not allowed:
            raise HTTPError(404, f"no route {scope['path']}; this server speaks the Open Inference Protocol under "
                                 "/v2 (GET /openapi.json lists its routes)")
        if "GET" in allowed:
            allowed.append("HEAD")  # RFC 9110: a GET route answers HEAD (uvicorn sends no body for it)
            if method == "HEAD":
                method = "GET"
        if method not in allowed:
            raise HTTPError(405, f"{template} takes {', '.join(allowed)}, not {method}",
                            [(b"allow", ", ".join(allowed).encode())])
        headers = dict(scope["headers"])
        self.authorize(method, template, headers)
        if template == "/v1/models":
            return 200, _json(await openai_compat.models(self)), []
        if template == "/v1/embeddings":
            return 200, _json(await openai_compat.embeddings(self, scope, receive)), []
        if template == "/openapi.json":
            return 200, _json(openapi.document()), []
        if template == "/v2":
            return 200, _json({"name": "isopool", "version": __version__,
                               "extensions": ["binary_tensor_data", "model_repository"]}), []
        if template == "/v2/health/live":  # the supervisor answers: its loop runs (a gateway alone is not live)
            try:
                await self.status(fresh=True)
            except IsopoolError as err:
                raise HTTPError(503, f"the supervisor did not answer within {STATUS_TIMEOUT_S:g} s: {err}",
                                [(b"retry-after", str(RETRY_AFTER_S).encode())]) from None
            return 200, _json({"live": True}), []
        if template == "/v2/health/ready":
            pool = (await self.status())["pool"]
            ready = pool["healthy"] and pool["workers_ready"] > 0
            return (200 if ready else 503), _json({"ready": ready, "reason": pool["health_reason"]}), []
        if template == "/v2/models/{name}":
            return 200, _json(await self.metadata(name)), []
        if template == "/v2/models/{name}/ready":
            model = await self.model(name)
            ready = model["healthy"] and model["workers_ready"] > 0
            return (200 if ready else 503), _json({"name": name, "ready": ready}), []
        if template == "/v2/models/{name}/infer":
            return await self.infer(name, scope, receive)
        if template == "/v2/models/{name}/generate_stream":
            return await sse.generate_stream(self, name, scope, receive, send)
        body = await self.body(receive, headers)
        if template == "/v2/repository/index":
            return 200, _json(await repository.index(self, body)), []
        if template.endswith("/load"):
            return 200, _json(await repository.load(self, name, body)), []
        return 200, _json(await repository.unload(self, name)), []

    async def status(self, fresh: bool = False) -> dict:
        now = time.monotonic()
        if fresh or self.status_cache is None or now - self.status_cache[0] > STATUS_TTL_S:
            self.status_cache = (now, await self.connect().status(timeout=STATUS_TIMEOUT_S))
        return self.status_cache[1]

    async def model(self, name: str, fresh: bool = False) -> dict:
        models = (await self.status(fresh)).get("models", {})
        if name not in models:
            raise HTTPError(404, f"no model named {name!r} is served here; the models are: {', '.join(models)}")
        return models[name]

    async def metadata(self, name: str) -> dict:
        model = await self.model(name, fresh=True)  # asked rarely: never from a cache a load or unload outdated
        signature = model.get("signature")
        if signature:
            return {"name": name, "versions": ["1"], "platform": "isopool", **signature,
                    "parameters": {"implementation": model["model"], "signature": "declared"}}
        return {"name": name, "versions": ["1"], "platform": "isopool", "inputs": [], "outputs": [],
                "parameters": {"implementation": model["model"],
                               "signature": "not declared: the model takes any tensors; a model declares its "
                                            "own with a `signature` attribute"}}

    async def infer(self, name: str, scope: Scope, receive: Receive) -> tuple[int, bytes, list]:
        headers = dict(scope["headers"])
        length = headers.get(HEADER_LENGTH)
        try:
            header_length = int(length) if length is not None else None
        except ValueError:
            raise HTTPError(400, "Inference-Header-Content-Length must be an integer") from None
        direct = scope.get("extensions", {}).get(BODY_KEY)
        body = await (self.direct_body(direct) if direct is not None else self.body(receive, headers))
        client = self.connect()
        max_elements = client._session.limits.max_elements
        if len(body) < PARSE_ASIDE:
            request = oip.parse_request(body, header_length, max_elements)
        else:  # a large body's elements may be many (BYTES are read one by one): other requests go on meanwhile
            request = await asyncio.to_thread(oip.parse_request, body, header_length, max_elements)
        signature = (await self.model(name)).get("signature")
        if signature:
            oip.check_inputs(request, signature, name)
        if direct is not None:  # its tensors are views of the lease: the call names it, nothing is copied
            result = await until_hangup(scope, client._infer_in(direct.lease, oip.model_input(request), model=name))
        else:
            result = await until_hangup(scope, client.infer(oip.model_input(request), model=name))
        try:
            outputs = oip.outputs_of(result, request)
        except ValueError as exc:
            raise HTTPError(500, f"the model's answer cannot be sent as tensors: {exc}") from None
        head, blobs = oip.response(name, request, outputs)
        if not blobs:
            return 200, head, []
        # small tensors: one write of a joined body; large ones: written from the answer's memory
        body = head + b"".join(blobs) if sum(map(len, blobs)) < JOIN_BELOW else [head, *blobs]
        return 200, body, [(b"content-type", b"application/octet-stream"), (HEADER_LENGTH, str(len(head)).encode())]

    async def direct_body(self, direct: DirectBody) -> memoryview:
        """A body the connection reads into shared memory (body.py), with body()'s deadlines."""
        try:
            return await direct.wait(self.body_timeout, MIN_BODY_RATE)
        except TimeoutError:  # the rest of its bytes would be taken for the next request: close
            raise HTTPError(408, stalled(self.body_timeout), [(b"connection", b"close")]) from None
        except ConnectionError:
            raise HTTPError(400, "the client went away before sending its body") from None

    def lease(self, size: int) -> Any:
        """Shared memory of `size` bytes for a body to be read into (body.py), or None."""
        return self.connect()._session.lease(size)

    async def body(self, receive: Receive, headers: dict) -> bytes | bytearray:
        """The request's body, read within time: a pause longer than the body timeout is a 408,
        and so is a body slower on the whole than the timeout plus a second per MIN_BODY_RATE
        bytes (one that trickles in a byte at a time). Memory is taken as bytes come, never for
        what Content-Length only declares."""
        declared = headers.get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.max_body
        loop = asyncio.get_running_loop()
        began = loop.time()
        buf, size = bytearray(), 0  # grown in place as bytes come (tensors are then views of it)
        while True:
            left = began + self.body_timeout + size / MIN_BODY_RATE - loop.time()
            try:
                if left <= 0:
                    raise asyncio.TimeoutError
                message = await asyncio.wait_for(receive(), min(self.body_timeout, left))
            except asyncio.TimeoutError:  # the rest would be read as the next request: close after the 408
                raise HTTPError(408, stalled(self.body_timeout), [(b"connection", b"close")]) from None
            if message["type"] == "http.disconnect":
                raise HTTPError(400, "the client went away before sending its body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                too_big = True
            if not too_big:
                buf += chunk
            # past the limit the rest is read and let go (up to DRAIN_MAX), so the client, still
            # sending, reads the 413 instead of a reset connection
            if not message.get("more_body") or size > DRAIN_MAX:
                break
        if too_big:
            raise HTTPError(413, f"the body is {int(declared) if declared and declared.isdigit() else size} bytes, "
                                 f"over max_message_bytes={self.max_body}; send less, or raise --max-message-bytes")
        return buf

    def connect(self) -> AsyncClient:
        if self.client is None:
            self.client = AsyncClient(self.endpoint, timeout=300.0)
        return self.client


def stalled(timeout: float) -> str:
    return (f"the request body stalled: nothing arrived for {timeout:g} s, or it came slower than {MIN_BODY_RATE} "
            "bytes/s; send it faster, or raise --http-client-timeout")


def _json(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)


def _error(message: str, status: int = 400) -> bytes:
    return _json({"error": message})


def _openai_error(message: str, status: int) -> bytes:
    """The error shape OpenAI's clients read (their message comes from error.message)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return _json({"error": {"message": message, "type": kind, "param": None, "code": status}})
