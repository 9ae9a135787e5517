"""OneWrite: the gateway's transport sends a response's head and body in one write, on a real
uvloop socket transport; a recording wrapper around it lists the calls it is given."""

from __future__ import annotations

import asyncio
import socket

import uvloop

from isopool.gateway.__main__ import OneWrite


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


def test_a_head_leaves_with_its_body_a_lone_write_by_the_next_turn_and_close_sends_what_is_held():
    loop = uvloop.new_event_loop()
    ours, theirs = socket.socketpair()
    theirs.settimeout(10)
    try:
        transport, _ = loop.run_until_complete(loop.connect_accepted_socket(asyncio.Protocol, ours))
        seen = Recorded(transport)
        one = OneWrite(seen, loop)
        assert one.get_extra_info("socket") is not None and not one.is_closing()  # the rest is the transport's
        turn = lambda: loop.run_until_complete(asyncio.sleep(0))  # noqa: E731

        one.write(b"HEAD ")
        assert seen.calls == []  # held for its body
        one.write(memoryview(b"BODY"))
        assert seen.calls == [("writelines", [b"HEAD ", b"BODY"])]  # at once, together
        assert theirs.recv(100) == b"HEAD BODY"

        big = memoryview(bytes(OneWrite.ALONE)).cast("I")  # a big body goes by itself, the head just before it
        one.write(b"head ")
        one.write(big)
        assert seen.calls[1:] == [("write", b"head "), ("write", big.tobytes())]
        got = b""
        while len(got) < 5 + big.nbytes:  # bounded: each read takes some, or times out, or fails here
            chunk = theirs.recv(1 << 20)
            assert chunk, "the connection closed early"
            got += chunk
        assert got == b"head " + big.tobytes()
        del seen.calls[1:]

        one.write(b"alone")  # a response of one write (or a 100 Continue): out by the loop's next turn
        turn()
        assert seen.calls[1:] == [("write", b"alone")]
        assert theirs.recv(100) == b"alone"

        one.write(b"last")  # closing sends what is held first
        one.close()
        assert seen.calls[2:] == [("write", b"last"), ("close",)]
        turn()
        assert theirs.recv(100) == b"last" and theirs.recv(100) == b""
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
        one.write(b"HEAD ")
        transport.close()  # the connection went away under the held head (the client hung up)
        loop.run_until_complete(asyncio.sleep(0))
        assert seen.calls == []
    finally:
        theirs.close()
        loop.close()
