"""The simulated processes of sim.py: workers and the template, as the core sees them.

A simulated worker answers READY after a start-up time, runs what it is sent one request
at a time (marking its board as a real one does), streams parts, holds finished answers a
moment, heartbeats when idle, and can hang (run nothing, say nothing, ignore TERM; now and
then ignore KILL too, as a process stuck in the kernel does) or die at any moment; what it sent before dying still arrives. The world (sim.World) mixes this
in: it carries out the core's actions here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

from isopool.protocol import ops, pack_header
from isopool.protocol.contract import parse_ident

from . import actions as ev
from .slots import State
from .status import build_status


class Violation(AssertionError):
    """A guarantee the simulation saw broken."""


def header_of(frames: list) -> dict:
    return msgpack.unpackb(frames[0])


@dataclass
class SimWorker:
    slot: int
    gen: int
    pid: int
    ident: bytes
    capacity: int
    inbox: list = field(default_factory=list)  # RUN messages received, not yet run: [header, body]
    running: Any = None  # (header, body, done_at, parts_left)
    started: int = 0  # board marks
    finished: int = 0
    alive: bool = True
    ready: bool = False
    hung: bool = False  # runs nothing more, sends nothing, ignores TERM
    unkillable: bool = False  # hung in the kernel: ignores KILL too, for good
    given_up: bool = False  # the core gave up on it (GiveUp): no longer the pool's
    cancelled: set = field(default_factory=set)


class Processes:
    """Mixed into sim.World, which provides rng, now, core, config, workers, later() and deliver()."""

    def exit(self, w: "SimWorker", code: int) -> None:
        if not w.alive:
            return
        w.alive = False
        core = self.core
        cw = core.workers.get(w.slot)
        crash = cw is not None and cw.state is not State.STOPPING
        self.deliver(ev.WorkerExited(w.slot, {"exit_code": code if code >= 0 else None,
                                              "signal": None if code >= 0 else "SIG", "reason": f"code {code}"}))
        if self.workers.get(w.slot) is w:
            del self.workers[w.slot]
        for req in core.ledger.open.values():
            if req.worker == w.slot and cw is not None and cw.generation == w.gen:
                raise Violation(f"{req.key} is still dispatched to dead worker {w.slot}.{w.gen}")
        cw = core.workers.get(w.slot)
        if crash and cw is not None and cw.state is State.BACKOFF and cw.crashes_in_row >= 2:
            least = min(self.config.backoff_max, self.config.backoff_base * 2 ** (cw.crashes_in_row - 2)) * 0.5
            if cw.spawn_at - self.now < least - 1e-9:
                raise Violation(f"slot {w.slot} restarts {cw.spawn_at - self.now:.3f}s after its "
                                f"{cw.crashes_in_row}th crash in a row, under its backoff {least:.3f}s")

    # ------------------------------------------------------------ carrying out the core's actions

    def carry_out(self) -> None:
        core = self.core
        while core.to_clients or core.to_workers or core.actions:
            to_clients, to_workers, actions = core.take()
            for ident, frames, _ in to_clients:
                self.on_reply(ident, frames)
            for ident, frames in to_workers:
                self.to_worker(ident, frames)
            for a in actions:
                self.perform(a)

    def perform(self, a: Any) -> None:
        rng, core, kind = self.rng, self.core, type(a)
        if kind is ev.Spawn:
            if rng.random() < 0.03:
                core.handle(ev.SpawnFailed(a.slot, "EMFILE", template=self.config.preload != "none"), self.now)
                return
            pid = next(self.pids)
            w = SimWorker(a.slot, a.generation, pid, b"%d.%d.%s" % (a.slot, a.generation, a.token.encode()), capacity=self.config.prefetch)
            self.workers[a.slot] = w
            core.handle(ev.Spawned(a.slot, pid), self.now)
            self.later(rng.choice((0.001, 0.01, 0.3)), lambda: self.ready(w))
        elif kind is ev.Kill:
            w = self.workers.get(a.slot)
            if w is not None and w.alive and not w.unkillable and (a.sig == "KILL" or not w.hung):
                self.later(rng.random() * 0.01, lambda: self.exit(w, -15 if a.sig == "TERM" else -9))
        elif kind is ev.GiveUp:
            w = self.workers.get(a.slot)
            if w is None or not w.unkillable:
                raise Violation(f"slot {a.slot}'s process was given up on, but it could be killed")
            w.given_up = True
        elif kind is ev.Sample:
            for slot in a.slots:
                core.handle(ev.Sampled(slot, rng.randint(1, 100) << 20, 0, 0.0), self.now)
                if rng.random() < 0.01:  # a sandboxed model tried a call its filter holds back
                    core.handle(ev.SandboxRefused(slot, rng.choice(("kill", "mount")), rng.choice((None, 1)), 7), self.now)
        elif kind is ev.StartTemplate:
            def start():
                r = rng.random()
                if r < 0.9:
                    self.template_live = True
                    self.deliver(ev.TemplateReady())
                else:
                    self.deliver(ev.TemplateFailed("model failed to load: boom"))
            self.later(rng.choice((0.001, 0.05)), start)
        elif kind is ev.StopTemplate:
            self.template_live = False
        elif kind is ev.AnswerStatus:
            facts = {"pid": 1, "time": 0.0, "started_at": 0.0, "started_wall": 0.0, "endpoint": "sim", "events_endpoint": None,
                     "event_subscribers": 0, "metrics_url": None, "auth_denied": None}
            status = build_status(core, facts, self.now)
            if status["pool"]["queue_depth"] != core.ledger.queued:
                raise Violation("status disagrees with the ledger")

    def ready(self, w: SimWorker) -> None:
        if not w.alive or w.hung:
            return
        if self.rng.random() < 0.02:  # the model would not build
            self.from_worker(w, [pack_header(ops.LOAD_FAILED, None), msgpack.packb({"type": "RemoteError",
                                                                                   "message": "boom"})])
            self.later(0.001, lambda: self.exit(w, 78))
            return
        w.ready = True
        self.from_worker(w, [pack_header(ops.READY, None, capacity=w.capacity)])
        self.later(self.config.heartbeat_interval, lambda: self.heartbeat(w))

    def heartbeat(self, w: SimWorker) -> None:
        if w.alive and not w.hung:
            if w.running is None:
                self.from_worker(w, [pack_header(ops.HEARTBEAT, None)])
            self.later(self.config.heartbeat_interval, lambda: self.heartbeat(w))

    def to_worker(self, ident: bytes, frames: list) -> None:
        parsed = parse_ident(ident)
        w = self.workers.get(parsed[0]) if parsed else None
        header = header_of(frames)
        if header["op"] == ops.RUN:
            self.dispatches[tuple(header["id"])] = (ident, header["attempt"])
        if w is None or w.ident != ident or not w.alive:
            return  # ZeroMQ drops messages to a departed peer
        if header["op"] == ops.RUN:
            w.inbox.append((header, frames[1:]))
            self.later(0.0001, lambda: self.work(w))
        elif header["op"] == ops.CANCEL:
            w.cancelled.add(tuple(header["id"]))
        elif header["op"] == ops.STOP and not w.hung:
            self.later(0.001, lambda: self.exit(w, 0))

    def work(self, w: SimWorker) -> None:
        """Run the next request, or finish the one running; answers leave after a short hold."""
        if not w.alive or w.hung:
            return
        if w.running is not None:
            header, body, parts = w.running
            key = tuple(header["id"])
            payload = msgpack.unpackb(body[0])
            if payload["crash"]:
                self.exit(w, -11)  # a segfault, at the input's hands
                return
            reply = {"token": payload["token"], "by": w.ident, "attempt": header["attempt"]}
            if parts and key not in w.cancelled:
                w.running = (header, body, parts - 1)
                self.from_worker(w, [pack_header(ops.CHUNK, header["id"], attempt=header["attempt"]),
                                     msgpack.packb(reply)])
                self.later(0.001, lambda: self.work(w))
                return
            w.finished = header["seq"]
            w.running = None
            self.from_worker(w, [pack_header(ops.RESULT, header["id"], attempt=header["attempt"]),
                                 msgpack.packb(reply)], hold=self.rng.choice((0.0, 0.0, 0.002)))
        if w.inbox and w.running is None:
            header, body = w.inbox.pop(0)
            if header["deadline"] <= self.now:  # the worker refuses an expired request unstarted
                self.from_worker(w, [pack_header(ops.ERROR, header["id"], attempt=header["attempt"]),
                                     msgpack.packb({"type": "RequestTimeout", "message": "expired"})])
                self.later(0.0001, lambda: self.work(w))
                return
            w.started = header["seq"]
            parts = 2 if header.get("stream", False) else 0
            w.running = (header, body, parts)
            self.later(msgpack.unpackb(body[0])["work"], lambda: self.work(w))

    def from_worker(self, w: SimWorker, frames: list, hold: float = 0.0) -> None:
        """A message on its way to the supervisor; it arrives even if its sender dies meanwhile."""
        def arrive():
            self.deliver(ev.WorkerMessage(w.ident, header_of(frames), frames[1:]))
        self.later(hold + self.rng.random() * 0.0005, arrive)
