"""Restart policy (Erlang/OTP style) and the poison-input registry."""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict, deque
from typing import Sequence

from isopool.protocol import frame_view


class RestartPolicy:
    """Per-slot exponential backoff with jitter, and a pool-wide restart intensity limit.

    The first restart of a slot is immediate (capacity comes back at once); each further
    consecutive death doubles the delay, up to backoff_max. More than max_restarts within
    restart_window marks the pool degraded; it keeps restarting, just never in a tight loop.
    """

    def __init__(self, base: float, cap: float, max_restarts: int, window: float, rng: random.Random | None = None):
        self.base, self.cap = base, cap
        self.max_restarts, self.window = max_restarts, window
        self.rng = rng or random.Random()
        self.recent: deque[float] = deque()

    def delay(self, crashes_in_row: int) -> float:
        if crashes_in_row <= 1:
            return 0.0
        raw = min(self.cap, self.base * 2 ** (crashes_in_row - 2))
        return raw * self.rng.uniform(0.5, 1.5)

    def record(self, now: float) -> None:
        self.recent.append(now)
        self.expire(now)

    def expire(self, now: float) -> None:
        while self.recent and self.recent[0] < now - self.window:
            self.recent.popleft()

    def degraded(self, now: float) -> bool:
        self.expire(now)
        return len(self.recent) > self.max_restarts


class PoisonRegistry:
    """Counts worker deaths per input, so an input that keeps killing workers is refused.

    Inputs are recognised by a digest of their frames. To keep the hot path free, a new
    request is only hashed when its size matches an input that has killed a worker.
    """

    def __init__(self, threshold: int, capacity: int = 4096):
        self.threshold = threshold
        self.capacity = capacity
        self.kills: OrderedDict[bytes, int] = OrderedDict()
        self.sizes: dict[int, int] = {}  # total size -> number of digests of that size

    @staticmethod
    def size_of(body: Sequence) -> int:
        return sum(len(frame_view(f)) for f in body)

    @staticmethod
    def digest(body: Sequence) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        for f in body:
            view = frame_view(f)
            h.update(len(view).to_bytes(8, "little"))
            h.update(view)
        return h.digest()

    def key(self, body: Sequence) -> tuple[int, bytes]:
        return self.size_of(body), self.digest(body)

    def add_kill(self, body: Sequence) -> int:
        size, digest = self.key(body)
        if digest not in self.kills:
            self.sizes[size] = self.sizes.get(size, 0) + 1
            if len(self.kills) >= self.capacity:
                self._evict()
        count = self.kills.pop(digest, 0) + 1
        self.kills[digest] = count
        return count

    def _evict(self) -> None:
        # sizes are only a prefilter; dropping one digest may leave a stale size, which costs a hash, no more
        self.kills.popitem(last=False)

    def is_poison(self, body: Sequence) -> bool:
        if not self.kills:
            return False
        if self.size_of(body) not in self.sizes:
            return False
        return self.kills.get(self.digest(body), 0) >= self.threshold
