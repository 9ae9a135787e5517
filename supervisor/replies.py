"""Replies to clients, bounded per client: one that does not read cannot grow the supervisor,
and no reply is dropped in silence while the client can still read it.

    core.to_clients ──► ClientOutbox ──send──► frontend ROUTER ──pipe (SNDHWM messages)──► client
                            │ the pipe is full (the client does not read)
                            ▼
                        backlog, tried again every pass (at least every RETRY_S) ──► ClientStalled
                            │                                     (STALLED_AT waiting): its new requests
                            │                                     get Overloaded, its streams are cut
                            │ past BACKLOG_BYTES, a large reply is not held:
                            │   an answer ──► a small Overloaded error for its request, in its place
                            │   a stream's part ──► dropped, and the stream cut (StreamCut): the core
                            │       cancels it and ends it with Overloaded; its later parts are dropped
                            ▼
                        past HARD_COUNT or HARD_BYTES (a client that keeps asking and never reads):
                        the oldest dropped, counted (replies_dropped)
                        empty again ──► ClientStalled(False)

So a client that reads slowly gets every answer it is owed, or a typed error in its place,
and a stream in order with no gap, ended early by an error if it came too fast. Only a
client that sends past HARD_COUNT replies without reading any loses the oldest.

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

import msgpack

from isopool.logs import client_alias, worth_a_line
from isopool.protocol import Overloaded, encode_error, ops
from isopool.protocol.transport import NOBLOCK, Outbox, data, send_frames, unbundle, wire

from .actions import ClientGone, ClientStalled, StreamCut
from .admission import stream_cut

log = logging.getLogger("isopool.supervisor")

SNDHWM = 64  # ZeroMQ messages (a bundle, up to 64 replies, is one) in the frontend's pipe to one client: counted, not sized
BACKLOG_BYTES = 64 << 20  # then replies wait here up to this many bytes; past it only small ones are held
SMALL = 4096  # a reply's bytes (past its routing id) up to which it is small: held past BACKLOG_BYTES
HARD_COUNT = 8192  # the last resort: past this many waiting here (a client that asks and never reads)...
HARD_BYTES = 2 * BACKLOG_BYTES  # ...or this many bytes, the oldest is dropped
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
        self.cut: dict[bytes, set] = {}  # each client's streams cut here, whose later parts are dropped

    def flush(self) -> None:
        if self.backlog:
            self._retry()
        if not self.pending:
            return
        pending, self.pending, self.count = self.pending, {}, 0
        for peer, messages in pending.items():
            if peer in self.backlog or peer in self.cut:  # behind what waits for it; or a cut stream's
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
        size = _size(frames)
        cut = self.cut.get(peer)
        if cut or (size > SMALL and self.backlog_bytes[peer] + size > BACKLOG_BYTES):
            for one in self._shrunk(peer, frames):
                queue.append(one)
                self.backlog_bytes[peer] += _size(one)
        else:
            queue.append(frames)
            self.backlog_bytes[peer] += size
        if peer not in self.stalled and (len(queue) >= STALLED_AT or self.backlog_bytes[peer] >= BACKLOG_BYTES // 2):
            self.stalled.add(peer)
            self.report(ClientStalled(peer, True))
        while len(queue) > HARD_COUNT or self.backlog_bytes[peer] > HARD_BYTES:
            oldest = queue.popleft()
            self.backlog_bytes[peer] -= _size(oldest)
            self.dropped += _replies_in(oldest)
            if worth_a_line(self.dropped, 1000):
                log.warning("a reply for client %s was dropped: it has not read %d waiting replies and asks for "
                            "more (%d replies dropped so far; status: replies_dropped)", client_alias(peer),
                            len(queue), self.dropped)

    def _shrunk(self, peer: bytes, frames: list) -> list[list]:
        """What is held of `frames` (a reply, or a bundle of them) for a client past its bound:
        small replies as they are; in place of a large answer, a small error for its request;
        of a stream, nothing: its part is dropped and the stream cut, as are the later parts
        of a stream cut before (until its closing error passes)."""
        kept: list[list] = []
        cut = self.cut.setdefault(peer, set())
        try:
            replies = unbundle(frames, 1)
        except ValueError:  # our own bundle: not expected; held whole rather than lost
            return [frames]
        held = self.backlog_bytes[peer]
        for reply in replies:
            body = reply[1:]
            size = _size(body)
            try:
                header = msgpack.unpackb(data(body[0]))
                op, rid = header["op"], header.get("id")
            except Exception:  # noqa: BLE001 - our own header; held as it is rather than lost
                op, rid = None, None
            key = _key(rid)
            if op == ops.CHUNK and (key in cut or (size > SMALL and held + size > BACKLOG_BYTES)):
                if key not in cut:
                    cut.add(key)
                    self.report(StreamCut(peer, rid))
                continue  # the rest of a cut stream never reaches its client: no gap, the error ends it
            if op is not None and key in cut:  # its final word: the core's error for the cut, or else the
                cut.discard(key)  # worker's, relayed before the core heard of the cut; never a success
                if op == ops.RESULT:  # after a dropped part: the stream did not come whole
                    reply = [peer, *encode_error(rid, stream_cut(None))]
            elif op is not None and size > SMALL and held + size > BACKLOG_BYTES:
                reply = [peer, *encode_error(rid, Overloaded(
                    f"this request's answer ({size} bytes) could not be held for its client, which had {held} "
                    f"bytes of replies unread (the bound is {BACKLOG_BYTES}); read replies as they come, or keep "
                    "fewer large requests in flight"))]
            kept.append(reply)
            held += _size(reply[1:])
        if not cut:
            del self.cut[peer]
        return kept

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
            if not queue and peer in self.backlog:  # (a cut stream's key stays until its final word passes)
                del self.backlog[peer], self.backlog_bytes[peer]
                if peer in self.stalled:
                    self.stalled.discard(peer)
                    self.report(ClientStalled(peer, False))

    def _error(self, peer: bytes | None, exc: zmq.ZMQError) -> None:
        if peer is None:
            return
        log.debug("replies to a departed client %s dropped: %s", client_alias(peer), exc)
        if self.backlog.pop(peer, None) is not None:
            del self.backlog_bytes[peer]
        self.cut.pop(peer, None)
        self.stalled.discard(peer)
        self.report(ClientGone(peer))

    def waiting(self) -> int:
        return sum(len(q) for q in self.backlog.values())


def _size(frames: list) -> int:
    total = 0
    for f in frames:
        total += f.nbytes if type(f) is memoryview else len(f)
    return total


def _key(rid: object) -> str:
    """A request id as a set member (an id may be a list, as msgpack gives it)."""
    return repr(rid)


def _replies_in(frames: list) -> int:
    """How many replies a held message carries (a bundle: one an entry)."""
    try:
        return len(unbundle(frames, 1))
    except ValueError:
        return 1
