"""The supervisor's shell: one thread, one poll loop, every socket and process. No locks.
(Beside it only the connection guard, connections.py, which touches no pool state.)

    clients ─DEALER─► frontend ROUTER ─┐                    ┌─ a pidfd per worker: exits seen at once
                                       ├─ poll ─► events ───┤─ signal wake-up fd: handlers only record
    workers ─DEALER─► backend ROUTER ──┘     │              └─ the template's socket and pidfd
                                             ▼
                                core (core.py): decisions ──► actions ──► sends, spawns, kills, events

Each pass runs short steps, each only when it has work: read_frontend and read_backend
(messages, decoded and checked by protocol/, handed to the core of the model they name),
read_other (signals, subscriptions, ZAP, worker output and exits, the templates), tick
(each core's timers, reconcile, phases, dispatch), then carry out the actions and send, a
burst as one bundle. All decisions are the cores'; this file turns what it sees into
events and does what it is told (actions.py lists both). Several models are several cores
(models.py), one per model, sharing the sockets and the processes.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

import zmq

from isopool.logs import worth_a_line
from isopool.protocol import IsopoolError, encode, encode_error, ops, schemas
from isopool.protocol.pacing import Pacing
from isopool.protocol.headers import peek_id
from isopool.protocol.contract import parse_ident
from isopool.protocol.transport import Outbox, Oversized, bounds, data, drain, messages, oversized

from . import actions as act
from .answers import stranger
from .auth import is_admin, mark_peer
from .blame import wants_last_words
from .config import PoolConfig, ServeConfig
from .devices import parse_devices
from .gateways import Gateways, open_gateways
from .models import Models, Served
from .phase import Phase
from .notify import sd_notify
from .processes import Processes
from .replies import RETRY_S, ClientOutbox
from .sockets import Sockets, StartupError
from .facts import shell_facts
from .status import StatusAnswer, daemon_status, snapshot

log = logging.getLogger("isopool.supervisor")

MAX_BATCH = 512  # messages read from one socket per pass, so no source starves another
CLIENTS_PASS_S = 0.02  # clients' messages read a pass at most (some are slow to check): then workers, timers, signals
LAST_WORDS_S = 0.005  # how long a crash waits for the dead worker's already-sent replies


class Supervisor:
    def __init__(self, config: ServeConfig | PoolConfig):
        self.config = config if isinstance(config, ServeConfig) else ServeConfig([config])
        self.daemon = daemon = self.config.daemon  # the settings every model shares: sockets, limits, timers
        self.limits = daemon.limits
        self.bounds = bounds(daemon.limits)  # the most one message may hold: more is read and let go
        for cfg in self.config.models:
            try:
                parse_devices(cfg.devices)
            except ValueError as exc:
                raise StartupError(str(exc), exit_code=2) from None
        self.pending_signals: list[int] = []
        self.started_at = time.monotonic()
        # backend messages under identities the supervisor never gave; exceptions that escaped an event's handling
        self.strangers = self.internal_errors = 0
        self.started_wall = time.time()
        self.worked = False  # the last pass read a client's or a worker's message
        self.models: Models | None = None
        self.startup_error: tuple[str, int] | None = None
        self.gateways: Gateways | None = None
        self.status_answer = StatusAnswer()

    # ------------------------------------------------------------ setup

    def open(self) -> None:
        self.io = io = Sockets(self.daemon)
        self.endpoint = io.endpoint
        self.pacing = Pacing(io.io_threads, self.daemon.spin_us)  # fed with the cores' work_s each pass
        # everything for a peer leaves at the end of the pass, a burst as one bundle
        self.reports: list = []  # what sending found out: clients that stall, recover or are gone
        self.to_clients = ClientOutbox(io.frontend, report=self.reports.append)
        self.to_workers = Outbox(io.backend, routed=True, on_error=_reply_dropped)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self.poller = zmq.Poller()
        for fd in (io.frontend, io.backend, io.wake_r.fileno(), io.zap.sock, io.events.pub):
            if fd is not None:
                self.poller.register(fd, zmq.POLLIN)
        self.procs = Processes(self.daemon, self.poller, io.backend_endpoint, io.private_dir)
        io.zap.admit = self.procs.admit  # a backend connection only from a worker's process, and once
        self.models = Models(self.procs.marks, time.monotonic())
        for cfg in self.config.models:
            self.models.add(cfg, time.monotonic(), initial=True)
        self.gateways = open_gateways(self.daemon, io, self.poller)
        if self.gateways is not None:
            self.procs.also_known = self.gateways.pids  # children of ours that no worker left behind

    def close(self) -> None:
        for part in ("gateways", "procs", "io"):  # in this order; each only if it was opened
            if getattr(self, part, None) is not None:
                getattr(self, part).close()

    # ------------------------------------------------------------ the loop

    def run(self) -> int:
        try:
            self.open()
            for served in self.models:
                log.info("isopool %s: %d worker(s) of %s (%s), frontend %s", os.getpid(), served.config.workers,
                         served.config.model, served.name, self.endpoint)
            timeout_ms = 0
            while any(s.core.phase is not Phase.STOPPED for s in self.models):
                timeout_ms = self.step(timeout_ms)
        finally:
            self.close()
        if self.startup_error is not None:
            raise StartupError(*self.startup_error)
        return max((s.core.exit_code for s in self.models), default=0)

    def step(self, timeout_ms: int) -> int:
        """One pass; returns how long the next may sleep (ms)."""
        ready = dict(self.wait(timeout_ms))
        now = time.monotonic()
        io = self.io
        front, back = io.frontend in ready, io.backend in ready
        self.worked = front or back
        if front:
            self.read_frontend(now)
        if back:
            self.read_backend(now)
            self.carry_out(now)
            self.to_clients.flush()  # answers leave first: nothing below is for their clients
        if len(ready) > front + back or self.procs.read_ahead():  # (a template's lines read early wait too)
            try:
                self.read_other(ready, now)
            except Exception:  # a bug of ours: said, counted; the next pass goes on
                self.internal_error("a signal, an exit or the template", None, None, None)
        maintained = False
        for served in self.models:
            core = served.core
            try:
                maintained = ((core.ledger.queue or core.next_due() <= now) and core.tick(now)) or maintained
                if core.to_clients or core.to_workers or core.actions:
                    self.carry_out_for(served, now)
            except Exception:  # a bug of ours: said, counted; the next pass goes on
                self.internal_error("the timers or an action", served, None, None)
        failed = self.models.settle(now, self.io.events.emit, self.procs.stop_template)
        if failed is not None and self.startup_error is None:  # a model given at start did not load
            self.startup_error = failed
            for served in self.models:
                self.carry_out_for(served, now)
        if self.gateways is not None:
            self.emit_all(self.gateways.tick(now))
        if maintained and io.metrics is not None:
            io.metrics.snapshot = {s.name: snapshot(s.core, self.procs.dropped_of(s.name), len(io.connections.open),
                                                    io.connections.shed) for s in self.models}
        cores = self.models.cores()
        self.pacing.pace(min(c.work_s for c in cores), min(c.answer_s for c in cores),
                         sum(len(c.ledger) for c in cores))  # before the sends that wake the I/O thread
        self.to_workers.flush()
        self.to_clients.flush()
        for _ in range(3):  # what the sends found out (bounded: each round only follows the last)
            if not self.reports:
                break
            reports = self.reports[:]
            self.reports.clear()
            for event in reports:  # a client stalled, recovered or gone: every model holds its requests
                for served in self.models:
                    try:
                        served.core.handle(event, now)
                    except Exception:
                        self.internal_error(type(event).__name__, served, None, None)
            self.carry_out(now)
            self.to_workers.flush()
            self.to_clients.flush()
        return self.poll_timeout()

    def emit_all(self, events: list[tuple[str, dict]]) -> None:
        for kind, fields in events:
            self.io.events.emit(kind, fields)

    def wait(self, timeout_ms: int) -> list:
        """What is ready to read, waiting at most timeout_ms. While answers come quickly, a pass
        that relayed messages is likely followed by more within a round trip (the worker's
        answer, the client's next request): look for them for up to --spin-us first, awake,
        rather than pay the wake-ups of a sleep (protocol/pacing.py)."""
        # a timer is due after timeout_ms: a spin never delays it
        return self.pacing.wait(self.worked and timeout_ms > 0, lambda: self.poller.poll(0),
                                lambda: self.poller.poll(timeout_ms), cap_s=timeout_ms / 1000)

    def poll_timeout(self) -> int:
        """Sleep until a core's next timer is due, or replies waiting for a client are tried again."""
        due = min(s.core.next_due() for s in self.models) if not self.procs.read_ahead() else 0.0
        if self.gateways is not None:
            due = min(due, self.gateways.next_due())
        if self.to_clients.backlog:
            due = min(due, time.monotonic() + RETRY_S)
        return max(0, int((due - time.monotonic()) * 1000) + 1)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.pending_signals.append(signum)  # the loop acts; a handler only records

    # ------------------------------------------------------------ reading

    def read_frontend(self, now: float) -> None:
        auth, limits, models = self.io.auth, self.limits, self.models
        for frames in drain(self.io.frontend, MAX_BATCH, *self.bounds, until=time.monotonic() + CLIENTS_PASS_S):
            ident = frames[0].bytes
            if type(frames) is Oversized:
                rid = peek_id(data(frames[1])) if len(frames) > 1 else None
                models.first.core.handle(act.ClientGarbage(ident, rid, oversized(frames, limits)), now)
                continue
            who = frames[1] if len(frames) > 1 else frames[0]  # its own frame or its bundle's: the User-Id
            admin = auth is None or is_admin(who)
            for header, body, err in messages(frames, limits, at=1, side=schemas.CLIENT):
                served = None
                try:
                    if err is not None:
                        models.first.core.handle(act.ClientGarbage(ident, header, err), now)
                        continue
                    op = header["op"]
                    mark_peer(header, who)  # a hello's pid, and an infer's shared memory: the kernel's word
                    if op == ops.INFER:
                        served = models.route(header.get("model"))
                        served.core.client_message(ident, header, body, admin, now)
                    elif op == ops.CANCEL:
                        name = header.get("model")
                        for served in (models.route(name),) if name is not None else models:
                            served.core.client_message(ident, header, body, admin, now)
                    elif op == ops.CONTROL:
                        result = models.control(header["action"], header.get("args") or {}, admin, now)
                        self.to_clients.post([ident, *encode(ops.RESULT, header["id"], result)], False)
                    else:  # status, hello: about the daemon; any core answers (status is merged here)
                        models.first.core.client_message(ident, header, body, admin, now)
                except IsopoolError as refused:  # no such model, or a control op refused
                    self.to_clients.post([ident, *encode_error(header.get("id"), refused)], header.get("bundles") is True)
                except Exception:  # a bug of ours: this request fails, the pool goes on
                    self.internal_error("a client message", served, ident, header.get("id") if err is None else header)

    def read_backend(self, now: float) -> None:
        limits, by_slot = self.limits, self.models.by_slot
        for frames in drain(self.io.backend, MAX_BATCH, *self.bounds):
            parsed = parse_ident(ident := frames[0].bytes)
            served = by_slot.get(parsed[0]) if parsed else None
            if served is None:  # a stale worker of a model no longer served, or a stranger (counted)
                self.strangers = stranger(self.strangers) if parsed is None else self.strangers
                continue
            core = served.core
            if type(frames) is Oversized:
                core.handle(act.WorkerGarbage(ident, str(oversized(frames, limits))), now)
                continue
            for header, body, err in messages(frames, limits, at=1, side=schemas.WORKER):
                try:
                    if err is None:
                        core.worker_message(ident, header, body, now)
                    else:
                        core.handle(act.WorkerGarbage(ident, str(err)), now)
                except Exception:  # a bug of ours: the request it answered fails, the pool goes on
                    rid = header.get("id") if err is None else None
                    self.internal_error("a worker message", served, *(rid if isinstance(rid, list) and len(rid) == 2
                                                                      else (None, None)))

    def read_other(self, ready: dict, now: float) -> None:
        """The rare sources: signals, event subscriptions, ZAP, pidfds, output and the templates."""
        io, models = self.io, self.models
        if io.wake_r.fileno() in ready:
            io.drain_wake()
            while self.pending_signals:
                name = signal.Signals(self.pending_signals.pop(0)).name
                for served in models:
                    served.core.handle(act.SignalReceived(name), now)
            for kind, fields in io.connections.events():
                if kind == "connections_shed":
                    log.warning("shed client connections to keep descriptors for restarts: %s", fields)
                io.events.emit(kind, fields)
        if io.events.pub is not None and io.events.pub in ready:
            io.events.read_subscriptions()
        if io.zap.sock in ready:  # someone connects: a client with CURVE, or a worker
            io.zap.handle(io.events)
            while self.procs.cut_off:  # a worker connecting again lost its connection: it is replaced
                slot = self.procs.cut_off.pop()
                served = models.by_slot.get(slot)
                w = served.core.workers.get(slot) if served is not None else None
                if w is not None:
                    served.core.handle(act.WorkerGarbage(w.ident, "it lost its connection to the supervisor, "
                                                         "which hears it no more"), now)
        if self.gateways is not None:
            self.emit_all(self.gateways.ready(ready, now))
        for name, event in self.procs.template_events():
            served = models.by_name.get(name)
            if served is not None:
                served.core.handle(event, now)
        for event in self.procs.ready(ready, now):  # exits, and calls a worker's sandbox refused
            served = models.by_slot.get(event.slot)
            if served is None:  # its model was removed meanwhile
                self.procs.forget(event.slot)
                continue
            if type(event) is act.SandboxRefused:
                served.core.handle(event, now)
                continue
            if wants_last_words(served.core, event.slot):
                self.collect_last_words(served, event.slot, now)
            served.core.handle(event, now)
            self.procs.forget(event.slot)
            models.let_go(event.slot, served)

    def collect_last_words(self, served: Served, slot: int, now: float) -> None:
        """Read what a dead worker sent before it died, so the right request takes the blame."""
        end = time.monotonic() + LAST_WORDS_S
        while wants_last_words(served.core, slot) and \
                self.io.backend.poll(max(0, int((end - time.monotonic()) * 1000)), zmq.POLLIN):
            self.read_backend(now)

    # ------------------------------------------------------------ acting

    def carry_out(self, now: float) -> None:
        for served in self.models:
            core = served.core
            if core.to_clients or core.to_workers or core.actions:
                self.carry_out_for(served, now)

    def carry_out_for(self, served: Served, now: float) -> None:
        """Do what one model's core decided, in order; what it reports back is handled at once."""
        core = served.core
        while core.to_clients or core.to_workers or core.actions:
            to_clients, to_workers, actions = core.take()
            if to_clients:
                post = self.to_clients.post
                for ident, frames, bundles in to_clients:
                    post([ident, *frames], bundles)
            if to_workers:
                post = self.to_workers.post
                for ident, frames in to_workers:
                    post([ident, *frames])
            for a in actions:
                try:
                    self.perform(a, served, now)
                except Exception:  # a bug of ours, or a process call that failed: said, counted
                    self.internal_error(f"the action {type(a).__name__}", served, None, None)

    def perform(self, a: Any, served: Served, now: float) -> None:
        core, procs = served.core, self.procs
        kind = type(a)
        if kind is act.Log:
            log.log(a.level, a.msg, *a.args, extra=a.extra)
        elif kind is act.Emit:
            self.io.events.emit(a.kind, a.fields)
        elif kind is act.Spawn:
            self.models.by_slot[a.slot] = served
            core.handle(procs.spawn(a.slot, a.generation, a.device, a.worker_id, served.config, a.token), now)
        elif kind is act.Kill:
            procs.kill(a.slot, a.sig)
        elif kind is act.GiveUp:  # alive long after SIGKILL: watched no more, a stray from now on
            procs.forget(a.slot)
            self.models.let_go(a.slot, served)
        elif kind is act.Sample:
            for slot in a.slots:
                measured = procs.sample(slot)
                if measured is not None:
                    core.handle(act.Sampled(slot, *measured), now)
        elif kind is act.AnswerStatus:
            status = self.status_answer.frames(a.rid, now, lambda: daemon_status(
                self.models, shell_facts(self), self.procs.dropped_of, now))
            self.to_clients.post([a.ident, *status], False)
        elif kind is act.StartTemplate:
            procs.start_template(served.config)
        elif kind is act.StopTemplate:
            procs.stop_template(served.name)
        elif kind is act.ReapStrays:
            procs.end_strays(now)
        elif kind is act.Notify:
            self.notify(served, a.state)

    def notify(self, served: Served, state: str) -> None:
        """READY=1 once every model given at start is ready; anything else as it comes."""
        if not state.startswith("READY=1") or self.models.all_ready(served):
            sd_notify(state)

    def internal_error(self, what: str, served: Served | None, ident: bytes | None, rid: Any) -> None:
        """The last line: an event's handling raised. Logged (worth_a_line); the core fails its request."""
        self.internal_errors += 1
        if worth_a_line(self.internal_errors):
            log.exception("internal error handling %s (%d so far); the pool goes on", what, self.internal_errors)
        try:
            (served or self.models.first).core.internal_error(what, ident, rid)
        except Exception:  # noqa: BLE001 - the last line has no line behind it
            log.exception("could not fail the request either")


def _reply_dropped(peer: bytes | None, exc: zmq.ZMQError) -> None:  # a departed peer: nothing to tell it
    log.debug("messages to a departed peer %r dropped: %s", peer, exc)

