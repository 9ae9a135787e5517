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
from typing import Any, Callable

import msgpack

from isopool.protocol import ops

from . import actions as ev
from .health import KILLED_WITHIN_S
from .blame import FAILURES
from .config import PoolConfig
from .phase import ACCEPTING, Phase
from .core import Core
from .slots import ALIVE, SERVING
from .simprocs import Processes, SimWorker, Violation, header_of as _header
from .templates import TemplateState

INVARIANTS = (
    "every accepted request gets exactly one final answer (none twice; all, once the pool has stopped)",
    "every refused request gets exactly one error, at once",
    "no answer reaches the wrong request, or comes from an attempt the request has left",
    "no request is both queued and dispatched; a dispatched one is held by a live worker",
    "the queue never takes a request past --max-queue",
    "a dead worker's requests are settled at once",
    "a slot restarts after a crash no sooner than its backoff allows",
    "a draining or stopping pool accepts nothing new",
    "a client that leaves has nothing left open, and is sent nothing more",
    "live workers converge to the target once faults stop",
)


class World(Processes):
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
        self.one_pass = False  # inside in_one_pass(): events are handled, their actions wait for the pass
        self.seq = itertools.count()
        rng = random.Random(seed + 1)
        self.core = Core(self.config, ["cpu"], self.marks, rng, now=self.now,
                         tokens=lambda: "%032x" % rng.getrandbits(128))
        self.clients = [b"c%d" % i for i in range(rng.randint(1, 3))]
        self.gone: set[bytes] = set()  # clients that disconnected
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
        if self.rng.random() < 0.5:  # stopped in the middle of things
            self.in_one_pass(ev.SignalReceived("SIGTERM"))
        else:
            self.settle(30.0 + KILLED_WITHIN_S)  # calm: no faults, no new work (a stuck worker given up on)
            self.check_converged()
            self.deliver(ev.SignalReceived("SIGTERM"))
        self.settle(self.config.drain_timeout + 10.0 + KILLED_WITHIN_S)
        if self.core.phase is not Phase.STOPPED:
            self.deliver(ev.SignalReceived("SIGTERM"))
            self.settle(10.0 + KILLED_WITHIN_S)
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
        if self.one_pass:
            return  # the shell carries out a pass's actions after all its events and its tick
        self.carry_out()
        self.check()

    def in_one_pass(self, event: Any) -> None:
        """`event` and whatever the world has due next, read in one pass of the supervisor's
        loop, then its tick, then the actions of all three, as the shell does them
        (loop.Supervisor.step): a core that decides a Spawn and a stop in one pass meets
        the Spawned after the stop (found by a CI run, not by the seeds, while every event
        here was carried out alone)."""
        self.one_pass = True
        try:
            self.core.handle(event, self.now)
            if self.timeline:
                at, _, action = heapq.heappop(self.timeline)
                self.now = max(self.now, at)
                action()
            self.core.handle(ev.Tick(), self.now)
        finally:
            self.one_pass = False
        self.carry_out()
        self.check()

    # ------------------------------------------------------------ clients

    def client_action(self) -> None:
        rng = self.rng
        client = rng.choice(self.clients)
        r = rng.random()
        if r < 0.75:
            self.infer(client)
        elif r < 0.85 and self.sent:
            key = rng.choice(list(self.sent))
            if key[0] not in self.gone:
                self.deliver(ev.ClientMessage(key[0], {"op": ops.CANCEL, "id": key[1]}, []))
        elif r < 0.9:
            self.deliver(ev.ClientMessage(client, {"op": ops.STATUS, "id": 0}, []))
        elif r < 0.96:
            n = rng.randint(1, 4)
            self.deliver(ev.ClientMessage(client, {"op": ops.CONTROL, "id": 0, "action": ops.SCALE,
                                                   "args": {"workers": n}}, []))
        elif r < 0.975:
            self.deliver(ev.ClientMessage(client, {"op": ops.CONTROL, "id": 0, "action": ops.RELOAD}, []))
        elif r < 0.99 and len(self.clients) > 1:  # it disconnects: nobody waits for its answers now
            self.clients.remove(client)
            self.gone.add(client)
            self.deliver(ev.ClientGone(client))
            if any(k[0] == client for k in self.core.ledger.open):
                raise Violation(f"client {client!r} left, but its requests are still open")
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
            if core.phase not in ACCEPTING:
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
        if ident in self.gone:
            raise Violation(f"an answer for {key}, whose client has left")
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
            w.unkillable = rng.random() < 0.1
        elif self.template_live and r < 0.9:
            self.template_live = False
            self.deliver(ev.TemplateExited(1, {"exit_code": None, "signal": "SIGKILL", "reason": "SIGKILL"}))
        else:
            self.later(rng.random() * 0.1, self.advance)

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
            if self.sent[key]["final"] == 0 and key not in ledger.open and key[0] not in self.gone:
                raise Violation(f"{key} left the ledger without a final answer")

    def check_converged(self) -> None:
        core = self.core
        if core.phase is not Phase.SERVING or core.template.state is TemplateState.WAITING or core.was_degraded:
            return  # a load failure stopped it, or the template is backing off, or restarts are throttled
        kept = [w for w in core.workers.values() if w.state in SERVING and w.leaving is None]
        if len(kept) != core.target:
            raise Violation(f"after a calm period {len(kept)} workers serve, the target is {core.target}: "
                            + ", ".join(f"{w.slot}:{w.state.value}:{w.leaving}" for w in core.workers.values()))

    def check_stopped(self) -> None:
        core = self.core
        if core.phase is not Phase.STOPPED:
            raise Violation(f"the pool did not stop: {core.phase.value}")
        if any(w.alive and not w.given_up for w in self.workers.values()):
            raise Violation("a worker outlived the pool")  # (one stuck in the kernel the shell ends as a stray)
        for key in self.accepted:
            if self.sent[key]["final"] != (0 if key[0] in self.gone and self.sent[key]["final"] == 0 else 1):
                raise Violation(f"{key} had {self.sent[key]['final']} final answers by the end")

    def summary(self) -> dict:
        core = self.core
        return {"seed": self.seed, "accepted": len(self.accepted), "outcomes": dict(core.stats.outcomes),
                "restarts": {k: v for k, v in core.replacements.items() if k in FAILURES}}


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
