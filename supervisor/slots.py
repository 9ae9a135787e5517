"""Worker slots: one record per slot, one state machine, and the rules that keep the count.

    BACKOFF ──► STARTING ──► IDLE ◄──► BUSY
       ▲           │          │         │
       │           │          └─► DRAINING (finish held work) ─► STOPPING ─► EXITED ─► BACKOFF
       │           └──────────────────────────────────────────► STOPPING (killed: timeout, hang)
       └─ STARTING (the fork failed: nothing was started)

A slot keeps its record across restarts: the process fields are reset, the counters
(restarts, requests, errors) carry on. Slots are the supervisor's own handles, never
reused. What a model and a user see is the worker's `id`: 0..N-1, the same across
restarts, recycling and reload, since a replacement takes the id of the worker it replaces
(for a moment both run, the old one finishing its work). `generation` counts the processes
an id has had, so replacements are told apart; a message from an older one is stale.

Why a worker is on its way out is one field, `leaving`, set by the first move that says
so: retire() (serving on until its replacement is ready), drain(), stop() or kill().
A worker whose exit comes in STOPPING was stopped by us; any other exit is a crash. When
it exits, a slot whose worker left for a restart reason (RESTART_IN_PLACE) starts again;
any other leaving slot is given up (its replacement has a slot of its own).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from isopool.protocol.contract import worker_ident

from .actions import Kill, Spawn

if TYPE_CHECKING:
    from .core import Core

SURGE = 1  # extra workers allowed while replacing (recycle, reload): capacity never dips
RECYCLE_REASONS = frozenset({"max_requests", "max_rss", "reload", "integrity", "tenant", "isolation"})
DRAIN_NOW_REASONS = frozenset({"tenant", "isolation"})  # bound to another tenant: no use keeping them
RESTART_IN_PLACE = frozenset({"timeout", "heartbeat", "start_timeout", "load_max_rss", "protocol"})  # killed: same slot again


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
    State.STARTING: frozenset({State.IDLE, State.STOPPING, State.EXITED, State.BACKOFF}),
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
    id: int = 0  # 0..N-1: stable across restarts, recycling and reload (context.worker_id)
    device: str = "cpu"
    generation: int = 0
    state: State = State.BACKOFF
    pid: int | None = None
    spawn_at: float = 0.0  # BACKOFF: when to start
    started_at: float = 0.0
    ready_at: float = 0.0
    last_seen: float = 0.0
    answered_at: float = 0.0  # when it last answered a request
    dispatched: int = 0  # RUNs sent to this process: each request's sequence number on its board
    requests: int = 0
    errors: int = 0
    restarts: int = 0
    crashes_in_row: int = 0  # consecutive deaths; drives backoff, reset by a good request
    requests_this_process: int = 0
    max_requests: int = 0  # this process's recycle threshold (jittered), 0 = never
    capacity: int = 1  # requests it may hold at once, as it announced (prefetch, or a full batch)
    tenant: object = None  # with --isolation: the tenant (or request) this process is bound to
    leaving: str | None = None  # why this process is on its way out (None: it is kept)
    kill_at: float | None = None  # STOPPING: escalate TERM -> KILL at this time
    signalled: str | None = None  # the last signal we sent it ("TERM", "KILL"): its death is ours
    for_client: bool = False  # killed for a deadline its client chose (timeout=): not the pool's ill health
    last_exit: dict | None = None
    last_error: str | None = None  # the model's load error, or why its last start failed
    rss: int = 0
    uss: int = 0
    cpu_percent: float = 0.0

    token: str = ""  # its current process's secret (core.tokens): the backend identity cannot be guessed

    @property
    def ident(self) -> bytes:
        return worker_ident(self.slot, self.generation, self.token)

    def move(self, new: State, why: str = "") -> None:
        if new not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"worker {self.slot}: {self.state.value} -> {new.value} is not allowed ({why})")
        self.state = new

    def reset_process(self) -> None:
        """Forget the dead process; keep the slot's counters."""
        self.pid = None
        self.dispatched = 0
        self.started_at = self.ready_at = self.last_seen = self.answered_at = 0.0
        self.requests_this_process = 0
        self.tenant = None
        self.leaving = None
        self.kill_at = None
        self.signalled = None
        self.for_client = False
        self.rss = self.uss = 0
        self.cpu_percent = 0.0

    def age(self, now: float) -> float:
        return now - self.started_at if self.started_at else 0.0


# ------------------------------------------------------------ moves


def retire(core: "Core", w: Worker, reason: str) -> None:
    """Mark for replacement; reconcile starts the replacement first, then drains this one."""
    if w.leaving is None:
        w.leaving = reason
        core.emit("recycling", w, reason=reason)


def drain(core: "Core", w: Worker, now: float) -> None:
    w.move(State.DRAINING, w.leaving or "drain")
    if not core.ledger.load(w.slot):
        stop(core, w, now)


def stop(core: "Core", w: Worker, now: float) -> None:
    """Ask politely (STOP); KILL if it has not exited after the grace period."""
    if w.state is State.STARTING:  # not listening yet
        kill(core, w, w.leaving or "stop", now)
        return
    w.leaving = w.leaving or "stop"
    w.move(State.STOPPING, w.leaving)
    core.to_workers.append((w.ident, [core.stop_header]))
    w.kill_at = now + core.config.kill_grace


def kill(core: "Core", w: Worker, reason: str, now: float) -> None:
    """TERM the worker's process group now; KILL after the grace period."""
    if w.state is not State.STOPPING:
        w.move(State.STOPPING, reason)
    w.leaving = w.leaving or reason
    core.actions.append(Kill(w.slot, "TERM"))
    w.signalled = "TERM"
    if w.kill_at is None or w.kill_at > now + core.config.kill_grace:
        w.kill_at = now + core.config.kill_grace
    core.emit("timed_out" if reason == "timeout" else "killed", w, reason=reason)


def start(core: "Core", w: Worker, now: float) -> None:
    if not core.template.can_fork():
        return  # stays in BACKOFF; the template's readiness wakes the loop
    w.generation = core.generations[w.id] = core.generations.get(w.id, 0) + 1
    w.token = core.tokens()
    w.move(State.STARTING, "spawn")
    w.started_at = w.last_seen = now
    cfg = core.config
    jitter = cfg.max_requests_jitter
    w.max_requests = cfg.max_requests + (core.rng.randint(0, jitter) if jitter else 0) if cfg.max_requests else 0
    core.actions.append(Spawn(w.slot, w.generation, w.device, w.id, w.token))


def spawned(core: "Core", w: Worker, pid: int) -> None:
    w.pid = pid
    if w.state is State.STOPPING:  # stopped before its process existed (the Spawn was carried out after
        core.actions.append(Kill(w.slot, w.signalled or "TERM"))  # the stop): the signal, again, now it exists
        return
    if w.generation > 1 and w.last_exit is not None:
        core.emit("restarted", w, after=w.last_exit["reason"], restarts=w.restarts)
    else:
        core.emit("started", w)


# ------------------------------------------------------------ keeping the count


def reconcile(core: "Core", now: float) -> None:
    """Start workers until `target` are kept; retire the surplus once replacements serve."""
    if not core.phase.runs_workers:
        return
    workers = core.workers
    # a worker being killed or in backoff comes back in its own slot: it is kept
    kept = [w for w in workers.values() if w.leaving is None or w.leaving in RESTART_IN_PLACE]
    for w in sorted(kept, key=lambda w: -w.id)[: max(0, len(kept) - core.target)]:
        retire(core, w, "scale")  # the highest ids go: those kept stay 0..N-1
    kept = [w for w in kept if w.leaving != "scale"]
    short = core.target - len(kept)
    surge = core.target if core.config.isolation == "request" else SURGE  # every request needs a fresh one
    room = core.target + surge - len(workers)
    taken = {w.id for w in kept}
    for _ in range(max(0, min(short, room))):
        slot, wid = next(core.slot_numbers), next(i for i in range(len(taken) + 1) if i not in taken)
        taken.add(wid)
        workers[slot] = Worker(slot=slot, id=wid, device=core.devices[wid % len(core.devices)], spawn_at=now)
    for w in list(workers.values()):
        if w.state is State.BACKOFF and now >= w.spawn_at:
            if w.leaving is not None:
                w.move(State.EXITED, "retired before start")
                del workers[w.slot]
            else:
                start(core, w, now)
    drain_surplus(core, now)


def drain_surplus(core: "Core", now: float) -> None:
    """Retiring workers keep serving until enough replacements are ready, then drain."""
    if core.reloading and not any(w.leaving == "reload" for w in core.workers.values()):
        core.reloading = False
        core.emit("reload_finished", None, workers=len(core.workers))
    retiring = [w for w in core.workers.values() if w.leaving is not None and w.state in SERVING]
    for w in [w for w in retiring if w.leaving in DRAIN_NOW_REASONS]:
        drain(core, w, now)
        retiring.remove(w)
    if not retiring:
        return
    ready_kept = sum(1 for w in core.workers.values() if w.leaving is None and w.state in SERVING)
    surplus = ready_kept + len(retiring) - core.target
    for w in sorted(retiring, key=lambda w: retire_order(core, w))[: max(0, surplus)]:
        drain(core, w, now)


def retire_order(core: "Core", w: Worker) -> tuple:
    """Which worker to give up first: not yet serving, then idle, then the least loaded."""
    rank = {State.BACKOFF: 0, State.STARTING: 1, State.IDLE: 2, State.BUSY: 3}
    return rank.get(w.state, 4), core.ledger.load(w.slot), -w.slot


def ready_count(core: "Core") -> int:
    return sum(1 for w in core.workers.values() if w.state in SERVING)
