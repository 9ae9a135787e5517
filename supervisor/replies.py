"""Replies to clients, bounded per client: one that does not read cannot grow the supervisor.

    core.to_clients ──► ClientOutbox ──send──► frontend ROUTER ──pipe (SNDHWM messages)──► client
                            │ the pipe is full (the client does not read)
                            ▼
                        backlog (at most BACKLOG messages, BACKLOG_BYTES) ──► ClientStalled (STALLED_AT
                            │ over the bound: the oldest dropped, counted       waiting): its new requests
                            ▼                                                   get Overloaded
                        tried again every pass (at least every RETRY_S); empty again ──► ClientStalled(False)

The frontend is ROUTER_MANDATORY, so a send to a full pipe fails at once (EAGAIN) instead of
queueing without bound, and a send to a client that has gone fails too (EHOSTUNREACH):
that is how the supervisor learns of a disconnect (ClientGone), and drops and cancels the
client's requests.
"""

from __future__ import annotations

import errno
import logging
from collections import deque
from typing import Callable

import zmq

from isopool.logs import worth_a_line
from isopool.protocol.transport import NOBLOCK, Outbox, send_frames, wire

from .actions import ClientGone, ClientStalled

log = logging.getLogger("isopool.supervisor")

SNDHWM = 256  # ZeroMQ messages (a bundle, up to 64 replies, is one) in the frontend's pipe to one client
BACKLOG = 1024  # and then at most this many more waiting here...
BACKLOG_BYTES = 64 << 20  # ...holding at most this much
STALLED_AT = 256  # waiting here this many (or half the bytes): the client is not reading; fewer is a burst
RETRY_S = 0.002  # while replies wait here, the loop looks again this often


class ClientOutbox(Outbox):
    def __init__(self, sock: zmq.Socket, report: Callable[[object], None]):
        super().__init__(sock, routed=True, on_error=self._error)
        self.report = report  # called with ClientStalled / ClientGone for the core
        self.backlog: dict[bytes, deque] = {}
        self.backlog_bytes: dict[bytes, int] = {}
        self.dropped = 0  # replies dropped: over a stalled client's bound
        self.stalled: set[bytes] = set()  # clients reported stalled

    def flush(self) -> None:
        if self.backlog:
            self._retry()
        if not self.pending:
            return
        pending, self.pending, self.count = self.pending, {}, 0
        for peer, messages in pending.items():
            if peer in self.backlog:  # behind what already waits for it, in order
                for frames in wire(messages, self.at):
                    self._hold(peer, frames)
                continue
            self._send(peer, messages)

    def _send(self, peer: bytes, messages: list) -> None:
        out = wire(messages, self.at)
        for frames in out:
            try:
                send_frames(self.sock, frames, NOBLOCK)
            except zmq.ZMQError as exc:
                if exc.errno != errno.EAGAIN:
                    self._error(peer, exc)
                    return
                self._hold(peer, frames)
                for rest in out:
                    self._hold(peer, rest)
                return

    def _hold(self, peer: bytes, frames: list) -> None:
        queue = self.backlog.get(peer)
        if queue is None:
            self.backlog[peer] = queue = deque()
            self.backlog_bytes[peer] = 0
        queue.append(frames)
        self.backlog_bytes[peer] += _size(frames)
        if peer not in self.stalled and (len(queue) >= STALLED_AT or self.backlog_bytes[peer] >= BACKLOG_BYTES // 2):
            self.stalled.add(peer)
            self.report(ClientStalled(peer, True))
        while len(queue) > BACKLOG or self.backlog_bytes[peer] > BACKLOG_BYTES:
            self.backlog_bytes[peer] -= _size(queue.popleft())
            self.dropped += 1
            if worth_a_line(self.dropped, 1000):
                log.warning("a reply for client %r was dropped: it has not read %d waiting replies (%d replies "
                            "dropped so far; status: replies_dropped)", peer, len(queue), self.dropped)

    def _retry(self) -> None:
        for peer, queue in list(self.backlog.items()):
            while queue:
                try:
                    send_frames(self.sock, queue[0], NOBLOCK)
                except zmq.ZMQError as exc:
                    if exc.errno == errno.EAGAIN:
                        break
                    self._error(peer, exc)
                    break
                self.backlog_bytes[peer] -= _size(queue.popleft())
            if not queue and peer in self.backlog:
                del self.backlog[peer], self.backlog_bytes[peer]
                if peer in self.stalled:
                    self.stalled.discard(peer)
                    self.report(ClientStalled(peer, False))

    def _error(self, peer: bytes | None, exc: zmq.ZMQError) -> None:
        if peer is None:
            return
        log.debug("replies to a departed client %r dropped: %s", peer, exc)
        if self.backlog.pop(peer, None) is not None:
            del self.backlog_bytes[peer]
        self.stalled.discard(peer)
        self.report(ClientGone(peer))

    def waiting(self) -> int:
        return sum(len(q) for q in self.backlog.values())


def _size(frames: list) -> int:
    total = 0
    for f in frames:
        total += f.nbytes if type(f) is memoryview else len(f)
    return total
