"""AsyncClient: the same session core on pyzmq's asyncio sockets; no extra thread.

A reader task owns receiving; sends happen on the event loop's thread (one loop per
AsyncClient), gathered per turn of the loop into bundles. Futures are asyncio futures; streams are async iterators.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from isopool.protocol import Unavailable, ops
from isopool.protocol.iothread import io_context
from isopool.protocol.transport import MAX_BUNDLE, bundle

from .core import (
    END,
    Call,
    Session,
    close_watched,
    closed_early,
    configure_socket,
    curve_keys,
    on_monitor_event,
    resolve_endpoint,
    watch_disconnects,
)


class _AsyncCall(Call):
    __slots__ = ("future", "parts")

    def __init__(self, cid: Any, deadline: float, stream: bool, future: asyncio.Future, parts=None):
        super().__init__(cid, deadline, stream)
        self.future, self.parts = future, parts

    def resolve(self, value: Any) -> None:
        if not self.future.done():
            self.future.set_result(value)

    def reject(self, exc: BaseException) -> None:
        if self.parts is not None:
            self.parts.put_nowait(exc)
        if not self.future.done():
            self.future.set_exception(exc)
            self.future.exception()  # a stream's future may never be awaited; don't warn

    def chunk(self, item: Any) -> None:
        if self.parts is not None:
            self.parts.put_nowait(item)


class AsyncClient:
    """    async with AsyncClient() as c:
            y = await c.infer(x)
            async for part in c.stream(x): ...
    """

    def __init__(self, endpoint: str | None = None, *, timeout: float = 30.0, arrays: str = "auto",
                 retry: bool = True, tenant: str | None = None, curve_secret_key: str | None = None,
                 curve_server_key: str | None = None):
        self.endpoint = resolve_endpoint(endpoint)
        self.retry, self.tenant = retry, tenant
        self._session = Session(arrays=arrays, default_timeout=timeout)
        self._ctx, self._io_threads = io_context(zmq.asyncio.Context)
        self._sock = self._ctx.socket(zmq.DEALER)
        configure_socket(self._sock, curve_keys(curve_secret_key, curve_server_key))
        self._monitor = watch_disconnects(self._sock)
        self._sock.connect(self.endpoint)
        self._tasks: list[asyncio.Task] = []
        self._outgoing: list[tuple[list, Call | None]] = []
        self._closed = False

    def _ensure_tasks(self) -> None:
        if not self._tasks:
            self._tasks = [asyncio.ensure_future(self._reader()), asyncio.ensure_future(self._timer()),
                           asyncio.ensure_future(self._watch())]

    async def _reader(self) -> None:
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            self._session.on_reply(frames)

    async def _timer(self) -> None:
        while True:
            due = self._session.next_deadline()
            await asyncio.sleep(0.05 if due is None else max(0.0, min(1.0, due - time.monotonic())))
            for cid in self._session.expire(time.monotonic()):
                self._send(self._session.op_frames(ops.CANCEL, cid))

    async def _watch(self) -> None:
        while True:
            on_monitor_event(self._session, parse_monitor_message(await self._monitor.recv_multipart()),
                             self.endpoint)

    def _send(self, frames: list, call: Call | None = None) -> None:
        """Queue a message; everything queued in one turn of the event loop leaves together,
        so a gather() of many calls reaches the supervisor as one bundle."""
        if not self._outgoing:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outgoing.append((frames, call))

    def _flush(self) -> None:
        outgoing, self._outgoing = self._outgoing, []
        if self._closed:
            return  # close() has failed every pending call
        self._io_threads.observe(len(self._session.pending))
        for start in range(0, len(outgoing), MAX_BUNDLE):
            group = outgoing[start:start + MAX_BUNDLE]
            # a NOBLOCK send is tried at once: the future is already done, with any error
            sent = self._sock.send_multipart(bundle([frames for frames, _ in group]), zmq.NOBLOCK, copy=False)
            exc = sent.exception() if sent.done() else None
            if exc is not None:
                self._session.unsent([call for _, call in group if call is not None], self.endpoint, exc)

    def _start(self, frames: list, cid: Any, timeout: float, stream: bool = False, parts=None) -> asyncio.Future:
        if self._closed:
            raise Unavailable("the client is closed")
        self._ensure_tasks()
        future = asyncio.get_running_loop().create_future()
        call = _AsyncCall(cid, self._session.deadline(timeout), stream, future, parts)
        self._session.add(call)
        self._send(frames, call)
        return future

    async def infer(self, x: Any, *, timeout: float | None = None, retry: bool | None = None,
                    tenant: str | None = None) -> Any:
        s = self._session
        t = s.timeout_of(timeout)
        cid = next(s.ids)
        frames = s.infer_frames(x, cid, t, self.retry if retry is None else retry, False,
                                tenant if tenant is not None else self.tenant)
        future = self._start(frames, cid, t)
        try:
            return await future
        except asyncio.CancelledError:
            self._cancel(cid)
            raise

    async def stream(self, x: Any, *, timeout: float | None = None, tenant: str | None = None) -> AsyncIterator[Any]:
        s = self._session
        t = s.timeout_of(timeout)
        cid = next(s.ids)
        parts: asyncio.Queue = asyncio.Queue()
        frames = s.infer_frames(x, cid, t, self.retry, True, tenant if tenant is not None else self.tenant)
        self._start(frames, cid, t, stream=True, parts=parts)
        finished = False
        try:
            while True:
                item = await parts.get()
                if item is END:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
        finally:
            if not finished:
                self._cancel(cid)

    def _cancel(self, cid: Any) -> None:
        if self._session.pending.pop(cid, None) is not None and not self._closed:
            self._send(self._session.op_frames(ops.CANCEL, cid))

    async def _call(self, op: str, timeout: float, **fields: Any) -> Any:
        cid = next(self._session.ids)
        return await self._start(self._session.op_frames(op, cid, **fields), cid, timeout)

    async def status(self, timeout: float = 5.0) -> dict:
        return await self._call(ops.STATUS, timeout)

    async def control(self, action: str, timeout: float = 10.0, **args: Any) -> dict:
        return await self._call(ops.CONTROL, timeout, action=action, args=args)

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
        self._session.fail_all(closed_early())
        close_watched(self._sock, self._monitor)
        self._ctx.term()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
