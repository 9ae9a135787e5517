"""A blocking call on a socket of its own: the sync Client's fast path for infer().

Handing a request to the I/O thread and its answer back costs two thread wake-ups and, on
a small machine, a tug-of-war for the GIL: about 100 µs of a ~630 µs round trip on 2
cores. So a blocking infer() borrows one of a few sockets (IOThread.checkout), sends, and
waits for its answer on that socket, on the caller's thread.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from isopool.protocol import IsopoolError, ops
from isopool.protocol.transport import NOBLOCK, drain, messages, send_frames

from .connection import close_watched, closed_early, configure_socket, monitor_error, watch_disconnects
from .core import Call, Session, no_reply

if TYPE_CHECKING:
    from .iothread import IOThread


CANCEL_LINGER_MS = 1000  # how long closing waits for a CANCEL still on its way out (a loaded host is slow)


class _Answer(Call):
    """The outcome of one direct call."""

    __slots__ = ("value", "error")

    def __init__(self, cid: Any):
        super().__init__(cid, 0.0)
        self.value: Any = None
        self.error: BaseException | None = None

    def resolve(self, value: Any) -> None:
        self.value = value

    def reject(self, exc: BaseException) -> None:
        self.error = exc


class Direct:
    """A DEALER socket (and its monitor) that one calling thread at a time uses by itself.

    Its own connection: it sees its own disconnects and handshake refusals. A reply for an
    earlier call on it (one that timed out or was interrupted) is told apart by id and dropped."""

    def __init__(self, io: "IOThread"):
        self.sock = io.ctx.socket(zmq.DEALER)
        self.monitor = None
        try:
            configure_socket(self.sock, io.curve)
            self.monitor = watch_disconnects(self.sock)
            self.sock.connect(io.endpoint)
        except BaseException:
            self.close()
            raise
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self.poller.register(io.closed, zmq.POLLIN)

    def call(self, io: "IOThread", cid: Any, frames: list, deadline: float) -> Any:
        session, endpoint = io.session, io.endpoint
        self._dropped(io)  # a drop before this call is not this call's; a refusal is for every call
        if session.refused is not None:
            raise session.refused
        answer = _Answer(cid)
        unsent = False
        try:  # from before the send: a Ctrl-C that lands in it, or just after, still withdraws the call
            try:
                send_frames(self.sock, frames, NOBLOCK)
            except zmq.ZMQError as exc:
                unsent = True
                raise session.send_failed(endpoint, exc) from None
            session.sent(cid)
            while True:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    raise no_reply()
                try:
                    ready = dict(self.poller.poll(int(wait * 1000) + 1))
                except zmq.ContextTerminated:  # close() ran in another thread
                    raise closed_early() from None
                if self.sock in ready:
                    for reply in drain(self.sock, 64):
                        if self._settles(session, reply, answer):
                            if answer.error is not None:
                                raise answer.error
                            return answer.value
                if self.monitor in ready and (err := self._dropped(io)) is not None:
                    raise session.refused or err
                if io.closed in ready:
                    raise closed_early()
        except BaseException:  # timed out, refused, interrupted: withdraw it if it is still queued
            session.drop(cid)  # and let its shared memory go (a worker that opens it now finds it gone)
            if answer.error is None and not unsent:  # a CANCEL of an id never sent is ignored
                try:
                    send_frames(self.sock, session.op_frames(ops.CANCEL, cid), NOBLOCK)
                    # a process that ends now (Ctrl-C) still gets the CANCEL out as it closes
                    self.sock.setsockopt(zmq.LINGER, CANCEL_LINGER_MS)
                except zmq.ZMQError:
                    pass
            raise
        finally:  # the answer holds the error raised here, whose traceback holds this frame: a cycle
            answer = frames = None  # that would keep the request until a full collection

    @staticmethod
    def _settles(session: Session, frames: list, answer: _Answer) -> bool:
        for header, body, err in messages(frames, session.decode_limits):
            # undecodable: not for us to fix, the deadline still holds; another id: a late
            # answer to an earlier call on this socket
            if err is None and header["id"] == answer.cid and \
                    session.settle(answer, header["op"], body, header.get("reuse") is True):
                return True
        return False

    def _dropped(self, io: "IOThread") -> IsopoolError | None:
        """Read the monitor: the error of a dropped or refused connection, or None."""
        err = None
        try:
            while True:
                err = monitor_error(io.session, recv_monitor_message(self.monitor, zmq.NOBLOCK), io.endpoint) or err
        except zmq.Again:
            pass
        return err

    def close(self) -> None:
        close_watched(self.sock, self.monitor)
