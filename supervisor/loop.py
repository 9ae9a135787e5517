"""The supervisor's shell: one thread, one poll loop, every socket and process. No locks.
(Beside it only the connection guard, connections.py, which touches no pool state.)

    clients ─DEALER─► frontend ROUTER ─┐                    ┌─ a pidfd per worker: exits seen at once
                                       ├─ poll ─► events ───┤─ signal wake-up fd: handlers only record
    workers ─DEALER─► backend ROUTER ──┘     │              └─ the template's socket and pidfd
                                             ▼
                                core (core.py): decisions ──► actions ──► sends, spawns, kills, events

Each pass runs short steps, each only when it has work: read_frontend and read_backend
(messages, decoded and checked by protocol/, handed to the core), read_other (signals,
subscriptions, ZAP, worker output and exits, the template), tick (the core's timers,
reconcile, phases, dispatch), then carry out the actions and send, a burst as one bundle.
All decisions are the core's; this file turns what it sees into events and does what it
is told (actions.py lists both).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import time
from typing import Any

import zmq

from isopool.protocol import encode, ops, schemas
from isopool.protocol.pacing import Pacing
from isopool.protocol.codec import peek_id
from isopool.protocol.errors import BadRequest
from isopool.protocol.transport import Outbox, Oversized, bounds, data, drain, messages

from . import actions as act
from .auth import is_admin
from .blame import wants_last_words
from .config import PoolConfig
from .phase import Phase
from .core import Core
from .devices import parse_devices
from .notify import sd_notify
from .processes import Processes
from .replies import RETRY_S, ClientOutbox
from .sockets import Sockets, StartupError
from .status import build_status, snapshot

log = logging.getLogger("isopool.supervisor")

MAX_BATCH = 512  # messages read from one socket per pass, so no source starves another
LAST_WORDS_S = 0.005  # how long a crash waits for the dead worker's already-sent replies


class Supervisor:
    def __init__(self, config: PoolConfig):
        self.config = config
        self.limits = config.limits
        self.bounds = bounds(config.limits)  # the most one message may hold: more is read and let go
        try:
            self.devices = parse_devices(config.devices)
        except ValueError as exc:
            raise StartupError(str(exc), exit_code=2) from None
        self.pending_signals: list[int] = []
        self.started_at = time.monotonic()
        self.started_wall = time.time()
        self.worked = False  # the last pass read a client's or a worker's message
        self.core: Core | None = None

    # ------------------------------------------------------------ setup

    def open(self) -> None:
        self.io = io = Sockets(self.config)
        self.endpoint = io.endpoint
        self.pacing = Pacing(io.io_threads, self.config.spin_us)  # fed with core.work_s each pass
        # everything for a peer leaves at the end of the pass, a burst as one bundle
        self.reports: list = []  # what sending found out: clients that stall, recover or are gone
        self.to_clients = ClientOutbox(io.frontend, report=self.reports.append)
        self.to_workers = Outbox(io.backend, routed=True, on_error=_reply_dropped)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self.poller = zmq.Poller()
        for fd in (io.frontend, io.backend, io.wake_r.fileno(), io.auth and io.auth.zap, io.events.pub):
            if fd is not None:
                self.poller.register(fd, zmq.POLLIN)
        self.procs = Processes(self.config, self.poller, io.backend_endpoint, io.private_dir)
        self.core = Core(self.config, self.devices, self.procs.marks, random.Random(), now=time.monotonic())

    def close(self) -> None:
        if getattr(self, "procs", None) is not None:
            self.procs.close()
        if getattr(self, "io", None) is not None:
            self.io.close()

    # ------------------------------------------------------------ the loop

    def run(self) -> int:
        try:
            self.open()
            log.info("isopool %s: %d worker(s) of %s, frontend %s", os.getpid(), self.config.workers,
                     self.config.model, self.endpoint)
            core = self.core
            timeout_ms = 0
            while core.phase is not Phase.STOPPED:
                timeout_ms = self.step(timeout_ms)
        finally:
            self.close()
        if self.core.startup_error:
            raise StartupError(self.core.startup_error, self.core.exit_code)
        return self.core.exit_code

    def step(self, timeout_ms: int) -> int:
        """One pass; returns how long the next may sleep (ms)."""
        ready = dict(self.wait(timeout_ms))
        now = time.monotonic()
        io, core = self.io, self.core
        front, back = io.frontend in ready, io.backend in ready
        self.worked = front or back
        if front:
            self.read_frontend(now)
        if back:
            self.read_backend(now)
            if core.to_clients:
                self.carry_out(now)
                self.to_clients.flush()  # answers leave first: nothing below is for their clients
        if len(ready) > front + back:
            try:
                self.read_other(ready, now)
            except Exception:  # a bug of ours: said, counted; the next pass goes on
                self.internal_error("a signal, an exit or the template", None, None)
        try:
            maintained = (core.ledger.queue or core.next_due() <= now) and core.tick(now)
            if core.to_clients or core.to_workers or core.actions:
                self.carry_out(now)
        except Exception:  # a bug of ours: said, counted; the next pass goes on
            self.internal_error("the timers or an action", None, None)
            maintained = False
        if maintained and io.metrics is not None:
            io.metrics.snapshot = snapshot(core, self.procs.dropped, len(io.connections.open), io.connections.shed)
        self.pacing.pace(core.work_s, core.answer_s, len(core.ledger))  # before the sends that wake the I/O thread
        self.to_workers.flush()
        self.to_clients.flush()
        for _ in range(3):  # what the sends found out (bounded: each round only follows the last)
            if not self.reports:
                break
            reports = self.reports[:]
            self.reports.clear()
            for event in reports:
                try:
                    core.handle(event, now)
                except Exception:
                    self.internal_error(type(event).__name__, None, None)
            self.carry_out(now)
            self.to_workers.flush()
            self.to_clients.flush()
        return self.poll_timeout()

    def wait(self, timeout_ms: int) -> list:
        """What is ready to read, waiting at most timeout_ms. While answers come quickly, a pass
        that relayed messages is likely followed by more within a round trip (the worker's
        answer, the client's next request): look for them for up to --spin-us first, awake,
        rather than pay the wake-ups of a sleep (protocol/pacing.py)."""
        # a timer is due after timeout_ms: a spin never delays it
        return self.pacing.wait(self.worked and timeout_ms > 0, self._poll_now, lambda: self.poller.poll(timeout_ms),
                                cap_s=timeout_ms / 1000)

    def _poll_now(self) -> list:
        return self.poller.poll(0)

    def poll_timeout(self) -> int:
        """Sleep until the core's next timer is due, or replies waiting for a client are tried again."""
        due = self.core.next_due()
        if self.to_clients.backlog:
            due = min(due, time.monotonic() + RETRY_S)
        return max(0, int((due - time.monotonic()) * 1000) + 1)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.pending_signals.append(signum)  # the loop acts; a handler only records

    # ------------------------------------------------------------ reading

    def read_frontend(self, now: float) -> None:
        core, auth, limits = self.core, self.io.auth, self.limits
        for frames in drain(self.io.frontend, MAX_BATCH, *self.bounds):
            ident = frames[0].bytes
            if type(frames) is Oversized:
                rid = peek_id(data(frames[1])) if len(frames) > 1 else None
                core.handle(act.ClientGarbage(ident, rid, oversized(frames, limits)), now)
                continue
            # the frame a message came in (its own, or its bundle's) holds its CURVE identity
            admin = auth is None or is_admin(frames[1] if len(frames) > 1 else frames[0])
            for header, body, err in messages(frames, limits, at=1, side=schemas.CLIENT):
                try:
                    if err is None:
                        core.client_message(ident, header, body, admin, now)
                    else:
                        core.handle(act.ClientGarbage(ident, header, err), now)
                except Exception:  # a bug of ours: this request fails, the pool goes on
                    self.internal_error("a client message", ident, header.get("id") if err is None else header)

    def read_backend(self, now: float) -> None:
        core, limits = self.core, self.limits
        for frames in drain(self.io.backend, MAX_BATCH, *self.bounds):
            ident = frames[0].bytes
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
                    self.internal_error("a worker message", *(rid if isinstance(rid, list) and len(rid) == 2
                                                              else (None, None)))

    def read_other(self, ready: dict, now: float) -> None:
        """The rare sources: signals, event subscriptions, ZAP, pidfds, output and the template."""
        io, core = self.io, self.core
        if io.wake_r.fileno() in ready:
            io.drain_wake()
            while self.pending_signals:
                core.handle(act.SignalReceived(signal.Signals(self.pending_signals.pop(0)).name), now)
            fields = io.connections.event()
            if fields is not None:
                log.warning("shed client connections to keep descriptors for restarts: %s", fields)
                io.events.emit("connections_shed", fields)
        if io.events.pub is not None and io.events.pub in ready:
            io.events.read_subscriptions()
        if io.auth is not None and io.auth.zap in ready:
            io.auth.handle()
        for event in self.procs.template_events():
            core.handle(event, now)
        for event in self.procs.ready(ready, now):
            if wants_last_words(core, event.slot):
                self.collect_last_words(event.slot, now)
            core.handle(event, now)
            self.procs.forget(event.slot)

    def collect_last_words(self, slot: int, now: float) -> None:
        """Read what a dead worker sent before it died, so the right request takes the blame."""
        end = time.monotonic() + LAST_WORDS_S
        while wants_last_words(self.core, slot) and \
                self.io.backend.poll(max(0, int((end - time.monotonic()) * 1000)), zmq.POLLIN):
            self.read_backend(now)

    # ------------------------------------------------------------ acting

    def carry_out(self, now: float) -> None:
        """Do what the core decided, in order; what it reports back is handled at once."""
        core = self.core
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
                    self.perform(a, now)
                except Exception:  # a bug of ours, or a process call that failed: said, counted
                    self.internal_error(f"the action {type(a).__name__}", None, None)

    def perform(self, a: Any, now: float) -> None:
        core, procs = self.core, self.procs
        kind = type(a)
        if kind is act.Log:
            log.log(a.level, a.msg, *a.args, extra=a.extra)
        elif kind is act.Emit:
            self.io.events.emit(a.kind, a.fields)
        elif kind is act.Spawn:
            core.handle(procs.spawn(a.slot, a.generation, a.device, a.worker_id), now)
        elif kind is act.Kill:
            procs.kill(a.slot, a.sig)
        elif kind is act.Sample:
            for slot in a.slots:
                measured = procs.sample(slot)
                if measured is not None:
                    core.handle(act.Sampled(slot, *measured), now)
        elif kind is act.AnswerStatus:
            status = build_status(core, self.facts(), now)
            self.to_clients.post([a.ident, *encode(ops.RESULT, a.rid, status)], False)
        elif kind is act.StartTemplate:
            procs.start_template()
        elif kind is act.StopTemplate:
            procs.stop_template()
        elif kind is act.ReapStrays:
            procs.end_strays(now)
        elif kind is act.Notify:
            sd_notify(a.state)

    def internal_error(self, what: str, ident: bytes | None, rid: Any) -> None:
        """The last line: an exception escaped the handling of one event. Log its traceback;
        the core counts it and fails the request it concerned; the loop goes on."""
        log.exception("internal error handling %s; the pool goes on", what)
        try:
            self.core.internal_error(what, ident, rid)
        except Exception:
            log.exception("could not fail the request either")

    def facts(self) -> dict:
        """What only the shell knows, for status."""
        io = self.io
        return {"pid": os.getpid(), "time": time.time(), "started_at": self.started_at, "started_wall": self.started_wall, "endpoint": self.endpoint,
                "events_endpoint": io.events.endpoint, "event_subscribers": io.events.subscribers,
                "metrics_url": io.metrics_url, "auth_denied": io.auth.denied if io.auth is not None else None,
                "output_dropped": self.procs.dropped, "replies_waiting": self.to_clients.waiting(),
                "replies_dropped": self.to_clients.dropped, **io.connections.facts(time.monotonic())}


def oversized(frames: Oversized, limits) -> BadRequest:
    """The refusal of a message past the read bounds; its sender's size (the routing frame not counted)."""
    size, count = frames.size - len(frames[0]), frames.count - 1
    return BadRequest(f"a message of {size} bytes in {count} frames was refused: over "
                      f"max_message_bytes={limits.max_message_bytes} (or its frame bound) and read no further. "
                      f"Send less, or raise {limits.flag('max_message_bytes')}",
                      setting="max_message_bytes", limit=limits.max_message_bytes)


def _reply_dropped(peer: bytes | None, exc: zmq.ZMQError) -> None:
    log.debug("messages to a departed peer %r dropped: %s", peer, exc)  # nothing to tell it

