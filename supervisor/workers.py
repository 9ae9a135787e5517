"""One record per worker slot, and the one state machine it moves through.

    BACKOFF ──► STARTING ──► IDLE ◄──► BUSY
                   │          │         │
                   │          └─► DRAINING (finish held work) ─► STOPPING ─► EXITED ─► BACKOFF
                   └──────────────────────────────────────────► STOPPING (killed: timeout, hang)

A slot keeps its record across restarts: the process fields are reset, the counters
(restarts, requests, errors) carry on. `generation` counts the processes a slot has had;
a message from an older generation is stale and dropped.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("isopool.supervisor")


class State(enum.Enum):
    BACKOFF = "backoff"  # waiting to (re)start
    STARTING = "starting"  # process started, model loading
    IDLE = "idle"
    BUSY = "busy"
    DRAINING = "draining"  # no new work; stops when its held requests are done
    STOPPING = "stopping"  # told to stop or being killed; waiting for the exit
    EXITED = "exited"

    # members are singletons compared by identity, so identity hashing is exact and, unlike
    # Enum's own __hash__ (Python code), costs no call on the hot path (`state in SERVING`)
    __hash__ = object.__hash__


TRANSITIONS: dict[State, frozenset[State]] = {
    State.BACKOFF: frozenset({State.STARTING, State.EXITED}),
    State.STARTING: frozenset({State.IDLE, State.STOPPING, State.EXITED}),
    State.IDLE: frozenset({State.BUSY, State.DRAINING, State.STOPPING, State.EXITED}),
    State.BUSY: frozenset({State.IDLE, State.DRAINING, State.STOPPING, State.EXITED}),
    State.DRAINING: frozenset({State.STOPPING, State.EXITED}),
    State.STOPPING: frozenset({State.EXITED}),
    State.EXITED: frozenset({State.BACKOFF}),
}

SERVING = frozenset({State.IDLE, State.BUSY})
ALIVE = frozenset({State.STARTING, State.IDLE, State.BUSY, State.DRAINING, State.STOPPING})


class IllegalTransition(RuntimeError):
    pass


@dataclass(eq=False)
class Worker:
    slot: int
    device: str = "cpu"
    generation: int = 0
    state: State = State.BACKOFF
    proc: Any = None  # the process handle (supervisor.spawner.Process)
    spawn_at: float = 0.0  # BACKOFF: when to start
    started_at: float = 0.0
    ready_at: float = 0.0
    last_seen: float = 0.0
    inflight: deque = field(default_factory=deque)  # request keys in dispatch order; the board says which runs
    dispatched: int = 0  # RUNs sent to this process: each request's sequence number on its board
    board: str | None = None  # this process's board file (protocol/board.py)
    requests: int = 0
    errors: int = 0
    restarts: int = 0
    crashes_in_row: int = 0  # consecutive deaths; drives backoff, reset by a good request
    requests_this_process: int = 0
    max_requests: int = 0  # this process's recycle threshold (jittered), 0 = never
    capacity: int = 1  # requests it may hold at once, as it announced (prefetch, or a full batch)
    tenant: object = None  # with --isolation: the tenant (or request) this process is bound to
    retire: str | None = None  # why this worker is being replaced (recycle, reload, scale)
    stop_reason: str | None = None  # why we stopped or killed it; None means a death is a crash
    kill_at: float | None = None  # escalate TERM -> KILL at this time
    last_exit: dict | None = None
    last_error: str | None = None  # the model's load error, if it would not start
    rss: int = 0
    uss: int = 0
    cpu_percent: float = 0.0

    @property
    def ident(self) -> bytes:
        return f"{self.slot}.{self.generation}".encode()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def transition(self, new: State, why: str = "") -> None:
        if new not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"worker {self.slot}: {self.state.value} -> {new.value} is not allowed ({why})")
        log.debug("worker %d (pid %s): %s -> %s %s", self.slot, self.pid, self.state.value, new.value, why)
        self.state = new

    def drop_board(self) -> None:
        """Remove this process's board file (protocol/board.py)."""
        if self.board is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.board)
            self.board = None

    def reset_process(self) -> None:
        """Forget the dead process; keep the slot's counters."""
        self.proc = None
        self.inflight.clear()
        self.dispatched = 0  # its board went when the death was read (drop_board)
        self.started_at = self.ready_at = self.last_seen = 0.0
        self.requests_this_process = 0
        self.tenant = None
        self.stop_reason = None
        self.kill_at = None
        self.rss = self.uss = 0
        self.cpu_percent = 0.0

    def age(self, now: float) -> float:
        return now - self.started_at if self.started_at else 0.0


def parse_ident(ident: bytes) -> tuple[int, int] | None:
    try:
        slot, gen = ident.split(b".")
        return int(slot), int(gen)
    except ValueError:
        return None
