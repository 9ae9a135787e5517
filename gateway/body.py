"""A large binary infer request's body, read by the kernel straight into shared memory.

    headers of POST /v2/models/{name}/infer with Inference-Header-Content-Length and a
    Content-Length of DIRECT_BYTES or more (plain HTTP, no pipelined request before it)
        ──GuardedHttp──► a DirectBody: a Lease of the gateway's client (client/segments.py),
                         the body to lie in it from `pad` on (its first tensor 64-byte aligned)
    the body's bytes that came with the headers ──on_body──► copied in (one read's worth)
    the rest ──BodyReader, the connection's protocol meanwhile (asyncio.BufferedProtocol)──►
                         the kernel reads into the lease itself
    Content-Length read ──► the HTTP protocol back, with a new parser for the next request
    the app ──DirectBody.wait()──► the body, a view of the lease; its tensors are views too,
                         and the call names the lease (AsyncClient._infer_in): not copied (a
                         tensor at an offset its item size does not divide: all of them are)

Through uvicorn's ASGI messages a 16 MiB body was copied six times (a bytes per read by
uvloop, a bytes per piece by httptools, uvicorn's request buffer and each message's bytes,
the app's body buffer, the client's shared memory) in ~68 rounds of the app's loop
(docs/performance.md, "HTTP"). Here the kernel's copy is the only one of its bulk: one copy
for the hop, as the worker's answer is one (into the client's out segment) and sending it
back another (the kernel's, from that mapping).

The rules of the ASGI path hold: a pause longer than the body timeout, or a body slower
than MIN_BODY_RATE, is a 408 (and the connection closes: its stream cannot be resynced); a
client that goes away mid-body, a 400. No lease is taken for a request that no app reads
(past uvicorn's concurrency limit) or whose body the parser will not read (an upgrade), nor
where no fd or memory is left for one (the ASGI path reads that body, and the client sends
frames). Memory is taken as bytes come: a segment's pages exist once written, never for what
Content-Length only declares. The lease goes back once both the body is read (or cut short)
and the app is done with it (`release`), whichever is last.
"""

from __future__ import annotations

import asyncio
from typing import Any

BODY_KEY = "isopool.direct_body"  # where the app finds a request's DirectBody: scope["extensions"]
DIRECT_BYTES = 1 << 20  # bodies at least this large go straight into shared memory
ALIGN = 64  # the binary part's offset in the lease: its first tensor cache-line aligned


class DirectBody:
    """One request's body on its way into a lease (Session.lease)."""

    def __init__(self, lease: Any, header_length: int, length: int) -> None:
        self.lease = lease
        self.pad = -header_length % ALIGN  # the JSON before it ends where the tensors start aligned
        self.length = length
        self.got = 0
        self.loop = asyncio.get_running_loop()
        self.last = self.loop.time()  # when bytes last came
        self.done: asyncio.Future = self.loop.create_future()
        self.app_done = False

    @property
    def complete(self) -> bool:
        return self.got >= self.length

    def write(self, data: bytes) -> None:
        """Bytes the parser handed over (they came in the read that ended the headers)."""
        n = min(len(data), self.length - self.got)
        at = self.pad + self.got
        self.lease.view[at:at + n] = memoryview(data)[:n]
        self.buffer_updated(n)

    def get_buffer(self) -> memoryview:
        return self.lease.view[self.pad + self.got:self.pad + self.length]

    def buffer_updated(self, n: int) -> None:
        self.got += n
        self.last = self.loop.time()
        if self.complete and not self.done.done():
            self.done.set_result(None)
            self._release_if_done()

    def fail(self, message: str) -> None:
        """The connection ended before the body did."""
        if not self.done.done():
            self.done.set_exception(ConnectionError(message))
            self.done.exception()  # retrieved: an app that never waits leaves no warning behind
            self._release_if_done()

    async def wait(self, timeout: float, min_rate: int) -> memoryview:
        """The whole body, a view of the lease; TimeoutError past the same deadlines as App.body
        (a pause over `timeout`, or slower than `min_rate` bytes/s on the whole); ConnectionError
        if the client went away."""
        began = self.loop.time()
        while not self.done.done():
            left = min(began + timeout + self.got / min_rate, self.last + timeout) - self.loop.time()
            if left <= 0:
                raise TimeoutError
            await asyncio.wait([self.done], timeout=left)
        self.done.result()
        return self.lease.view[self.pad:self.pad + self.length]

    def release(self) -> None:
        """The app is done with every view of the body: the lease goes back once the body is
        read too (a reader may still be writing into it after an early answer)."""
        self.app_done = True
        self._release_if_done()

    def _release_if_done(self) -> None:
        if self.app_done and self.done.done() and self.lease is not None:
            lease, self.lease = self.lease, None
            lease.release()


class BodyReader(asyncio.BufferedProtocol):
    """The connection's protocol while a DirectBody is read: the kernel reads into the lease.
    Everything but the body's bytes is the HTTP protocol's (`http`, a GuardedHttp), which
    takes the connection back once the body is whole."""

    def __init__(self, http: Any, body: DirectBody) -> None:
        self.http, self.body = http, body

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.body.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.body.buffer_updated(nbytes)
        self.http.body_progress()

    def eof_received(self) -> bool | None:
        self.body.fail("the client ended its stream before the end of its body")
        return self.http.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.body.fail("the client went away before sending its body")
        self.http.connection_lost(exc)

    def pause_writing(self) -> None:
        self.http.pause_writing()

    def resume_writing(self) -> None:
        self.http.resume_writing()
