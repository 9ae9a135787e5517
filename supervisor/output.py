"""A worker's stdout and stderr, read without letting a flood cost anyone else.

    worker ──pipe──► read() at most READ_PER_PASS bytes a pass ──► lines of at most MAX_LINE
                                                                      │ token bucket (--log-rate)
                                                   logged, tagged ◄───┴───► dropped, counted

Each pass of the loop reads a bounded amount, so a worker printing hundreds of megabytes
holds the loop for well under a millisecond a pass, and its pipe (not the supervisor's
memory) holds the rest. The unfinished last line is kept up to MAX_LINE; a longer line is
cut there, so output without newlines is flushed at the cap instead of held whole. Lines
are logged while the worker's bucket has bytes left (refilled at --log-rate bytes a second,
holding at most a second's worth); the rest are dropped and counted, for status and metrics.
"""

from __future__ import annotations

import os

READ_PER_PASS = 256 * 1024  # bytes read from one worker's pipe per loop pass
MAX_LINE = 8 * 1024  # longer lines are cut; so is output without newlines
CHUNK = 64 * 1024


class Output:
    def __init__(self, fd: int, rate: float, now: float):
        self.fd = fd
        self.rate = rate  # bytes a second that may be logged (0: no limit)
        self.tokens = rate
        self.at = now
        self.partial = b""
        self.dropped = 0  # bytes not logged: over the rate

    def read(self, now: float, final: bool = False) -> list[str]:
        """The lines to log that have arrived (at most READ_PER_PASS bytes' worth); with
        `final` (the worker is gone), what is left in the pipe, and the unfinished line."""
        if self.rate:
            self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
            self.at = now
        lines: list[str] = []
        budget = READ_PER_PASS if not final else 16 * READ_PER_PASS
        while budget > 0 and self.fd >= 0:
            try:
                chunk = os.read(self.fd, min(CHUNK, budget))
            except BlockingIOError:
                break
            if not chunk:
                break
            budget -= len(chunk)
            self._split(chunk, lines)
        if final and self.partial:
            self._emit(self.partial, lines)
            self.partial = b""
        return lines

    def _split(self, chunk: bytes, lines: list[str]) -> None:
        parts = chunk.split(b"\n")
        if self.partial:  # bounded by MAX_LINE: never a copy of more than that
            parts[0] = self.partial + parts[0]
        self.partial = parts.pop()
        for line in parts:
            self._emit(line, lines)
        while len(self.partial) >= MAX_LINE:
            self._emit(self.partial[:MAX_LINE], lines)
            self.partial = self.partial[MAX_LINE:]

    def _emit(self, line: bytes, lines: list[str]) -> None:
        while len(line) > MAX_LINE:
            self._emit(line[:MAX_LINE], lines)
            line = line[MAX_LINE:]
        n = len(line) + 1
        if self.rate:
            if self.tokens < n:
                self.dropped += n
                return
            self.tokens -= n
        lines.append(line.decode("utf-8", "replace"))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
