"""A worker's board: what it was running when it died, told without a message.

A worker sends its results in groups (a bundle per few requests), so when it dies the
supervisor cannot tell from the replies alone which request it was running: the finished
ones may still sit unsent in its outbox. Each worker therefore keeps a 16-byte file in the
supervisor's private directory, mapped into its memory, and writes two numbers into it:

    started   the dispatch sequence number of the request (or first of the batch) it began
    finished  the sequence number of the last request (or batch) it finished

Two stores into a shared page per request, no system call; the page outlives the process,
so after a SIGKILL or a segfault the supervisor reads the numbers from the file. Like
Apache's scoreboard, it is written only by the worker; the supervisor reads it when the
worker dies (whom to blame), when a deadline passes (is the request running, waiting, or
done with its answer still held?) and for `status` (the age of the running request).
"""

from __future__ import annotations

import mmap
import os
import struct

_LAYOUT = struct.Struct("<QQ")
_SEQ = struct.Struct("<Q")
SIZE = _LAYOUT.size


def create(path: str) -> None:
    """A fresh, zeroed board for a worker about to start (supervisor side)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, bytes(SIZE))
    finally:
        os.close(fd)


def marks(path: str) -> tuple[int, int] | None:
    """(started, finished): the sequence numbers last marked; None if there is no readable board.
    The worker is running `started` when started > finished, and is between requests otherwise."""
    try:
        with open(path, "rb") as f:
            data = f.read(SIZE)
    except OSError:
        return None
    if len(data) != SIZE:
        return None
    return _LAYOUT.unpack(data)


class Board:
    """The worker's side: map the board and mark each request as it starts and finishes."""

    def __init__(self, path: str | None):
        if path is None:  # nobody will read it (a worker run by hand): private memory
            self.map = mmap.mmap(-1, SIZE)
            return
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            self.map = mmap.mmap(fd, SIZE)
        finally:
            os.close(fd)

    def start(self, seq: int) -> None:
        _SEQ.pack_into(self.map, 0, seq)

    def finish(self, seq: int) -> None:
        _SEQ.pack_into(self.map, 8, seq)
