"""Sending and receiving frames with the least per-message work: the hot path of every hop.

pyzmq's send_multipart/recv_multipart are convenient but cost several microseconds of
flag arithmetic (IntFlag enums) and, at the end of each drained batch, a raised Again.
These helpers use plain int flags and ask the socket whether more is waiting.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import zmq

SNDMORE = int(zmq.SNDMORE)
NOBLOCK = int(zmq.NOBLOCK)
POLLIN = int(zmq.POLLIN)
EVENTS = int(zmq.EVENTS)
RCVMORE = int(zmq.RCVMORE)


def send_frames(sock: zmq.Socket, frames: Sequence, flags: int = 0) -> None:
    """Send a multipart message. Large buffers go zero-copy; pyzmq copies small ones anyway."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        sock.send(frame, (SNDMORE if i < last else 0) | flags, copy=False)


def drain(sock: zmq.Socket, limit: int) -> Iterator[list]:
    """Yield up to `limit` waiting messages (as zmq.Frame lists) without blocking."""
    for _ in range(limit):
        if not sock.get(EVENTS) & POLLIN:
            return
        yield sock.recv_multipart(NOBLOCK, copy=False)
