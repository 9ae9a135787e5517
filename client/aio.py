"""AsyncClient: the same session core on pyzmq's asyncio sockets; no extra thread.

A reader task owns receiving; sends happen on the event loop's thread (one loop per
AsyncClient), gathered per turn of the loop into bundles. Futures are asyncio futures;
streams are async iterators. The socket and context live in one resources object, released
by close() and, if the client is dropped unclosed, by weakref.finalize.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import deque
from typing import Any, AsyncIterator

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from isopool.protocol import Limits, Unavailable, ops
from isopool.protocol.iothread import io_context
from isopool.protocol.pacing import Pacing

from .connection import (CONNECT_S, close_watched, closed_early, configure_socket, connect, curve_keys, not_running,
                         on_monitor_event, resolve_endpoint, watch_disconnects)
from .calls import AsyncControlCalls
from .core import Call, Session, send_bundled, stream_ended, stream_part
from .segments import Lease
from .spread import endpoints_of, one_of


class _AsyncCall(Call):
    __slots__ = ("future", "parts", "behind")

    def __init__(self, cid: Any, deadline: float, stream: bool, future: asyncio.Future, parts=None, behind=None):
        super().__init__(cid, deadline, stream)
        self.future, self.parts = future, parts
        self.behind = behind  # called with the cid when the stream's reader falls too far behind

    def resolve(self, value: Any) -> None:
        if not self.future.done():
            self.future.set_result(value)

    def reject(self, exc: BaseException) -> None:
        if self.parts is not None:
            self.parts.put_nowait(exc)
        if not self.future.done():
            self.future.set_exception(exc)
            self.future.exception()  # a stream's future may never be awaited; don't warn

    chunk = stream_part


class _Resources:
    """Context, socket and monitor of one AsyncClient. release() is safe to call twice, and
    after a constructor that failed half-way (a bad key file, no file descriptors)."""

    def __init__(self, endpoint: str, curve: dict | None):
        self.sock = self.monitor = None
        self.ctx, io_threads = io_context(zmq.asyncio.Context)
        self.pacing = Pacing(io_threads, work_s=0.0)  # a client relays no work of its own: always quick
        try:
            self.sock = self.ctx.socket(zmq.DEALER)
            configure_socket(self.sock, curve)
            self.monitor = watch_disconnects(self.sock)
            connect(self.sock, endpoint)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self.sock is not None and not self.sock.closed:
            close_watched(self.sock, self.monitor)
        if not self.ctx.closed:
            self.ctx.term()


class AsyncClient(AsyncControlCalls):
    """    async with AsyncClient() as c:
            y = await c.infer(x)
            async for part in c.stream(x): ...
    """

    def __new__(cls, endpoint: Any = None, **kw: Any):
        several = endpoints_of(endpoint)
        if cls is AsyncClient and several is not None:  # several daemons: spread over them (several.py)
            from .several import SeveralAsyncClient

            return SeveralAsyncClient(several, **kw)
        return super().__new__(cls)

    def __init__(self, endpoint: str | None = None, *, timeout: float = 30.0, arrays: str = "auto",
                 retry: bool = True, tenant: str | None = None, model: str | None = None,
                 curve_secret_key: str | None = None, curve_server_key: str | None = None,
                 limits: Limits | None = None, writable: bool = False, shm: bool = True):
        self.endpoint = resolve_endpoint(one_of(endpoint))
        self.retry, self.tenant, self.model = retry, tenant, model
        self._session = Session(arrays=arrays, default_timeout=timeout, limits=limits, writable=writable, shm=shm)
        self._io = _Resources(self.endpoint, curve_keys(curve_secret_key, curve_server_key))
        self._finalizer = weakref.finalize(self, self._io.release)
        self._tasks: list[asyncio.Task] = []
        self._outgoing: deque = deque()
        self._closed = False

    def _ensure_tasks(self) -> None:
        if not self._tasks:
            self._tasks = [asyncio.ensure_future(self._reader()), asyncio.ensure_future(self._timer()),
                           asyncio.ensure_future(self._watch())]
            self._send(self._session.hello())  # the server's limits, for large requests

    async def _reader(self) -> None:
        while True:
            frames = await self._io.sock.recv_multipart(copy=False)
            self._session.on_reply(frames)

    async def _timer(self) -> None:
        while True:
            due = self._session.next_deadline()
            await asyncio.sleep(0.05 if due is None else max(0.0, min(1.0, due - time.monotonic())))
            for cid in self._session.expire(time.monotonic()):
                self._send(self._session.op_frames(ops.CANCEL, cid))

    async def _watch(self) -> None:
        while True:
            on_monitor_event(self._session, parse_monitor_message(await self._io.monitor.recv_multipart()),
                             self.endpoint)

    def _send(self, frames: list, call: Call | None = None) -> None:
        """Queue a message; everything queued in one turn of the event loop leaves together,
        so a gather() of many calls reaches the supervisor as one bundle."""
        if not self._outgoing:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outgoing.append((frames, call))

    def _flush(self) -> None:
        if self._closed:
            self._outgoing.clear()
            return  # close() has failed every pending call
        self._io.pacing.observe(len(self._session.pending))
        send_bundled(self._session, self.endpoint, self._outgoing, self._send_now, add=False)

    def _send_now(self, frames: list) -> BaseException | None:
        # a NOBLOCK send is tried at once: the future is already done, with any error
        sent = self._io.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        return sent.exception() if sent.done() else None

    def _start(self, frames: list, cid: Any, deadline: float, stream: bool = False, parts=None) -> asyncio.Future:
        if self._closed:
            raise Unavailable("the client is closed")
        self._ensure_tasks()
        future = asyncio.get_running_loop().create_future()
        call = _AsyncCall(cid, deadline, stream, future, parts, self._cancel if stream else None)
        self._session.add(call)
        self._send(frames, call)
        if not self._session.up.is_set():  # no connection seen yet: give it CONNECT_S
            asyncio.get_running_loop().call_later(CONNECT_S, self._check_up, cid)
        return future

    def _check_up(self, cid: Any) -> None:
        if not self._session.up.is_set():
            call = self._session.end(cid)
            if call is not None:
                call.reject(self._session.refused or not_running(self.endpoint))

    def _request(self, x: Any, timeout: float | None, retry: bool | None, tenant: str | None,
                 stream: bool, model: str | None = None, lease: Lease | None = None) -> tuple[Any, list, float]:
        cid, frames, _, deadline = self._session.request(
            x, timeout, self.retry if retry is None else retry, tenant if tenant is not None else self.tenant, stream,
            wait=False, model=model if model is not None else self.model, lease=lease)
        return cid, frames, deadline

    async def infer(self, x: Any, *, timeout: float | None = None, retry: bool | None = None,
                    tenant: str | None = None, model: str | None = None) -> Any:
        return await self._answer(*self._request(x, timeout, retry, tenant, stream=False, model=model))

    async def _infer_in(self, lease: Lease, x: Any, *, model: str | None = None) -> Any:
        """infer(x), where x's large arrays may lie in `lease` already (Session.lease: shared
        memory the caller filled; the HTTP gateway reads a body into one): those are not copied."""
        return await self._answer(*self._request(x, None, None, None, stream=False, model=model, lease=lease))

    async def _answer(self, cid: Any, frames: list, deadline: float) -> Any:
        future = self._start(frames, cid, deadline)
        del frames
        try:
            return await future
        except asyncio.CancelledError:
            self._cancel(cid)
            raise
        finally:  # the future holds the error raised here, whose traceback holds this frame: a cycle
            del future  # that would keep the caller's request (a whole HTTP body) until a full collection

    async def stream(self, x: Any, *, timeout: float | None = None, tenant: str | None = None,
                     model: str | None = None) -> AsyncIterator[Any]:
        cid, frames, deadline = self._request(x, timeout, None, tenant, stream=True, model=model)
        parts: asyncio.Queue = asyncio.Queue()
        self._start(frames, cid, deadline, stream=True, parts=parts)
        finished = False
        try:
            while True:
                item = await parts.get()
                finished = True  # unless it is a part: an end or an error finishes it
                if stream_ended(item):
                    return
                finished = False
                yield item
        finally:
            if not finished:
                self._cancel(cid)

    def _cancel(self, cid: Any) -> None:
        if self._session.end(cid) is not None and not self._closed:
            self._send(self._session.op_frames(ops.CANCEL, cid))

    async def _call(self, op: str, timeout: float, **fields: Any) -> Any:
        cid = next(self._session.ids)
        return await self._start(self._session.op_frames(op, cid, **fields), cid, self._session.deadline(timeout))

    async def status(self, timeout: float = 5.0) -> dict:
        """The pool's status: the same map as `isopool status --json`."""
        return await self._call(ops.STATUS, timeout)

    async def control(self, action: str, timeout: float = 10.0, **args: Any) -> dict:
        return await self._call(ops.CONTROL, timeout, action=action, args=args)

    async def models(self) -> dict:
        """The models served: name -> their status summary."""
        return (await self.status())["models"]

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._session.close(closed_early())
        self._finalizer()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
