"""The supervisor's core: every decision, no I/O. Events in, actions out.

    events (actions.py)                     rooms                       actions
    ClientMessage, ClientGarbage ──► admission  accept, refuse, cancel ─┐  core.to_clients  replies
    WorkerMessage, WorkerGarbage ──► answers    ready, relay, failures  ├► core.to_workers  RUN, CANCEL, STOP
    WorkerExited ──────────────────► blame      whose fault, retry      │  core.actions     Spawn, Kill, GiveUp,
    Spawned, SpawnFailed, Sampled ─► slots, health                      │                   StartTemplate,
    Template{Ready,Failed,Exited} ─► templates                          │                   StopTemplate,
    SignalReceived ────────────────► control    phases, scale, reload   │                   Sample, ReapStrays,
    Tick (a timer may be due) ─────► health     deadlines, heartbeats   │                   AnswerStatus, Emit,
                                     dispatch   queued -> worker ───────┘                   Log, Notify

The core keeps all pool state: the request ledger (ledger.py), the worker slots
(slots.py), the pool phase (control.Phase), the template's lifecycle (templates.py), the
restart policy and poison registry (policy.py) and the counters (stats.py). It is given
the time with every event and never reads a clock, a socket, a file or a pid; the one
thing it asks the outside world is a worker's board (`boards`, protocol/board.py), which
the shell reads from the file and the simulator from its model of the worker.

Handling an event never raises for anything a client or a worker sent: a bad message is
answered or its sender replaced. The shell (loop.py) carries out the actions in order.
"""

from __future__ import annotations

import itertools
import logging
import random
import secrets
from collections import Counter
from typing import Any, Callable, Iterator

from isopool.logs import client_alias, worth_a_line
from isopool.protocol import Cancelled, InternalError, IsopoolError, encode_error, ops, pack_header

from . import actions as ev
from . import admission, answers, blame, control, dispatch, health, slots, templates
from .actions import Emit, Log
from .config import PoolConfig
from .phase import Phase
from .dispatch import Credits
from .ledger import Ledger, Request
from .policy import PoisonRegistry, RestartPolicy
from .stats import Stats
from .templates import TemplateRecord, TemplateState

TICK_S = 0.25  # longest gap between maintenance passes (heartbeats, kills, sampling)

Boards = Callable[[int], "tuple[int, int] | None"]  # slot -> (started, finished) of its current process


class Core:
    def __init__(self, config: PoolConfig, devices: list[str], boards: Boards, rng: random.Random | None = None,
                 now: float = 0.0, slot_numbers: Iterator[int] | None = None,
                 tokens: Callable[[], str] | None = None):
        self.config = config
        self.name = config.model_name  # the model this core serves (one core per model)
        self.kind: str | None = None  # what its model says it is (READY's kind: "embedding", ...)
        self.signature: dict | None = None  # the tensors it declares (READY's signature), or None
        self.limits = config.limits
        self.devices = devices
        self.boards = boards
        self.rng = rng or random.Random()
        # each process's secret part of its backend identity (slots.Worker.ident): unguessable
        # in a daemon (secrets), reproducible in the simulator (its seeded rng)
        self.tokens = tokens or (lambda: secrets.token_hex(16))
        self.intruders = 0  # backend messages under a live worker's slot and generation with a wrong token
        self.sandbox_refused = 0  # calls sandboxed workers made that their filter held back and we refused
        self.target = config.workers
        self.now = now
        self.ledger = Ledger()
        self.workers: dict[int, slots.Worker] = {}
        self.slot_numbers = slot_numbers or itertools.count()  # shared by the cores of one daemon: slots stay unique
        self.generations: dict[int, int] = {}  # worker id -> processes it has had
        self.credits = Credits()  # least-loaded worker first
        self.restarts = RestartPolicy(config.backoff_base, config.backoff_max, config.max_restarts,
                                      config.restart_window, self.rng)
        self.poison = PoisonRegistry(config.poison_threshold)
        self.stats = Stats()
        self.replacements: Counter[str] = Counter()  # by reason: crash, timeout, max_rss, reload, ...
        self.phase = Phase.STARTING
        self.template = TemplateRecord(TemplateState.UNUSED if config.preload == "none" else TemplateState.WAITING,
                                       due=now)
        self.exit_code = 0
        self.startup_error: str | None = None
        self.drain_deadline = 0.0
        self.next_stats = 0.0
        self.next_tick = 0.0
        self.was_degraded = False
        self.reloading = False
        self.dirty = True  # the pool changed: the maintenance steps run on the next tick
        self.work_s = float("inf")  # how long the last answered request ran on its worker (protocol/pacing.py)
        self.answer_s = float("inf")  # how soon after its dispatch that answer came
        self.stop_header = pack_header(ops.STOP, None)
        self.stalled: set[bytes] = set()  # clients whose replies wait at their bound: new requests refused
        self.failed = 0  # requests failed (but not cancelled): logged as worth_a_line says
        self.to_clients: list[tuple[bytes, list, bool]] = []
        self.to_workers: list[tuple[bytes, list]] = []
        self.actions: list = []

    # ------------------------------------------------------------ events

    def handle(self, event: Any, now: float) -> None:
        """Any event (actions.py). The shell calls the hot ones' methods directly; same code."""
        self.now = now
        _HANDLERS[type(event)](self, event, now)

    def client_message(self, ident: bytes, header: dict, body: list, admin: bool, now: float) -> None:
        self.now = now
        admission.on_client(self, ident, header, body, admin, now)

    def worker_message(self, ident: bytes, header: dict, body: list, now: float) -> None:
        self.now = now
        answers.on_worker(self, ident, header, body, now)

    def tick(self, now: float) -> bool:
        """Deadlines, then (when the pool changed or a timer is due) the maintenance steps, then
        dispatch. True if the maintenance steps ran (the figures for metrics may have moved)."""
        self.now = now
        maintained = False
        if (d := self.ledger.earliest()) is not None and d <= now:
            health.expire(self, now)
        if self.dirty or now >= self.next_tick or self.phase is not Phase.SERVING:
            self.dirty = False
            templates.check(self, now)
            health.check_workers(self, now)
            slots.reconcile(self, now)
            control.advance(self, now)
            self.next_tick = health.next_due(self, now, TICK_S)
            maintained = True
        if self.ledger.queue:
            dispatch.dispatch(self, now)
        return maintained

    def next_due(self) -> float:
        """When tick() must run next; `now` or earlier means at once."""
        if self.dirty:
            return self.now
        d = self.ledger.earliest()
        return self.next_tick if d is None or d > self.next_tick else d

    def take(self) -> tuple[list, list, list]:
        """The actions made since the last take, in three lists (actions.py)."""
        out = self.to_clients, self.to_workers, self.actions
        self.to_clients, self.to_workers, self.actions = [], [], []
        return out

    # ------------------------------------------------------------ used by the rooms

    def free_credit(self, slot: int, generation: int) -> int:
        """Requests (slot, generation) may still take now; -1 if it is gone or not serving."""
        w = self.workers.get(slot)
        if w is None or w.generation != generation or w.state not in slots.SERVING:
            return -1
        held = self.ledger.held.get(slot)
        return w.capacity - (len(held) if held else 0)

    def finish(self, req: Request, op: str, body: list, outcome: str, now: float, reuse: bool = False) -> None:
        self.ledger.settle(req)
        key = req.key
        header = pack_header(op, key[1], reuse=True) if reuse else pack_header(op, key[1])
        self.to_clients.append((key[0], [header, *body], req.bundles))
        self.stats.done(outcome, now - req.accepted_at, now)
        self.answer_s = now - req.started_at

    def fail(self, req: Request, err: IsopoolError) -> None:
        self.ledger.abandon(req, grace=self.config.kill_grace)
        self.to_clients.append((req.client, encode_error(req.client_id, err), req.bundles))
        self.stats.count(admission.outcome_of(err))
        if type(err) is Cancelled:  # the client's own doing: it knows
            return
        self.failed += 1
        if worth_a_line(self.failed):  # a client can fail requests as fast as it sends them
            self.log(logging.INFO, "request %.80r: %s: %s (%d failed so far)", req.client_id, type(err).__name__,
                     err, self.failed, extra={"request": req.client_id})

    def fail_startup(self, message: str, exit_code: int) -> None:
        self.startup_error = message
        self.exit_code = exit_code
        control.begin_stop(self, "the model failed to load", self.now)

    def emit(self, kind: str, w: slots.Worker | None, **fields: Any) -> None:
        """Every change worth an event is one the maintenance steps must look at."""
        self.dirty = True
        if w is not None:
            fields = {"worker": w.id, "slot": w.slot, "pid": w.pid, "generation": w.generation, **fields}
        self.actions.append(Emit(kind, {"model": self.name, **fields}))

    def log(self, level: int, msg: str, *args: Any, extra: dict | None = None) -> None:
        self.actions.append(Log(level, msg, args, extra or {}))

    def internal_error(self, what: str, ident: bytes | None, rid: Any) -> None:
        """Handling an event raised (a bug of ours): count it, fail the request it concerned."""
        ok_id = admission.usable_id(rid)
        req = self.ledger.get((ident, rid)) if ident is not None and ok_id else None
        err = InternalError(f"the supervisor failed handling this request ({what}); this is a bug in isopool, "
                            "its log has the traceback. The pool goes on: retry")
        if req is not None:
            self.fail(req, err)  # counted as its outcome
            return
        self.stats.count("internal_error")
        if ident is not None:
            self.to_clients.append((ident, encode_error(rid if ok_id else None, err), False))

    @property
    def restarts_total(self) -> int:
        return sum(n for reason, n in self.replacements.items() if reason in blame.FAILURES)


def _on_client(core: Core, e: ev.ClientMessage, now: float) -> None:
    admission.on_client(core, e.ident, e.header, e.body, e.admin, now)


def _on_garbage(core: Core, e: ev.ClientGarbage, now: float) -> None:
    admission.refuse(core, e.ident, e.rid, e.error)


def _on_stalled(core: Core, e: ev.ClientStalled, now: float) -> None:
    if e.stalled:
        core.stalled.add(e.ident)
        core.log(logging.WARNING, "client %s does not read its replies; its new requests are refused until it does",
                 client_alias(e.ident))
    else:
        core.stalled.discard(e.ident)
    core.emit("client_stalled" if e.stalled else "client_reading", None, client=client_alias(e.ident))


def _on_stream_cut(core: Core, e: ev.StreamCut, now: float) -> None:
    admission.cut_stream(core, (e.ident, e.rid))


def _on_gone(core: Core, e: ev.ClientGone, now: float) -> None:
    admission.client_gone(core, e.ident)


def _on_worker(core: Core, e: ev.WorkerMessage, now: float) -> None:
    answers.on_worker(core, e.ident, e.header, e.body, now)


def _on_worker_garbage(core: Core, e: ev.WorkerGarbage, now: float) -> None:
    answers.broken(core, e.ident, e.why, now)


def _on_spawned(core: Core, e: ev.Spawned, now: float) -> None:
    w = core.workers.get(e.slot)
    if w is not None and (w.state is slots.State.STARTING or w.state is slots.State.STOPPING and w.pid is None):
        slots.spawned(core, w, e.pid)


def _on_spawn_failed(core: Core, e: ev.SpawnFailed, now: float) -> None:
    w = core.workers.get(e.slot)
    core.log(logging.ERROR, "worker %s (slot %d) could not be started: %s", "?" if w is None else w.id, e.slot, e.why)
    if w is not None and w.state is slots.State.STARTING and w.pid is None:
        # its next start takes the next generation: status says why this one was skipped
        w.last_error = f"generation {w.generation} could not be started: {e.why}"
        w.move(slots.State.BACKOFF, "spawn failed")
        w.spawn_at = now + (0.0 if e.template else core.config.backoff_base)
    elif w is not None and w.state is slots.State.STOPPING and w.pid is None:
        del core.workers[w.slot]  # stopped before its process existed, which now never will: nothing to wait for
    if e.broken:
        templates.failed(core, e.why, "", now)
    elif e.template:
        templates.stop(core, now, delay=0.0)
    core.dirty = True


def _on_exited(core: Core, e: ev.WorkerExited, now: float) -> None:
    w = core.workers.get(e.slot)
    if w is not None and w.pid is not None and w.state in slots.ALIVE:
        blame.exited(core, w, e.exit, now)


def _on_refused(core: Core, e: ev.SandboxRefused, now: float) -> None:
    answers.refused(core, e)


def _on_sampled(core: Core, e: ev.Sampled, now: float) -> None:
    health.sampled(core, e.slot, e.rss, e.uss, e.cpu_percent)


def _on_template_ready(core: Core, e: ev.TemplateReady, now: float) -> None:
    templates.ready(core, now, e.preload)


def _on_template_failed(core: Core, e: ev.TemplateFailed, now: float) -> None:
    templates.failed(core, e.error, e.traceback, now)


def _on_template_exited(core: Core, e: ev.TemplateExited, now: float) -> None:
    templates.exited(core, e.pid, e.exit, now)


def _on_signal(core: Core, e: ev.SignalReceived, now: float) -> None:
    control.on_signal(core, e.name, now)


def _on_tick(core: Core, e: ev.Tick, now: float) -> None:
    core.tick(now)


_HANDLERS: dict[type, Callable] = {
    ev.ClientMessage: _on_client, ev.ClientGarbage: _on_garbage, ev.ClientStalled: _on_stalled,
    ev.ClientGone: _on_gone, ev.StreamCut: _on_stream_cut, ev.WorkerMessage: _on_worker,
    ev.WorkerGarbage: _on_worker_garbage, ev.Spawned: _on_spawned, ev.SpawnFailed: _on_spawn_failed,
    ev.WorkerExited: _on_exited, ev.Sampled: _on_sampled, ev.TemplateReady: _on_template_ready,
    ev.TemplateFailed: _on_template_failed, ev.TemplateExited: _on_template_exited, ev.SignalReceived: _on_signal,
    ev.Tick: _on_tick, ev.SandboxRefused: _on_refused,
}
