"""Deterministic simulation of the supervisor's core: the real core, driven by a seeded world.

    world (this file)                                   the core (core.py), unchanged
    clients ── infer, cancel, status, control ──────►   events
    workers ── ready, heartbeat, result, chunk ─────►     │
    processes ─ exits (at any moment), hangs ───────►     ▼
    template ── ready, failed, died ────────────────►   actions ──► the world carries them out
    the clock ─ jumps to the next thing due ────────►             (spawn, kill, run, stop, ...)

Everything random comes from one seed, so a failing seed replays exactly:

    python -m isopool.supervisor.sim --seed 1234           one seed, with what it checked
    python -m isopool.supervisor.sim --seeds 5000          many seeds, from 0

After every step the guarantees are checked (check(), the INVARIANTS below); at the end
the pool is stopped and every accepted request must have had exactly one final answer.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import msgpack

from isopool.protocol import ops, pack_header
from isopool.protocol.contract import parse_ident

from . import actions as ev
from .blame import FAILURES
from .config import PoolConfig
from .control import Phase
from .core import Core
from .slots import ALIVE, SERVING, State
from .status import build_status

INVARIANTS = (
    "every accepted request gets exactly one final answer (none twice; all, once the pool has stopped)",
    "every refused request gets exactly one error, at once",
    "no answer reaches the wrong request, or comes from an attempt the request has left",
    "no request is both queued and dispatched; a dispatched one is held by a live worker",
    "the queue never takes a request past --max-queue",
    "a dead worker's requests are settled at once",
    "a slot restarts after a crash no sooner than its backoff allows",
    "a draining or stopping pool accepts nothing new",
    "live workers converge to the target once faults stop",
)


class Violation(AssertionError):
    pass


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
    cancelled: set = field(default_factory=set)


class World:
    def __init__(self, seed: int, steps: int = 300):
        self.seed, self.steps = seed, steps
        self.rng = rng = random.Random(seed)
        self.config = PoolConfig(
            workers=rng.randint(1, 3), max_queue=rng.randint(2, 12), prefetch=rng.randint(1, 3),
            max_attempts=rng.randint(1, 3), poison_threshold=rng.randint(2, 3), request_timeout=rng.choice((2.0, 5.0)),
            heartbeat_timeout=2.0, start_timeout=3.0, kill_grace=0.5, drain_timeout=5.0, backoff_base=0.05,
            backoff_max=1.0, max_restarts=rng.randint(3, 10), restart_window=10.0,
            isolation=rng.choice(("none", "none", "tenant", "request")), preload=rng.choice(("imports", "none")),
            max_requests=rng.choice((0, 0, 5)), spin_us=0)
        self.now = 1000.0
        self.workers: dict[int, SimWorker] = {}  # slot -> its current process
        self.template_live = False
        self.pids = itertools.count(100)
        self.timeline: list = []  # (time, seq, action) of things the world will do
        self.seq = itertools.count()
        self.core = Core(self.config, ["cpu"], self.marks, random.Random(seed + 1), now=self.now)
        self.clients = [b"c%d" % i for i in range(rng.randint(1, 3))]
        self.next_id = itertools.count(1)
        self.sent: dict[tuple, dict] = {}  # key -> what the client sent (token) and what it got
        self.accepted: set = set()
        self.dispatches: dict[tuple, tuple] = {}  # key -> (worker ident, attempt) of its latest RUN
        self.crash_exits: dict[int, float] = {}  # slot -> when it last crashed
        self.faults = True
        self.log: list[str] = []

    # ------------------------------------------------------------ the world's side of the board

    def marks(self, slot: int) -> tuple[int, int] | None:
        w = self.workers.get(slot)
        return (w.started, w.finished) if w is not None else None

    def later(self, delay: float, action: Callable[[], None]) -> None:
        heapq.heappush(self.timeline, (self.now + delay, next(self.seq), action))

    # ------------------------------------------------------------ running

    def run(self) -> None:
        self.deliver(ev.Tick())
        for step in range(self.steps):
            self.step(step)
        self.faults = False
        self.settle(30.0)  # calm: no faults, no new work
        self.check_converged()
        self.deliver(ev.SignalReceived("SIGTERM"))
        self.settle(self.config.drain_timeout + 10.0)
        if self.core.phase is not Phase.STOPPED:
            self.deliver(ev.SignalReceived("SIGTERM"))
            self.settle(10.0)
        self.check_stopped()

    def step(self, i: int) -> None:
        r = self.rng.random()
        if r < 0.35:
            self.client_action()
        elif r < 0.42 and self.faults:
            self.fault()
        else:
            self.advance()

    def advance(self) -> None:
        """Move the clock to the next thing due (the world's or the core's) and do it."""
        due = self.core.next_due()
        if self.timeline and self.timeline[0][0] <= due:
            at, _, action = heapq.heappop(self.timeline)
            self.now = max(self.now, at)
            action()
        else:
            self.now = max(self.now, due)
            self.deliver(ev.Tick())

    def settle(self, seconds: float) -> None:
        end = self.now + seconds
        for _ in range(20000):
            if self.now >= end or self.core.phase is Phase.STOPPED and not self.timeline:
                return
            self.advance()

    def deliver(self, event: Any) -> None:
        self.core.handle(event, self.now)
        self.carry_out()
        self.check()

    # ------------------------------------------------------------ clients

    def client_action(self) -> None:
        rng, core = self.rng, self.core
        client = rng.choice(self.clients)
        r = rng.random()
        if r < 0.75:
            self.infer(client)
        elif r < 0.85 and self.sent:
            key = rng.choice(list(self.sent))
            self.deliver(ev.ClientMessage(key[0], {"op": ops.CANCEL, "id": key[1]}, []))
        elif r < 0.9:
            self.deliver(ev.ClientMessage(client, {"op": ops.STATUS, "id": 0}, []))
        elif r < 0.96:
            n = rng.randint(1, 4)
            self.deliver(ev.ClientMessage(client, {"op": ops.CONTROL, "id": 0, "action": ops.SCALE,
                                                   "args": {"workers": n}}, []))
        elif r < 0.98:
            self.deliver(ev.ClientMessage(client, {"op": ops.CONTROL, "id": 0, "action": ops.RELOAD}, []))
        else:
            self.deliver(ev.SignalReceived("SIGHUP"))

    def infer(self, client: bytes) -> None:
        rng, core = self.rng, self.core
        dup = self.sent and rng.random() < 0.05
        key = rng.choice(list(self.sent)) if dup else (client, next(self.next_id))
        if dup and key[0] != client:
            key = (client, next(self.next_id))
        token = rng.getrandbits(32)
        header = {"op": ops.INFER, "id": key[1], "retry": rng.random() < 0.8, "stream": rng.random() < 0.2}
        if rng.random() < 0.3:
            header["timeout"] = rng.choice((0.05, 0.5, 1.0, 3.0))
        if rng.random() < 0.3:
            header["tenant"] = rng.choice(("a", "b"))
        crashes = rng.random() < 0.08  # this input kills its worker
        body = [msgpack.packb({"token": token, "crash": crashes, "work": rng.choice((0.001, 0.01, 0.2, 1.5))})]
        before = core.ledger.get(key)
        queued_before = core.ledger.queued
        core.client_message(key[0], header, body, True, self.now)
        after = core.ledger.get(key)
        admitted = after is not None and after is not before
        if admitted:
            if not core.phase.accepts:
                raise Violation(f"{key} was accepted while the pool was {core.phase.value}")
            if core.ledger.queued > self.config.max_queue and core.ledger.queued > queued_before:
                raise Violation(f"{key} was queued past --max-queue {self.config.max_queue}")
            self.sent[key] = {"token": token, "final": 0, "stream": header["stream"]}
            self.accepted.add(key)
        else:
            refusals = [m for m in core.to_clients if m[0] == key[0] and _header(m[1]).get("id") == key[1]]
            if not refusals or _header(refusals[-1][1])["op"] != ops.ERROR:
                raise Violation(f"{key} was neither accepted nor refused with an error")
            core.to_clients.remove(refusals[-1])
        self.carry_out()
        self.check()

    def on_reply(self, ident: bytes, frames: list) -> None:
        header = _header(frames)
        op, rid = header.get("op"), header.get("id")
        if op not in (ops.RESULT, ops.ERROR, ops.CHUNK) or rid == 0:
            return  # status and control answers
        key = (ident, rid)
        record = self.sent.get(key)
        if record is None:
            raise Violation(f"an answer for {key}, which was never accepted")
        if op == ops.ERROR:
            if key in self.accepted:
                self.final(key, record)
            return
        got = msgpack.unpackb(frames[1])
        if got["token"] != record["token"]:
            raise Violation(f"{key} got the answer to another request (token {got['token']} != {record['token']})")
        latest = self.dispatches.get(key)
        if latest != (got["by"], got["attempt"]):
            raise Violation(f"{key} got an answer from {got['by']!r} attempt {got['attempt']}, "
                            f"but its latest dispatch was {latest}")
        if op == ops.RESULT:
            self.final(key, record)

    def final(self, key: tuple, record: dict) -> None:
        record["final"] += 1
        if record["final"] > 1:
            raise Violation(f"{key} got {record['final']} final answers")

    # ------------------------------------------------------------ faults

    def fault(self) -> None:
        rng = self.rng
        live = [w for w in self.workers.values() if w.alive]
        r = rng.random()
        if live and r < 0.6:
            self.exit(rng.choice(live), -9)  # SIGKILL from outside, at any moment
        elif live and r < 0.8:
            w = rng.choice(live)
            w.hung = True
        elif self.template_live and r < 0.9:
            self.template_live = False
            self.deliver(ev.TemplateExited(1, {"exit_code": None, "signal": "SIGKILL", "reason": "SIGKILL"}))
        else:
            self.later(rng.random() * 0.1, self.advance)

    def exit(self, w: SimWorker, code: int) -> None:
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
            w = SimWorker(a.slot, a.generation, pid, b"%d.%d" % (a.slot, a.generation), capacity=self.config.prefetch)
            self.workers[a.slot] = w
            core.handle(ev.Spawned(a.slot, pid), self.now)
            self.later(rng.choice((0.001, 0.01, 0.3)), lambda: self.ready(w))
        elif kind is ev.Kill:
            w = self.workers.get(a.slot)
            if w is not None and w.alive and (a.sig == "KILL" or not w.hung):
                self.later(rng.random() * 0.01, lambda: self.exit(w, -15 if a.sig == "TERM" else -9))
        elif kind is ev.Sample:
            for slot in a.slots:
                core.handle(ev.Sampled(slot, rng.randint(1, 100) << 20, 0, 0.0), self.now)
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
        header = _header(frames)
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
            self.deliver(ev.WorkerMessage(w.ident, _header(frames), frames[1:]))
        self.later(hold + self.rng.random() * 0.0005, arrive)

    # ------------------------------------------------------------ the guarantees

    def check(self) -> None:
        core, ledger = self.core, self.core.ledger
        for key, req in ledger.open.items():
            queued = key in ledger.queue
            if queued == (req.worker is not None):
                raise Violation(f"{key} is {'both queued and' if queued else 'neither queued nor'} dispatched")
            if req.worker is not None:
                w = core.workers.get(req.worker)
                if w is None or w.state not in ALIVE or w.pid is None or key not in ledger.held.get(req.worker, ()):
                    raise Violation(f"{key} is dispatched to slot {req.worker}, which does not hold it alive")
        for key in self.accepted:
            if self.sent[key]["final"] == 0 and key not in ledger.open:
                raise Violation(f"{key} left the ledger without a final answer")

    def check_converged(self) -> None:
        core = self.core
        if core.phase is not Phase.SERVING or core.template.state.value == "waiting" or core.was_degraded:
            return  # a load failure stopped it, or the template is backing off, or restarts are throttled
        kept = [w for w in core.workers.values() if w.state in SERVING and w.leaving is None]
        if len(kept) != core.target:
            raise Violation(f"after a calm period {len(kept)} workers serve, the target is {core.target}: "
                            + ", ".join(f"{w.slot}:{w.state.value}:{w.leaving}" for w in core.workers.values()))

    def check_stopped(self) -> None:
        core = self.core
        if core.phase is not Phase.STOPPED:
            raise Violation(f"the pool did not stop: {core.phase.value}")
        if any(w.alive for w in self.workers.values()):
            raise Violation("a worker outlived the pool")
        for key in self.accepted:
            if self.sent[key]["final"] != 1:
                raise Violation(f"{key} had {self.sent[key]['final']} final answers by the end")

    def summary(self) -> dict:
        core = self.core
        return {"seed": self.seed, "accepted": len(self.accepted), "outcomes": dict(core.stats.outcomes),
                "restarts": {k: v for k, v in core.replacements.items() if k in FAILURES}}


def _header(frames: list) -> dict:
    return msgpack.unpackb(frames[0])


def run_seed(seed: int, steps: int = 300) -> World:
    world = World(seed, steps)
    try:
        world.run()
    except Exception as exc:
        raise Violation(f"seed {seed} failed: {exc}\nreplay: python -m isopool.supervisor.sim --seed {seed}"
                        f" --steps {steps}") from exc
    return world


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m isopool.supervisor.sim", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, help="run this one seed and print what it did")
    p.add_argument("--seeds", type=int, default=1000, help="run seeds 0..N-1 (default 1000)")
    p.add_argument("--start", type=int, default=0, help="first seed of --seeds")
    p.add_argument("--steps", type=int, default=300, help="steps of random events per seed")
    args = p.parse_args(argv)
    seeds = [args.seed] if args.seed is not None else range(args.start, args.start + args.seeds)
    failed = 0
    for seed in seeds:
        try:
            world = run_seed(seed, args.steps)
        except Violation as exc:
            failed += 1
            print(exc, file=sys.stderr)
            continue
        if args.seed is not None:
            print(world.summary())
    print(f"{len(seeds) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
