"""The control calls every client has, in terms of its own control(): scale, reload, load,
unload, stop. ControlCalls for the sync clients, AsyncControlCalls for the asyncio ones (a
client of several endpoints sends each to all of them: its control() does)."""

from __future__ import annotations

from isopool.protocol import ops


def _named(model: str | None) -> dict:
    return {} if model is None else {"model": model}


def _sized(workers: int | None) -> dict:
    return {"workers": workers} if workers else {}


class ControlCalls:
    def control(self, action: str, timeout: float = 10.0, **args) -> dict:
        raise NotImplementedError

    def scale(self, workers: int, model: str | None = None) -> dict:
        """Run `workers` workers of `model` (needed when several are served) from now on."""
        return self.control(ops.SCALE, workers=workers, **_named(model))

    def reload(self, model: str | None = None) -> dict:
        """Replace every worker (of `model`, else of every model), one at a time, with no failed
        request: new code and weights load."""
        return self.control(ops.RELOAD, **_named(model))

    def load(self, name: str, model: str, workers: int | None = None) -> dict:
        """Serve `model` (MODULE:ATTR) as `name` from now on; under a name already served, its
        workers roll over to the new implementation with no failed request."""
        return self.control(ops.LOAD, name=name, model=model, **_sized(workers))

    def unload(self, name: str) -> dict:
        """Stop serving model `name`: its queued and running requests are answered, then its workers stop."""
        return self.control(ops.UNLOAD, name=name)

    def stop(self) -> dict:
        """Drain the pool and stop it."""
        return self.control(ops.SHUTDOWN)


class AsyncControlCalls:
    async def control(self, action: str, timeout: float = 10.0, **args) -> dict:
        raise NotImplementedError

    async def scale(self, workers: int, model: str | None = None) -> dict:
        """Run `workers` workers of `model` (needed when several are served) from now on."""
        return await self.control(ops.SCALE, workers=workers, **_named(model))

    async def reload(self, model: str | None = None) -> dict:
        """Replace every worker (of `model`, else of every model), one at a time, with no failed request."""
        return await self.control(ops.RELOAD, **_named(model))

    async def load(self, name: str, model: str, workers: int | None = None) -> dict:
        """Serve `model` (MODULE:ATTR) as `name` from now on (a rolling replace if `name` is served)."""
        return await self.control(ops.LOAD, name=name, model=model, **_sized(workers))

    async def unload(self, name: str) -> dict:
        """Stop serving model `name` once its queued and running requests are answered."""
        return await self.control(ops.UNLOAD, name=name)

    async def stop(self) -> dict:
        """Drain the pool and stop it."""
        return await self.control(ops.SHUTDOWN)
