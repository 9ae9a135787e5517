"""What the sync and asyncio clients share: ids, the pending table, replies and deadlines.

    caller ──infer_frames()──► transport (I/O thread | asyncio task) ───DEALER──► supervisor
    caller ◄──Call.resolve/reject/chunk── Session.on_reply() ◄──────────────────── replies

A transport owns the socket and calls Session.on_reply, Session.expire and Session.fail_all.
The sync client's blocking infer() is its own transport for one call: it reads its own
socket and hands the answer to Session.settle, never touching the pending table.
Every pending call has a deadline; nothing waits forever, even if the supervisor is gone.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import os
import threading
import time
from typing import Any

from isopool.protocol import (
    CLIENT_LIMITS,
    DEFAULT_LIMITS,
    BadRequest,
    Limits,
    IsopoolError,
    Overloaded,
    RequestTimeout,
    Unavailable,
    decode_error,
    decode_payload,
    encode_payload,
    ops,
    pack_header,
    total_bytes,
)
from isopool.protocol.shm import Spill

from .segments import Lease, Pool, Segments
from isopool.protocol.transport import MAX_BUNDLE, bundle, cuts, messages

from .connection import CONNECT_S, not_running

# How long past its timeout a request may go unanswered before the client gives up on
# its own: the supervisor answers at the deadline; this covers a supervisor that is gone.
LOCAL_GRACE_S = 0.25
COMPACT_ABOVE = 4096  # answered calls' timer entries tolerated before the heap is rebuilt
END = object()  # end-of-stream marker passed to Call.chunk
MAX_STREAM_BEHIND = 1024  # parts of a stream received and not yet read: past it the stream is cancelled


def stream_part(call: Any, item: Any) -> None:
    """Call.chunk for a transport's call with `parts` (a queue its reader takes from) and
    `behind` (cancels it here and at the supervisor). Parts not yet read are held in memory:
    past MAX_STREAM_BEHIND the stream is cancelled (the worker stops at its next part), and the
    reader gets Overloaded after the parts that came."""
    parts = call.parts
    if parts is None:
        return
    if parts.qsize() >= MAX_STREAM_BEHIND:
        call.reject(Overloaded(f"this stream's reader fell {MAX_STREAM_BEHIND} parts behind the model, so the "
                               "stream was cancelled (parts not yet read are held in memory, and a reader that "
                               "stopped would hold them without end); read its parts as they come"))
        call.parts = None
        if call.behind is not None:
            call.behind(call.cid)
        return
    parts.put_nowait(item)


class Call:
    """One pending request. Transports subclass it to resolve their kind of future."""

    __slots__ = ("cid", "deadline", "stream")

    def __init__(self, cid: Any, deadline: float, stream: bool = False):
        self.cid, self.deadline, self.stream = cid, deadline, stream

    def resolve(self, value: Any) -> None:
        raise NotImplementedError

    def reject(self, exc: BaseException) -> None:
        raise NotImplementedError

    def chunk(self, item: Any) -> None:
        """A stream's part (calls that stream take it); for one that is no stream, an honest
        pool sends none (the supervisor replaces a worker that tries), so it is ignored."""


SMALL_BYTES = 1 << 20  # requests this small are under any server's limits: no need to know them


class _Hello(Call):
    __slots__ = ("session",)

    def __init__(self, cid: Any, deadline: float, session: "Session"):
        super().__init__(cid, deadline)
        self.session = session

    def resolve(self, value: Any) -> None:
        known = {f.name for f in dataclasses.fields(Limits)}
        got = value.get("limits") if isinstance(value, dict) else None
        if isinstance(got, dict):
            self.session.limits = Limits(**{k: v for k, v in got.items() if k in known and type(v) is int})
        shm = value.get("shm") if isinstance(value, dict) else None
        # shared memory only where the server sees us as we are: this host, our own pid namespace
        if self.session.use_shm and isinstance(shm, dict) and shm.get("pid") == os.getpid() \
                and type(shm.get("threshold")) is int and shm["threshold"] > 0:
            self.session.shm_threshold = shm["threshold"]
        self.session.limits_known.set()

    def reject(self, exc: BaseException) -> None:
        self.session.limits_known.set()  # an older server: keep the defaults

    def chunk(self, item: Any) -> None:
        pass


class Session:
    def __init__(self, arrays: str = "auto", default_timeout: float = 30.0, limits: Limits | None = None,
                 writable: bool = False, shm: bool = True):
        self.arrays = arrays
        self.readonly = not writable  # numpy answers: read-only views (no copy) unless writable
        # what we decode: our own limits (the server's apply to what we send)
        self.decode_limits = CLIENT_LIMITS if limits is None else dataclasses.replace(limits, holder="client")
        self.default_timeout = default_timeout
        self.ids = itertools.count(1)  # next() is atomic under the GIL: safe from many threads
        self.pending: dict[Any, Call] = {}
        self.timers: list[tuple[float, Any]] = []
        self.refused: IsopoolError | None = None  # the server refused our handshake: say so every time
        self.limits = DEFAULT_LIMITS  # the server's, once its answer to our hello has come
        self.limits_known = threading.Event()
        self.greeting: Call | None = None  # our hello, until the server answers it
        self.up = threading.Event()  # the connection's handshake is done, and it has not dropped since
        self.use_shm = shm  # large arrays in shared memory, if the server offers it (protocol/shm.py)
        self.shm_threshold = 0  # from the server's answer to our hello: 0 until then, or if it offers none
        self.segments: dict[Any, Segments] = {}  # call id -> its shared memory, until the call ends
        self.pool = Pool()  # the segments between calls

    def ensure_up(self, endpoint: str) -> None:
        """Wait up to CONNECT_S for the connection to the supervisor; Unavailable if none comes."""
        if not self.up.is_set() and not self.up.wait(CONNECT_S):
            raise self.refused or not_running(endpoint)

    def send_failed(self, endpoint: str, exc: Exception) -> IsopoolError:
        """The error for a send that could not go out: the refusal if there was one."""
        return self.refused or Unavailable(
            f"could not send to {endpoint}: {exc}. No connection is up: the supervisor may be gone, or it "
            "may have refused this client's security handshake (CURVE keys)", endpoint=endpoint)

    def unsent(self, calls, endpoint: str, exc: Exception) -> None:
        """Fail the calls of a send that could not go out (those not already answered)."""
        err = self.send_failed(endpoint, exc)
        for call in calls:
            if self.end(call.cid) is not None:
                call.reject(err)

    def request(self, x: Any, timeout: float | None, retry: bool, tenant: str | None,
                stream: bool, wait: bool = True, model: str | None = None,
                lease: Lease | None = None) -> tuple[Any, list, float, float]:
        """(id, frames, timeout, local deadline) of one infer request, encoded on the caller's
        thread; both clients build every request here. `lease`: shared memory the caller
        filled, where x's large arrays may lie already (lease())."""
        t = self.timeout_of(timeout)
        cid = next(self.ids)
        frames = self.infer_frames(x, cid, t, retry, stream, tenant, model, t if wait else 0.0, lease)
        try:
            self.check_size(frames, t if wait else 0.0)
        except BaseException:
            self.drop(cid)
            raise
        return cid, frames, t, self.deadline(t)

    def check_size(self, frames: list, wait_s: float) -> None:
        """Refuse here what the server would refuse: a message over its max_message_bytes would
        make ZeroMQ drop the connection, failing every other call on it. A large request waits
        up to `wait_s` for the server's answer to our hello, to know its limits (the asyncio
        client cannot wait on its own loop: before that answer it checks the default limits)."""
        size = total_bytes(frames)
        if size <= SMALL_BYTES:
            return
        if wait_s:
            self.limits_known.wait(wait_s)
        limit = self.limits.max_message_bytes
        if size > limit:
            raise BadRequest(f"this request is {size} bytes, over the server's max_message_bytes={limit}; send "
                             "less, or raise --max-message-bytes on the server", setting="max_message_bytes",
                             size=size, limit=limit)

    def hello(self) -> list:
        """The frames of our hello: the server's answer gives its limits. It is no call of the
        caller's: it waits apart from `pending` (and so is never counted as work in flight)."""
        self.greeting = _Hello(next(self.ids), 0.0, self)
        return self.op_frames(ops.HELLO, self.greeting.cid)

    def infer_frames(self, value: Any, cid: Any, timeout: float, retry: bool, stream: bool,
                     tenant: str | None, model: str | None = None, wait_s: float = 0.0,
                     lease: Lease | None = None) -> list:
        fields: dict[str, Any] = {"timeout": timeout, "bundles": True}  # we read bundled replies
        if not retry:
            fields["retry"] = False
        if stream:
            fields["stream"] = True
        if tenant is not None:
            fields["tenant"] = tenant
        if model is not None:
            fields["model"] = model
        payload = encode_payload(value)
        if self.use_shm and len(payload) > 1 and max(map(len, payload[1:])) >= (self.shm_threshold or SMALL_BYTES):
            if wait_s and not self.limits_known.is_set():  # does the server offer shared memory?
                self.limits_known.wait(wait_s)
            if self.shm_threshold:
                home = lease
                spill = Spill(self.shm_threshold, home.view if home is not None else None)
                payload = encode_payload(value, spill)
                if spill.away:  # an array outside the lease: all of them go by copy, as any call's
                    home, spill = None, Spill(self.shm_threshold)
                    payload = encode_payload(value, spill)
                if spill.parts or (home is not None and spill.size):
                    try:
                        segments = Segments(spill, self.pool, home)
                    except OSError:  # no fd or memory for a segment now: this call's arrays go as frames
                        payload = encode_payload(value)
                    else:
                        self.segments[cid] = segments
                        fields["shm"] = segments.header()
        # a lease the call does not name stays unreusable: frames of its smaller arrays may refer
        # to it until ZeroMQ has sent them, and it is closed, never written again (Lease)
        return [pack_header(ops.INFER, cid, **fields), *payload]

    def lease(self, size: int) -> Lease | None:
        """`size` bytes of shared memory for the caller to fill and name in a request (the HTTP
        gateway reads a large body into it), or None where the server takes no shared memory
        from us (not on this host, not offered, or not known yet)."""
        if not (self.use_shm and self.shm_threshold and size >= self.shm_threshold):
            return None
        return Lease(self.pool, size)

    def sent(self, cid: Any) -> None:
        """A call is on its way: while its answer is being made, look at what its out segment
        kept from an earlier answer (client/segments.py), work that no answer waits on."""
        segments = self.segments.get(cid) if self.segments else None
        if segments is not None:
            segments.settle()

    def drop(self, cid: Any) -> None:
        """Let go of a call's shared memory (its answer came, or it was given up)."""
        segments = self.segments.pop(cid, None) if self.segments else None
        if segments is not None:
            segments.close()

    def end(self, cid: Any) -> Call | None:
        """Take a call out of the pending table (it is answered or given up), with its memory."""
        self.drop(cid)
        return self.pending.pop(cid, None)

    def op_frames(self, op: str, cid: Any, **fields: Any) -> list:
        return [pack_header(op, cid, **fields), b"\xc0"]  # payload: msgpack nil

    def timeout_of(self, timeout: float | None) -> float:
        t = self.default_timeout if timeout is None else float(timeout)
        if not t > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        return t

    # ---- called by the transport, on its own thread or task

    def add(self, call: Call) -> None:
        self.pending[call.cid] = call
        heapq.heappush(self.timers, (call.deadline, call.cid))
        if len(self.timers) > 2 * len(self.pending) + COMPACT_ABOVE:
            # answered calls leave the heap only from its top: behind one slow call they pile up
            self.timers = [(c.deadline, c.cid) for c in self.pending.values()]
            heapq.heapify(self.timers)

    def on_reply(self, frames: list) -> None:
        """One ZeroMQ message from the supervisor: a reply, or a bundle of them."""
        pending = self.pending
        for header, body, err in messages(frames, self.decode_limits):
            if err is not None:
                continue  # not for us to fix; the callers' deadlines still hold
            call = pending.get(header["id"])
            if call is None:
                greeting = self.greeting
                if greeting is not None and header["id"] == greeting.cid:
                    self.greeting = None
                    self.settle(greeting, header["op"], body)
                continue  # else already timed out or cancelled
            if self.settle(call, header["op"], body, header.get("reuse") is True):
                pending.pop(call.cid, None)  # settle let go of its memory

    def settle(self, call: Call, op: str, body: list, reuse: bool = False) -> bool:
        """Hand one reply to its call; True when that was the call's final answer. Touches no
        shared state: a thread that reads its own socket (the sync Client's infer) calls it too."""
        if op == ops.ERROR:
            self.drop(call.cid)
            call.reject(decode_error(body))
            return True
        segments = self.segments.pop(call.cid, None) if self.segments and op != ops.CHUNK else None
        try:
            segment = segments.answer(reuse) if segments is not None else None
            value = decode_payload(body, arrays=self.arrays, limits=self.decode_limits, readonly=self.readonly,
                                   segment=segment)
        except IsopoolError as err:
            call.reject(err)
            return True
        if op == ops.CHUNK:
            call.chunk(value)
            return False
        if call.stream:
            call.chunk(END)
        call.resolve(value)
        return True

    def next_deadline(self) -> float | None:
        while self.timers and self.timers[0][1] not in self.pending:
            heapq.heappop(self.timers)
        return self.timers[0][0] if self.timers else None

    def expire(self, now: float) -> list[Any]:
        """Reject calls past deadline + grace; returns their ids so the transport can cancel them."""
        expired = []
        while self.timers and self.timers[0][0] <= now:
            _, cid = heapq.heappop(self.timers)
            call = self.end(cid)
            if call is not None:
                call.reject(no_reply())
                expired.append(cid)
        return expired

    def close(self, err: IsopoolError) -> None:
        """The client is closing: every call fails with `err`, and the idle segments go."""
        self.fail_all(err)
        self.pool.close()

    def fail_all(self, err: IsopoolError) -> None:
        calls, self.pending = self.pending, {}
        self.timers.clear()
        for cid in list(self.segments):
            self.drop(cid)
        for call in calls.values():
            call.reject(err)

    @staticmethod
    def deadline(timeout: float) -> float:
        return time.monotonic() + timeout + LOCAL_GRACE_S



def stream_ended(item: Any) -> bool:
    """One item a stream's call delivered: True at its end, raised if it is an error."""
    if item is END:
        return True
    if isinstance(item, BaseException):
        raise item
    return False


def send_bundled(session: Session, endpoint: str, outgoing, send, add: bool) -> None:
    """Send the queued (frames, call) pairs of `outgoing` (a deque), bundled (cuts()): a burst
    costs one wake-up per hop. `send(frames)` returns the error of a send that could
    not go out (its calls fail with it), or None; with `add`, the calls join the session
    as they leave (the sync client's I/O thread; the async client adds them when made)."""
    while outgoing:
        group = [outgoing.popleft() for _ in range(min(MAX_BUNDLE, len(outgoing)))]
        messages = [frames for frames, _ in group]
        for start, end, sizes in cuts(messages):
            calls = [call for _, call in group[start:end] if call is not None]
            if add:
                for call in calls:
                    session.add(call)
            exc = send(bundle(messages[start:end], sizes=sizes))
            if exc is not None:
                session.unsent(calls, endpoint, exc)
            elif session.segments:
                for call in calls:
                    session.sent(call.cid)


def no_reply() -> RequestTimeout:
    """The error of a call whose deadline (and grace) passed with no answer from the supervisor."""
    return RequestTimeout("no reply from the supervisor in time; it may be overloaded or gone. "
                          "Check `isopool status`, or raise timeout=", setting="timeout", started=None)
