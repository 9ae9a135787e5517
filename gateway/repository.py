"""The Open Inference Protocol's model repository extension: list, load and unload models.

    POST /v2/repository/index                    [{"name", "version", "state", "reason"}] (any token)
    POST /v2/repository/models/{name}/load       {"parameters": {"model": "MODULE:ATTR", "workers": N}}
    POST /v2/repository/models/{name}/unload

Load and unload change what the daemon runs (load imports code), so they are the admin
role's alone and exist only with --http-tokens: without tokens, anyone who can reach a
loopback port could make the daemon import a module. Load without parameters.model
reloads a served model (a rolling replace of its workers), as Triton's load does.
"""

from __future__ import annotations

from typing import Any

import orjson


def _object(body: bytes) -> dict:
    """The body's JSON object ({} for none); HTTPError 400 for anything else."""
    from .app import HTTPError

    if not body.strip():
        return {}
    try:  # orjson: nesting past 1024 is a ValueError, not a RecursionError
        request = orjson.loads(body)
    except ValueError as exc:
        raise HTTPError(400, f"the request body is not JSON: {exc}") from None
    if not isinstance(request, dict) or not isinstance(request.get("parameters", {}), dict):
        raise HTTPError(400, 'the request must be a JSON object, with "parameters" a map if given')
    return request


async def index(app, body: bytes) -> list[dict[str, Any]]:
    ready_only = _object(body).get("ready", False)
    if type(ready_only) is not bool:
        from .app import HTTPError

        raise HTTPError(400, f'"ready" must be true or false, got {ready_only!r:.40}')
    models = (await app.status(fresh=True)).get("models", {})
    out = []
    for name, m in models.items():
        ready = m["healthy"] and m["workers_ready"] > 0
        if ready or not ready_only:
            out.append({"name": name, "version": "1", "state": "READY" if ready else "UNAVAILABLE",
                        "reason": "" if ready else m.get("health_reason", "")})
    return out


async def load(app, name: str, body: bytes) -> dict:
    from .app import HTTPError

    params = _object(body).get("parameters", {})
    target, workers = params.get("model"), params.get("workers")
    if workers is not None and (type(workers) is not int or workers < 1):
        raise HTTPError(400, f'parameters.workers must be a whole number of at least 1, got {workers!r}')
    client = app.connect()
    if target is None:
        if name not in (await app.status(fresh=True)).get("models", {}):
            raise HTTPError(400, f'model {name!r} is not served; load it with parameters.model = "MODULE:ATTR"')
        answer = await client.reload(model=name)
    elif not isinstance(target, str):
        raise HTTPError(400, f'parameters.model must be "MODULE:ATTR", got {target!r}')
    else:
        answer = await client.load(name, target, workers=workers)
    app.status_cache = None
    return answer


async def unload(app, name: str) -> dict:
    answer = await app.connect().unload(name)
    app.status_cache = None
    return answer
