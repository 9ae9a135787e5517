"""The HTTP connection of a gateway: uvicorn's httptools protocol, guarded.

What uvicorn leaves unbounded is bounded here, each by a named limit: a request's headers
must arrive within the client timeout (--http-client-timeout) of its first byte (or of the
connection, for the first request), else 408 and the connection is closed; a body that
pauses longer than it is a 408 too (app.App.body); a client behind on reading its answer
must take MIN_BODY_RATE bytes a second over each client timeout; an idle keep-alive
connection is closed KEEP_ALIVE_S after its last answer; at most MAX_PIPELINE requests are
read ahead of their answers; trailers count as headers; past MAX_CONNECTIONS open at once,
a new one gets 503. Each response goes in one write (OneWrite), and a large binary infer
body is read by the kernel straight into shared memory (body.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import struct
import termios

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from isopool.logs import worth_a_line

from .app import HEADER_LENGTH, MIN_BODY_RATE, resolve
from .body import ALIGN, BODY_KEY, DIRECT_BYTES, BodyReader, DirectBody
from .hangup import HANGUP_KEY

log = logging.getLogger("isopool.gateway")
KEEP_ALIVE_S = 5
MAX_CONNECTIONS = 4096
MAX_PIPELINE = 64  # requests read ahead of their answers on one connection; past it the connection
# stops reading and closes once they are answered (a client resends the rest on a new one)


class Refused(Exception):
    """Raised from a parser callback to stop reading a connection (GuardedHttp.refuse)."""


class OneWrite:
    """A connection's transport that sends a response's head and body in one write.

    uvicorn writes a response's head when the app starts it and its body when the app sends
    it: two send() calls, and on loopback two trips through the TCP stack and often two
    wake-ups of the client. Here a response's head (a write that begins b"HTTP/") is held
    until the next write, which takes it along (writelines: one writev), or until the loop's
    next turn, whichever is first; a body of ALONE bytes or more goes by itself, the head
    just before it (beside it a second write is noise, and write() is the transport's best
    path for a big buffer). Every other write goes at once, as before, so only a head ever
    waits, and never past the turn it was written in; closing, or the peer's end of its
    stream (GuardedHttp.eof_received), sends it first. Everything else is the transport's
    own. It relies on uvicorn writing only through the transport it was given (0.55 does:
    the head, then each body part); were a later uvicorn to write a response in one go,
    only the saving would go.
    """

    ALONE = 1 << 16
    __slots__ = ("_transport", "_loop", "_held", "written")

    def __init__(self, transport, loop) -> None:
        self._transport, self._loop, self._held = transport, loop, None
        self.written = 0  # bytes handed to the transport (GuardedHttp.writes_late)

    def write(self, data) -> None:
        if self._transport.is_closing():  # aborted under a task that was about to write: nothing to say
            return
        size = data.nbytes if type(data) is memoryview else len(data)
        self.written += size
        held = self._held
        if held is not None:
            self._held = None
            if size >= self.ALONE:
                self._transport.write(held)
                self._transport.write(data)
            else:
                self._transport.writelines((held, data))
        elif type(data) is bytes and data.startswith(b"HTTP/"):
            self._held = data
            self._loop.call_soon(self.release)
        else:
            self._transport.write(data)

    def release(self) -> None:
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def writelines(self, chunks) -> None:
        if self._transport.is_closing():
            return
        chunks = list(chunks)
        self.written += sum(c.nbytes if type(c) is memoryview else len(c) for c in chunks)
        self.release()
        self._transport.writelines(chunks)

    def write_eof(self) -> None:
        self.release()
        self._transport.write_eof()

    def close(self) -> None:
        self.release()
        self._transport.close()

    def pending(self) -> int:
        """Bytes written and not yet taken by the kernel (a held head included)."""
        return self._transport.get_write_buffer_size() + (len(self._held) if self._held is not None else 0)

    def unsent(self, fd: int) -> int:
        """pending(), plus what the kernel holds of it that the peer has not taken (SIOCOUTQ)."""
        try:
            queued = struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        except OSError:
            queued = 0
        return self.pending() + queued

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


async def upgrade_with_body(scope, receive, send) -> None:
    """The answer to a request with a body that asks to upgrade the connection: httptools reads
    no body after such headers, so the app would see none; it is refused, saying why."""
    body = (b'{"error":"the request asks to upgrade the connection (Connection: Upgrade), which this server '
            b'does not do, and its body cannot be read then: send it without the Upgrade header"}')
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class GuardedHttp(HttpToolsProtocol):
    """uvicorn's httptools protocol with the bounds this module's docstring lists (uvicorn has
    none of them), each response sent in one write (OneWrite), and a large binary infer body
    read by the kernel straight into shared memory (body.py)."""

    direct_app = None  # the App, set at start: its client lends the shared memory (body.py)
    direct: DirectBody | None = None  # the body being read into shared memory, if any
    no_lease = 0  # bodies that found no shared memory (a flood of them logs one line in many)
    slow_readers = 0  # connections cut for not reading their answers (as no_lease, for the log)
    header_timer = None
    timeout_s = 10.0  # set from --http-client-timeout at start
    MAX_HEAD = 64 << 10  # bytes of a request line and headers (httptools joins them at a cost that grows faster)
    head_bytes = 0  # of the request whose headers are coming; -1 while a body is
    peer_done = False  # the peer ended its side of the connection, with an answer owed
    rest_timer = None  # the rest of a body after its early answer must come by this
    write_timer = None  # while answer bytes wait for a peer that reads them too slowly
    write_mark = (0, 0)  # (bytes written, bytes the peer has not taken) when write_timer was set
    fd = -1  # the connection's socket
    idle_since = None  # loop time since when nothing is owed either way: the keep-alive time runs from here
    deaf = False  # reading stopped for good (stop_reading): answer what was read, then close
    refused: str | None = None  # why a parser callback stopped reading (refuse)
    trailer_bytes = 0  # of the trailers of the chunked body being read

    def connection_made(self, transport) -> None:
        self.running: list = []  # the requests read on this connection and not yet answered, in order
        super().connection_made(OneWrite(transport, self.loop))
        sock = transport.get_extra_info("socket")
        self.fd = sock.fileno() if sock is not None else -1
        self.header_timer = self.loop.call_later(self.timeout_s, self.headers_late, False)

    def data_received(self, data: bytes) -> None:
        if self.deaf:  # its parser stopped: nothing more is read (stop_reading)
            return
        if self.head_bytes >= 0:
            room = self.MAX_HEAD - self.head_bytes
            self.head_bytes += len(data)
            # past the limit, unless the headers end within it (a body may come in the same read)
            if self.head_bytes > self.MAX_HEAD and data.find(b"\r\n\r\n", 0, max(0, room) + 4) < 0:
                if self.owed():  # a 431 now would land inside an answer still being written
                    self.stop_reading(f"the request line and headers are over {self.MAX_HEAD} bytes")
                    return
                body = b'{"error":"the request line and headers are over %d bytes"}' % self.MAX_HEAD
                self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: "
                                     b"application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
                                     % (len(body), body))
                self.transport.close()
                return
        if not self.feed(data):
            return
        if self.direct is not None and not self.direct.complete and not self.transport.is_closing():
            self.read_body_directly()
        self.watch_idle()

    def feed(self, data: bytes) -> bool:
        """uvicorn's data_received, except where the parser cannot go on: after a callback
        refused the connection (refuse) or an upgrade (which this server never makes), reading
        stops; a parse error is a 400, as in uvicorn. False where the parser stopped."""
        self._unset_keepalive_if_required()
        self.refused = None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.stop_reading("it asked to upgrade the connection, which this server does not do")
            return False
        except httptools.HttpParserError:  # a callback's exception comes wrapped as one
            if self.refused is not None:
                self.stop_reading(self.refused)
            elif self.head_bytes >= 0 and self.owed():
                # garbage after whole requests: they are answered (a 400 written now would go
                # before their answers, and the close after it lost them), then the connection closes
                self.stop_reading("invalid HTTP after the requests before it")
            else:
                log.debug("connection from %s: invalid HTTP, answered 400", self.client)
                self.send_400_response("Invalid HTTP request received.")
            return False
        return True

    def owed(self) -> bool:
        """An answer is still owed on this connection (being made, or pipelined)."""
        return bool(self.pipeline) or (self.cycle is not None and not self.cycle.response_complete)

    def refuse(self, why: str) -> None:
        """From a parser callback: stop reading this connection (feed)."""
        self.refused = why
        raise Refused(why)

    def stop_reading(self, why: str) -> None:
        """Read no more: what was read is answered, then the connection closes (at once if
        nothing is owed)."""
        log.debug("connection from %s: %s; reading no more of it", self.client, why)
        self.deaf = self.peer_done = True
        self.flow.pause_reading()
        cycle = self.cycle
        # mid-request (a body's trailers), the rest can never come: its app hears the disconnect
        if cycle is None or self.head_bytes < 0 or cycle.response_complete and not self.pipeline:
            self.transport.close()
            return
        last = self.pipeline[0][0] if self.pipeline else cycle  # the last answer says "connection: close"
        last.keep_alive = False

    def watch_idle(self) -> None:
        """Every byte stops uvicorn's keep-alive timer, and only an answer's end starts it
        again. So bytes that begin no request (a stray CRLF after an answer) or the rest of a
        body whose answer went early (a 404 before it was read) left the connection open for
        good, without a timer. Once the connection waits for nothing but the next request, the
        keep-alive timer runs again, for what is left of the keep-alive time since the last
        answer (bytes that begin no request buy none); the rest of an answered body has one
        client timeout, in all, to arrive."""
        if self.transport.is_closing() or self.header_timer is not None or self.timeout_keep_alive_task is not None:
            return
        cycle = self.cycle
        if cycle is None or not cycle.response_complete or self.pipeline:  # an answer is owed: its end starts it
            return
        if self.head_bytes < 0:  # within a body its answer no longer reads
            if self.rest_timer is None:
                self.rest_timer = self.loop.call_later(self.timeout_s, self.timeout_keep_alive_handler)
            return
        since = self.idle_since if self.idle_since is not None else self.loop.time()
        self.timeout_keep_alive_task = self.loop.call_later(max(0.0, since + self.timeout_keep_alive - self.loop.time()),
                                                            self.timeout_keep_alive_handler)

    def stop_rest_timer(self) -> None:
        if self.rest_timer is not None:
            self.rest_timer.cancel()
            self.rest_timer = None

    def on_message_complete(self) -> None:
        self.head_bytes = self.trailer_bytes = 0  # the next request's headers may follow (pipelined: in this same read)
        self.stop_rest_timer()
        if self.cycle is not None and self.cycle.response_complete:  # answered early: idle from now
            self.idle_since = self.loop.time()
        self.end_direct("the request ended before its body")  # all of it came through the parser, or none will
        super().on_message_complete()

    def end_direct(self, why: str) -> None:
        direct, self.direct = self.direct, None
        if direct is not None and not direct.complete:
            direct.fail(why)  # the app's wait ends (400), and the lease goes

    def on_body(self, body: bytes) -> None:
        if self.direct is not None:
            self.direct.write(body)
        else:
            super().on_body(body)

    def eof_received(self):
        """The peer ended its stream. A peer that half-closes after its request (`nc -N`,
        `shutdown(SHUT_WR)`) still reads: while an answer is owed, the connection stays open
        for it (True), and closes once it and any pipelined behind it are sent. Otherwise
        uvloop closes the connection when this returns, so a held head leaves first."""
        self.transport.release()
        if self.cycle is not None and not self.cycle.response_complete and not self.transport.is_closing():
            self.peer_done = True
            return True
        return super().eof_received()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.idle_since = self.loop.time()
        if self.pipeline or self.deaf:  # uvicorn reads on after each answer: requests read ahead stay bounded
            self.flow.pause_reading()
        if self.write_timer is None and self.transport.pending():  # the peer has not taken what we wrote
            self.watch_writes()
        if self.peer_done and not self.pipeline and self.cycle.response_complete and not self.transport.is_closing():
            self.transport.close()  # (the answer just sent may have started the last one read)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_bytes >= 0:
            super().on_header(name, value)
            return
        # a trailer of a chunked body: the app takes none, and uvicorn kept each, unbounded
        self.trailer_bytes += len(name) + len(value) + 4
        if self.trailer_bytes > self.MAX_HEAD:
            self.refuse(f"the trailers of a chunked body are over {self.MAX_HEAD} bytes")

    def on_message_begin(self) -> None:
        if len(self.pipeline) >= MAX_PIPELINE:
            self.refuse(f"over {MAX_PIPELINE} requests read ahead of their answers")
        super().on_message_begin()
        self.idle_since = None
        self.stop_header_timer()
        self.header_timer = self.loop.call_later(self.timeout_s, self.headers_late, True)

    def on_headers_complete(self) -> None:
        self.stop_header_timer()
        self.head_bytes = -1
        limit = self.limit_concurrency  # past it uvicorn answers 503 itself: no app reads the body
        served = limit is None or (len(self.connections) < limit and len(self.tasks) < limit)
        if self.parser.should_upgrade() and any(name in (b"content-length", b"transfer-encoding")
                                                and value not in (b"0", b"") for name, value in self.headers):
            app, self.app = self.app, upgrade_with_body  # the parser skips the body of an upgrade
            try:
                super().on_headers_complete()
            finally:
                self.app = app
        else:
            super().on_headers_complete()
        running = self.running
        if running and running[0].response_complete:  # the answered ones go (each connection keeps a few)
            self.running = running = [c for c in running if not c.response_complete]
        running.append(self.cycle)
        if self.cycle is not None:  # what to call if this request's client hangs up (hangup.py)
            self.scope.setdefault("extensions", {})[HANGUP_KEY] = self.cycle.on_hangup = []
        if served and self.cycle is not None and not self.pipeline and self.scheme == "http" \
                and self.direct_app is not None and not self.parser.should_upgrade():
            self.direct = self.direct_body()
            if self.direct is not None:
                self.scope.setdefault("extensions", {})[BODY_KEY] = self.direct
                if self.cycle.waiting_for_100_continue:  # the app never asks for this body: it comes anyway
                    self.cycle.waiting_for_100_continue = False
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def direct_body(self) -> DirectBody | None:
        """A DirectBody for this request if it is a large binary infer (body.py), else None."""
        app, headers = self.direct_app, dict(self.headers)
        length, header_length = headers.get(b"content-length", b""), headers.get(HEADER_LENGTH, b"")
        if self.scope["method"] != "POST" or not length.isdigit() or not header_length.isdigit() \
                or b"transfer-encoding" in headers:
            return None
        length, header_length = int(length), int(header_length)
        if not DIRECT_BYTES <= length <= app.max_body or header_length > length \
                or resolve(self.scope["path"])[0] != "/v2/models/{name}/infer":
            return None
        if app.tokens is not None and app.tokens.role(headers.get(b"authorization")) is None:
            return None  # a client without a token reads its 401 as uvicorn reads the body: into nothing
        try:
            lease = app.lease(-header_length % ALIGN + length)
        except OSError as exc:  # no fd or memory for a segment now: the ASGI path reads it instead
            GuardedHttp.no_lease += 1
            if worth_a_line(GuardedHttp.no_lease):
                log.warning("no shared memory for a %d-byte body (%s; %d so far): read through ASGI instead",
                            length, exc, GuardedHttp.no_lease)
            return None
        return DirectBody(lease, header_length, length) if lease is not None else None

    def read_body_directly(self) -> None:
        """The rest of the body goes to the lease by the kernel's reads (BodyReader)."""
        raw = self.transport._transport  # OneWrite's: the connection's own
        raw.pause_reading()  # read again with the new protocol's buffer
        raw.set_protocol(BodyReader(self, self.direct))
        raw.resume_reading()

    def body_progress(self) -> None:
        """BodyReader read more; once the body is whole the connection is ours again, read by
        a new parser (the old one still waits for the bytes that went past it)."""
        self._unset_keepalive_if_required()  # as data_received does: the peer is sending
        if self.direct is None or not self.direct.complete:
            self.watch_idle()
            return
        raw = self.transport._transport
        raw.pause_reading()
        raw.set_protocol(self)
        self.parser = httptools.HttpRequestParser(self)
        with contextlib.suppress(AttributeError):  # httptools < 0.6.3 has none; uvicorn sets its own so
            self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.on_message_complete()
        if not self.flow.read_paused:
            raw.resume_reading()
        self.watch_idle()

    def pause_writing(self) -> None:
        """The peer reads our answer more slowly than we write it: from here, until what we
        wrote has left this process, it must take at least MIN_BODY_RATE bytes a second over
        each client timeout (counted where the kernel holds them too: it wakes a writer only
        once a third of a full socket buffer has gone). A peer that never read held its
        connection, the answer's buffer (a 16 MiB tensor) and the app's task waiting to send,
        for good, the keep-alive timer's close() included (it waits for the buffer to drain)."""
        super().pause_writing()
        if self.write_timer is None:
            self.watch_writes()

    def watch_writes(self) -> None:
        if self.scheme != "http":  # under TLS neither count holds (uvloop's TLS transport reports no buffer,
            return  # and the kernel's bytes are ciphertext); its own shutdown timeout (30 s) bounds the close
        self.write_mark = (self.transport.written, self.transport.unsent(self.fd))
        self.write_timer = self.loop.call_later(self.timeout_s, self.writes_late)

    def writes_late(self) -> None:
        self.write_timer = None
        if not self.transport.pending():
            return
        written, was_unsent = self.write_mark
        taken = (self.transport.written - written) - (self.transport.unsent(self.fd) - was_unsent)
        if taken < MIN_BODY_RATE * self.timeout_s:
            GuardedHttp.slow_readers += 1
            if worth_a_line(GuardedHttp.slow_readers):
                log.warning("a client took %d bytes of its answer in %g s, under %d bytes/s: connection closed "
                            "(%d so far)", max(0, taken), self.timeout_s, MIN_BODY_RATE, GuardedHttp.slow_readers)
            self.transport.abort()  # close() would wait for the buffer to drain
            return
        self.watch_writes()

    def connection_lost(self, exc) -> None:
        # uvicorn tells only the newest request (self.cycle); a stream still running behind a
        # request read after it never heard the hang-up and ran on to its end on a worker
        for cycle in self.running:
            if cycle is not self.cycle and not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
            if not cycle.response_complete:
                for call in list(getattr(cycle, "on_hangup", ())):
                    call()
        self.running.clear()
        self.stop_header_timer()
        self.stop_rest_timer()
        if self.write_timer is not None:
            self.write_timer.cancel()
            self.write_timer = None
        self.end_direct("the client went away before sending its body")
        super().connection_lost(exc)

    def stop_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def headers_late(self, begun: bool) -> None:
        self.header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # an earlier request is still being answered (pipelined behind it): the headers get
            # their time again after it, not none (uvicorn's keep-alive timer, which a byte of
            # them stopped, is not started again)
            self.header_timer = self.loop.call_later(self.timeout_s, self.headers_late, begun)
            return
        if begun:  # a request started and its headers did not follow: say so before closing
            body = b'{"error":"the request headers did not arrive within %g s"}' % self.timeout_s
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        self.transport.close()
