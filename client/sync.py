"""Client: synchronous, thread-safe, futures and streams.

    caller ──submit()/stream()──► IOThread (iothread.py): one thread owns the socket ──► supervisor
    caller ──infer()───────────► Direct (direct.py): a socket of its own, on the caller's thread

Requests are built, and replies settled, by the Session (core.py) that AsyncClient shares.
Replies resolve concurrent.futures.Future objects; streams are iterators.
"""

from __future__ import annotations

import queue
import weakref
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FuturesTimeout
from typing import Any, Iterator

from isopool.protocol import Limits, Cancelled, IsopoolError, Unavailable, ops

from .connection import curve_keys, resolve_endpoint
from .core import LOCAL_GRACE_S, Call, Session, stream_ended, stream_part
from .calls import ControlCalls
from .iothread import IOThread
from .spread import endpoints_of, one_of


class _FutureCall(Call):
    __slots__ = ("future", "parts", "behind")

    def __init__(self, cid: Any, deadline: float, stream: bool, future: Future, parts=None, behind=None):
        super().__init__(cid, deadline, stream)
        self.future, self.parts = future, parts  # a stream's parts: a SimpleQueue its reader takes from
        self.behind = behind  # called with the cid when the stream's reader falls too far behind

    def resolve(self, value: Any) -> None:
        try:  # no done() check first: that takes the future's lock once more per call
            self.future.set_result(value)
        except InvalidStateError:  # cancelled by the caller meanwhile
            pass

    def reject(self, exc: BaseException) -> None:
        if self.parts is not None:
            self.parts.put(exc)
        try:
            self.future.set_exception(exc)
        except InvalidStateError:
            pass

    chunk = stream_part


class _CallFuture(Future):
    """A call's future: cancelling it tells the supervisor (no done-callback per call)."""

    def __init__(self, client: "Client", cid: Any):
        super().__init__()
        self._client, self._cid = client, cid

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        self._client._cancelled(self._cid)
        return True


BACKSTOP_S = 5.0  # the I/O thread answers every call by its deadline; this only guards against its death


def _wait(future: Future, timeout: float) -> Any:
    try:
        return future.result(timeout=timeout + LOCAL_GRACE_S + BACKSTOP_S)
    except FuturesTimeout:
        raise Unavailable("the client's I/O thread did not answer; the client is broken, create a new one") from None
    except KeyboardInterrupt:  # Ctrl-C: withdraw it, so its worker is told too
        future.cancel()
        raise
    finally:  # the future holds the error raised here, whose traceback holds this frame: a cycle
        del future  # that would keep the caller's request until a full collection


class Client(ControlCalls):
    """A thread-safe client of one isopool supervisor.

        with Client() as c:
            y = c.infer(x, timeout=5.0)
            f = c.submit(x)            # concurrent.futures.Future
            for part in c.stream(x): ...

    endpoint: the supervisor's (default: $ISOPOOL_ENDPOINT, else ipc:// in the per-user
    runtime directory); a list of several builds a client of all of them, which spreads
    requests by outstanding count and fails over when a daemon dies (several.py). timeout: seconds a call may take unless it says otherwise.
    arrays: "auto" (arrays come back as the kind the model returned), "numpy" or "torch".
    writable: copy numpy answers so they can be written (default: read-only views, no copy).
    shm: on this host (ipc://), arrays of the server's --shm-threshold or more go in shared
    memory the worker maps and answers come back the same way, past the supervisor's copies
    (False: always as message frames).
    retry, tenant: defaults for every infer(). curve_secret_key, curve_server_key: the key
    files for a tcp:// endpoint under CURVE. limits: what this client decodes
    (isopool.Limits; the defaults unless given). With no supervisor at the endpoint a call
    fails within a second with Unavailable.
    """

    def __new__(cls, endpoint: Any = None, **kw: Any):
        several = endpoints_of(endpoint)
        if cls is Client and several is not None:  # several daemons: spread over them (several.py)
            from .several import SeveralClient

            return SeveralClient(several, **kw)
        return super().__new__(cls)

    def __init__(self, endpoint: str | None = None, *, timeout: float = 30.0, arrays: str = "auto",
                 retry: bool = True, tenant: str | None = None, model: str | None = None,
                 curve_secret_key: str | None = None,
                 curve_server_key: str | None = None, limits: Limits | None = None, writable: bool = False,
                 shm: bool = True):
        self.endpoint = resolve_endpoint(one_of(endpoint))
        self.retry = retry
        self.tenant = tenant
        self.model = model  # the model a call names when it names none (needed when several are served)
        self._session = Session(arrays=arrays, default_timeout=timeout, limits=limits, writable=writable, shm=shm)
        self._io = IOThread(self.endpoint, self._session, curve_keys(curve_secret_key, curve_server_key))
        self._finalizer = weakref.finalize(self, self._io.close)

    def submit(self, x: Any, *, timeout: float | None = None, retry: bool | None = None,
               tenant: str | None = None, model: str | None = None) -> Future:
        return self._submit(x, timeout, retry, tenant, model=model)

    def infer(self, x: Any, *, timeout: float | None = None, retry: bool | None = None,
              tenant: str | None = None, model: str | None = None) -> Any:
        """Run the model on x and return its output. Raises an isopool.errors type on failure."""
        direct = self._io.checkout()
        if direct is None:  # closing, or DIRECT_SOCKETS other threads are in infer(): queue it
            return _wait(self._submit(x, timeout, retry, tenant, model=model), self._session.timeout_of(timeout))
        try:
            return direct.call(self._io, *self._request(x, timeout, retry, tenant, stream=False, model=model))
        finally:
            self._io.checkin(direct)

    def stream(self, x: Any, *, timeout: float | None = None, tenant: str | None = None,
               model: str | None = None) -> Iterator[Any]:
        """Yield the parts a generator handler produces, in order. Closing early cancels it."""
        parts: queue.SimpleQueue = queue.SimpleQueue()
        # retried only if its worker dies before the first part (the supervisor enforces that)
        future = self._submit(x, timeout, None, tenant, parts=parts, stream=True, model=model)
        return self._iterate(future, parts)

    def _iterate(self, future: Future, parts: queue.SimpleQueue) -> Iterator[Any]:
        finished = False
        try:
            while True:
                item = parts.get(timeout=BACKSTOP_S + self._session.default_timeout)
                finished = True  # unless it is a part: an end or an error finishes it
                if stream_ended(item):
                    return
                finished = False
                yield item
        finally:
            if not finished:
                future.cancel()

    def _request(self, x: Any, timeout: float | None, retry: bool | None, tenant: str | None,
                 stream: bool, model: str | None = None) -> tuple[Any, list, float]:
        """(id, frames, local deadline) of one infer request, encoded on the caller's thread."""
        self._session.ensure_up(self.endpoint)
        cid, frames, _, deadline = self._session.request(
            x, timeout, self.retry if retry is None else retry, tenant if tenant is not None else self.tenant, stream,
            model=model if model is not None else self.model)
        return cid, frames, deadline

    def _submit(self, x: Any, timeout: float | None, retry: bool | None, tenant: str | None,
                parts=None, stream: bool = False, model: str | None = None) -> Future:
        cid, frames, deadline = self._request(x, timeout, retry, tenant, stream, model)
        future = _CallFuture(self, cid)
        self._io.send(frames, _FutureCall(cid, deadline, stream, future, parts, self._fell_behind if stream else None))
        return future

    def _fell_behind(self, cid: Any) -> None:
        """On the I/O thread: a stream's reader is too far behind; its call ends here and at the supervisor."""
        self._session.end(cid)
        self._cancelled(cid)

    def _cancelled(self, cid: Any) -> None:
        if not self._io.closing:
            self._io.send(self._session.op_frames(ops.CANCEL, cid), None)

    def _call(self, op: str, timeout: float, **fields: Any) -> Any:
        self._session.ensure_up(self.endpoint)
        cid = next(self._session.ids)
        future: Future = Future()
        self._io.send(self._session.op_frames(op, cid, **fields),
                      _FutureCall(cid, self._session.deadline(timeout), False, future))
        return _wait(future, timeout)

    def status(self, timeout: float = 5.0) -> dict:
        """The pool's status: the same map as `isopool status --json`."""
        return self._call(ops.STATUS, timeout)

    def control(self, action: str, timeout: float = 10.0, **args: Any) -> dict:
        return self._call(ops.CONTROL, timeout, action=action, args=args)

    def models(self) -> dict:
        """The models served: name -> their status summary (`isopool models`)."""
        return self.status()["models"]

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["Client", "Cancelled", "IsopoolError"]

