"""OneWrite: the gateway's transport sends a response's head and body in one write, on a real
uvloop socket transport; a recording wrapper around it lists the calls it is given."""

from __future__ import annotations

import asyncio
import socket

import uvloop

from isopool.gateway.connection import OneWrite


class Recorded:
    """A real transport, and the calls made on it, in order."""

    def __init__(self, transport) -> None:
        self.transport, self.calls = transport, []

    def write(self, data) -> None:
        self.calls.append(("write", bytes(data)))
        self.transport.write(data)

    def writelines(self, chunks) -> None:
        chunks = [bytes(c) for c in chunks]
        self.calls.append(("writelines", chunks))
        self.transport.writelines(chunks)

    def close(self) -> None:
        self.calls.append(("close",))
        self.transport.close()

    def __getattr__(self, name: str):
        return getattr(self.transport, name)


HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n"


def test_a_head_leaves_with_its_body_a_lone_head_by_the_next_turn_and_close_sends_what_is_held():
    loop = uvloop.new_event_loop()
    ours, theirs = socket.socketpair()
    theirs.settimeout(10)
    try:
        transport, _ = loop.run_until_complete(loop.connect_accepted_socket(asyncio.Protocol, ours))
        seen = Recorded(transport)
        one = OneWrite(seen, loop)
        assert one.get_extra_info("socket") is not None and not one.is_closing()  # the rest is the transport's
        turn = lambda: loop.run_until_complete(asyncio.sleep(0))  # noqa: E731

        one.write(HEAD)
        assert seen.calls == []  # a head is held for its body
        one.write(memoryview(b"BODY"))
        assert seen.calls == [("writelines", [HEAD, b"BODY"])]  # at once, together
        assert theirs.recv(100) == HEAD + b"BODY"

        one.write(b"data: an event\n\n")  # any other write (a stream's next part) goes at once
        assert seen.calls[1:] == [("write", b"data: an event\n\n")]
        assert theirs.recv(100) == b"data: an event\n\n"
        del seen.calls[1:]

        big = memoryview(bytes(OneWrite.ALONE)).cast("I")  # a big body goes by itself, the head just before it
        one.write(HEAD)
        one.write(big)
        assert seen.calls[1:] == [("write", HEAD), ("write", big.tobytes())]
        got = b""
        while len(got) < len(HEAD) + big.nbytes:  # bounded: each read takes some, or times out, or fails here
            chunk = theirs.recv(1 << 20)
            assert chunk, "the connection closed early"
            got += chunk
        assert got == HEAD + big.tobytes()
        del seen.calls[1:]

        one.write(HEAD)  # a response of its head alone (HEAD, 100 Continue): out by the loop's next turn
        turn()
        assert seen.calls[1:] == [("write", HEAD)]
        assert theirs.recv(100) == HEAD

        one.write(HEAD)  # closing sends what is held first
        one.close()
        assert seen.calls[2:] == [("write", HEAD), ("close",)]
        turn()
        assert theirs.recv(100) == HEAD and theirs.recv(100) == b""
        assert one.is_closing()
    finally:
        theirs.close()
        loop.close()


def test_what_is_held_for_a_connection_closed_meanwhile_is_dropped_not_written():
    loop = uvloop.new_event_loop()
    ours, theirs = socket.socketpair()
    try:
        transport, _ = loop.run_until_complete(loop.connect_accepted_socket(asyncio.Protocol, ours))
        seen = Recorded(transport)
        one = OneWrite(seen, loop)
        one.write(HEAD)
        transport.close()  # the connection went away under the held head (the client hung up)
        loop.run_until_complete(asyncio.sleep(0))
        assert seen.calls == []
    finally:
        theirs.close()
        loop.close()


def test_a_head_held_when_the_client_ends_its_stream_still_reaches_it():
    """A real uvicorn server with the gateway's protocol: the app answers a HEAD request (its
    head is the whole response, so it is held) and, in the same step, waits until the
    client has shut its sending side. uvloop reads that end before the loop's next turn and
    closes the connection when eof_received returns; GuardedHttp.eof_received sends the
    held head first (without it, the client reads nothing)."""
    import threading

    import uvicorn

    from isopool.gateway.connection import GuardedHttp

    head_sent, half_closed = threading.Event(), threading.Event()

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]})
        await send({"type": "http.response.body", "body": b""})
        head_sent.set()
        half_closed.wait(10)  # in the same step as the head: the held head waits on the loop's next turn

    listener = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, loop="uvloop", http=GuardedHttp, lifespan="off", log_config=None,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        for _ in range(1000):  # bounded: the server starts within a few ms
            if server.started:
                break
            half_closed.wait(0.01)
        assert server.started
        with socket.create_connection(listener.getsockname(), timeout=10) as conn:
            conn.sendall(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert head_sent.wait(10)  # the request was read before its end: the end comes while the head is held
            conn.shutdown(socket.SHUT_WR)
            half_closed.set()
            got = b""
            while chunk := conn.recv(4096):  # bounded: the server closes, or the timeout fails the test
                got += chunk
        assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(b"\r\n\r\n"), got
    finally:
        half_closed.set()
        server.should_exit = True
        thread.join(10)
        listener.close()
