"""Client and AsyncClient of several endpoints: what `Client([e1, e2, ...])` builds (spread.py).

Each endpoint gets an ordinary client of its own; these classes choose one per request and
fail over (spread.Attempts). They take the same arguments and have the same calls as
Client and AsyncClient.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading
import time
from typing import Any, AsyncIterator, Iterator

from isopool.protocol import IsopoolError

from .calls import AsyncControlCalls, ControlCalls
from .spread import PROBE_S, Attempts, Spread, attempt_loop, merged_status, serving

STATUS_S = 1.0  # a probe's status call: a host that does not answer within it stays avoided
REBUILD_S = 10.0  # an endpoint unreachable this long gets a new connection (ZeroMQ may have stopped
                  # reconnecting: after a handshake broken off by whatever held its address meanwhile)


def _over(client, endpoints: list[str], timeout: float, retry: bool, make) -> None:
    """What both clients of several endpoints hold: the endpoints, a Spread, and one client
    each, made by make(endpoint) (again, when one is rebuilt)."""
    client.endpoint, client.timeout, client.retry = list(endpoints), timeout, retry
    client.spread = Spread(client.endpoint)
    client._make = make
    client.clients = {e: make(e) for e in client.endpoint}


def _set(future: cf.Future, exception: BaseException) -> None:
    try:
        future.set_exception(exception)
    except cf.InvalidStateError:  # cancelled by the caller meanwhile
        pass


class SeveralClient(ControlCalls):
    """Client([e1, e2, ...]): a thread-safe client of several daemons."""

    def __init__(self, endpoints: list[str], *, timeout: float = 30.0, retry: bool = True, **kw: Any):
        from .sync import Client

        _over(self, endpoints, timeout, retry, lambda e: Client(e, timeout=timeout, retry=retry, **kw))
        self._closed = threading.Event()
        # failed attempts are sent again from here, never from a client's I/O thread
        self._again = cf.ThreadPoolExecutor(max_workers=2, thread_name_prefix="isopool-failover")
        self._prober = threading.Thread(target=self._probe, name="isopool-probe", daemon=True)
        self._prober.start()

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (self.timeout if timeout is None else timeout)

    def infer(self, x: Any, *, timeout: float | None = None, retry: bool | None = None,
              tenant: str | None = None, model: str | None = None) -> Any:
        allowed = self.retry if retry is None else retry
        return attempt_loop(self.spread, self._deadline(timeout), allowed, lambda e, left: self.clients[e].infer(
            x, timeout=left, retry=retry, tenant=tenant, model=model))

    def submit(self, x: Any, *, timeout: float | None = None, retry: bool | None = None,
               tenant: str | None = None, model: str | None = None) -> cf.Future:
        outer: cf.Future = cf.Future()
        attempts = Attempts(self.spread, self._deadline(timeout), self.retry if retry is None else retry)
        current: list[cf.Future] = []  # the attempt under way: cancelling the request cancels it

        def step() -> None:
            try:
                nxt = attempts.next()
            except BaseException as exc:  # noqa: BLE001 - the request's final failure
                _set(outer, exception=exc)
                return
            if isinstance(nxt, float):
                threading.Timer(nxt, lambda: self._again.submit(step)).start()
                return
            endpoint, left = nxt
            try:
                inner = self.clients[endpoint].submit(x, timeout=left, retry=retry, tenant=tenant, model=model)
            except IsopoolError as err:
                inner = cf.Future()
                inner.set_exception(err)
            current[:] = [inner]
            inner.add_done_callback(lambda f: settle(endpoint, f))

        def settle(endpoint: str, inner: cf.Future) -> None:
            attempts.finished(endpoint)
            if inner.cancelled() or outer.done():
                return
            err = inner.exception()
            try:
                if err is None:
                    outer.set_result(inner.result())
                    return
                attempts.failed(endpoint, err)
            except cf.InvalidStateError:
                return  # cancelled by the caller meanwhile
            except BaseException as final:  # noqa: BLE001 - the request's final failure
                _set(outer, exception=final)
                return
            if not self._closed.is_set() and not outer.done():
                self._again.submit(step)

        outer.add_done_callback(lambda f: f.cancelled() and current and current[0].cancel())
        step()
        return outer

    def stream(self, x: Any, *, timeout: float | None = None, tenant: str | None = None,
               model: str | None = None) -> Iterator[Any]:
        """One endpoint's stream; another endpoint only if it failed before its first part."""
        attempts = Attempts(self.spread, self._deadline(timeout), self.retry)
        while True:
            endpoint, left = attempts.take()
            parts = self.clients[endpoint].stream(x, timeout=left, tenant=tenant, model=model)
            try:
                first = next(parts)
            except StopIteration:
                attempts.finished(endpoint)
                return
            except IsopoolError as err:
                attempts.finished(endpoint)
                attempts.failed(endpoint, err)
                continue
            try:
                yield first
                yield from parts
            finally:
                attempts.finished(endpoint)
            return

    def _each(self, call, timeout: float) -> dict[str, Any]:
        """call(client) on every endpoint at once: {endpoint: its answer, or its error}."""
        with cf.ThreadPoolExecutor(max_workers=len(self.clients)) as pool:
            futures = {e: pool.submit(call, c) for e, c in self.clients.items()}
            out = {}
            for e, f in futures.items():
                try:
                    out[e] = f.result(timeout + 10)
                except Exception as exc:  # noqa: BLE001 - reported, per endpoint
                    out[e] = exc
        return out

    def status(self, timeout: float = 5.0) -> dict:
        """{"pool": the sums over the endpoints that answered, "endpoints": each one's status
        (or {"error": ...}), "spread": which are avoided and why, outstanding, failovers}."""
        return merged_status(self.spread, self._each(lambda c: c.status(timeout), timeout))

    def control(self, action: str, timeout: float = 10.0, **args: Any) -> dict:
        """The control call on every endpoint: {endpoint: its answer, or {"error": ...}}."""
        answers = self._each(lambda c: c.control(action, timeout, **args), timeout)
        return {e: (a if isinstance(a, dict) else {"error": f"{type(a).__name__}: {a}"}) for e, a in answers.items()}

    def models(self) -> dict:
        return {e: s.get("models", s) for e, s in self.status()["endpoints"].items()}

    def _probe(self) -> None:
        down_since: dict[str, float] = {}
        while not self._closed.wait(PROBE_S):
            for endpoint in list(self.spread.facts()["avoided"]):
                try:
                    if serving(self.clients[endpoint].status(STATUS_S)):
                        self.spread.recovered(endpoint)
                        down_since.pop(endpoint, None)
                except IsopoolError:  # still down: still avoided
                    since = down_since.setdefault(endpoint, time.monotonic())
                    if time.monotonic() - since > REBUILD_S and not self._closed.is_set():
                        old, self.clients[endpoint] = self.clients[endpoint], self._make(endpoint)
                        old.close()  # what it still held fails over, as from a lost connection
                        down_since[endpoint] = time.monotonic()

    def close(self) -> None:
        self._closed.set()
        self._prober.join(STATUS_S + 5)
        self._again.shutdown(wait=False, cancel_futures=True)
        for c in self.clients.values():
            c.close()

    def __enter__(self) -> "SeveralClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class SeveralAsyncClient(AsyncControlCalls):
    """AsyncClient([e1, e2, ...]): an asyncio client of several daemons."""

    def __init__(self, endpoints: list[str], *, timeout: float = 30.0, retry: bool = True, **kw: Any):
        from .aio import AsyncClient

        _over(self, endpoints, timeout, retry, lambda e: AsyncClient(e, timeout=timeout, retry=retry, **kw))
        self._prober: asyncio.Task | None = None

    def _start(self, timeout: float | None, retry: bool | None) -> Attempts:
        if self._prober is None:
            self._prober = asyncio.ensure_future(self._probe())
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        return Attempts(self.spread, deadline, self.retry if retry is None else retry)

    async def infer(self, x: Any, *, timeout: float | None = None, retry: bool | None = None,
                    tenant: str | None = None, model: str | None = None) -> Any:
        attempts = self._start(timeout, retry)
        while True:
            endpoint, left = await attempts.atake()
            try:
                return await self.clients[endpoint].infer(x, timeout=left, retry=retry, tenant=tenant, model=model)
            except IsopoolError as err:
                attempts.failed(endpoint, err)
            finally:
                attempts.finished(endpoint)

    async def stream(self, x: Any, *, timeout: float | None = None, tenant: str | None = None,
                     model: str | None = None) -> AsyncIterator[Any]:
        attempts = self._start(timeout, None)
        while True:
            endpoint, left = await attempts.atake()
            parts = self.clients[endpoint].stream(x, timeout=left, tenant=tenant, model=model)
            try:
                first = await parts.__anext__()
            except StopAsyncIteration:
                attempts.finished(endpoint)
                return
            except IsopoolError as err:
                attempts.finished(endpoint)
                await parts.aclose()
                attempts.failed(endpoint, err)
                continue
            try:
                yield first
                async for part in parts:
                    yield part
            finally:
                attempts.finished(endpoint)
                await parts.aclose()
            return

    async def _each(self, call) -> dict[str, Any]:
        answers = await asyncio.gather(*(call(c) for c in self.clients.values()), return_exceptions=True)
        return dict(zip(self.clients, answers))

    async def status(self, timeout: float = 5.0) -> dict:
        return merged_status(self.spread, await self._each(lambda c: c.status(timeout)))

    async def control(self, action: str, timeout: float = 10.0, **args: Any) -> dict:
        answers = await self._each(lambda c: c.control(action, timeout, **args))
        return {e: (a if isinstance(a, dict) else {"error": f"{type(a).__name__}: {a}"}) for e, a in answers.items()}

    async def models(self) -> dict:
        return {e: s.get("models", s) for e, s in (await self.status())["endpoints"].items()}

    async def _probe(self) -> None:
        down_since: dict[str, float] = {}
        while True:
            await asyncio.sleep(PROBE_S)
            for endpoint in list(self.spread.facts()["avoided"]):
                try:
                    if serving(await self.clients[endpoint].status(STATUS_S)):
                        self.spread.recovered(endpoint)
                        down_since.pop(endpoint, None)
                except IsopoolError:  # still down: still avoided (and rebuilt, as SeveralClient does)
                    since = down_since.setdefault(endpoint, time.monotonic())
                    if time.monotonic() - since > REBUILD_S:
                        old, self.clients[endpoint] = self.clients[endpoint], self._make(endpoint)
                        await old.close()
                        down_since[endpoint] = time.monotonic()

    async def close(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            await asyncio.gather(self._prober, return_exceptions=True)
        for c in self.clients.values():
            await c.close()

    async def __aenter__(self) -> "SeveralAsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
