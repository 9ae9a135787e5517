"""The supervisor core's rules, without sockets or processes: events in, actions out.
Each test drives the real core (supervisor/core.py) by hand and reads what it decided."""

from __future__ import annotations

import ast
from pathlib import Path

import msgpack
import pytest

from isopool.protocol import ops
from isopool.protocol.contract import worker_ident
from isopool.supervisor import actions as ev
from isopool.supervisor.config import PoolConfig
from isopool.supervisor.phase import Phase
from isopool.supervisor.core import Core
from isopool.supervisor.health import KILLED_WITHIN_S
from isopool.supervisor.slots import IllegalTransition, State

CORE_MODULES = ("core", "actions", "admission", "answers", "blame", "control", "dispatch", "health", "ledger",
                "slots", "templates", "status", "policy", "stats", "phase")
FORBIDDEN = {"zmq", "time", "os", "subprocess", "socket", "signal", "select", "psutil", "threading", "asyncio",
             "multiprocessing", "prometheus_client"}


class Pool:
    """A core with workers that come up at once; boards are set by hand."""

    def __init__(self, **settings):
        self.boards: dict[int, tuple[int, int]] = {}
        cfg = PoolConfig(**{"workers": 2, "preload": "none", "spin_us": 0, **settings})
        self.now = 100.0
        self.core = Core(cfg, ["cpu"], self.boards.get, now=self.now)
        self.replies: list[tuple[bytes, dict, list]] = []
        self.runs: dict[int, list[dict]] = {}  # slot -> RUN headers sent to it
        self.spawns: list[ev.Spawn] = []
        self.kills: list[ev.Kill] = []
        self.given_up: list[int] = []  # slots
        self.tick()

    def handle(self, event) -> None:
        self.core.handle(event, self.now)
        self.collect()

    def tick(self, dt: float = 0.0) -> None:
        self.now += dt
        self.handle(ev.Tick())

    def collect(self) -> None:
        while True:
            to_clients, to_workers, actions = self.core.take()
            if not (to_clients or to_workers or actions):
                return
            for ident, frames, _ in to_clients:
                self.replies.append((ident, msgpack.unpackb(frames[0]), frames[1:]))
            for ident, frames in to_workers:
                header = msgpack.unpackb(frames[0])
                if header["op"] == ops.RUN:
                    self.runs.setdefault(int(ident.split(b".")[0]), []).append(header)
            for a in actions:
                if isinstance(a, ev.Spawn):
                    self.spawns.append(a)
                    self.core.handle(ev.Spawned(a.slot, 1000 + len(self.spawns)), self.now)
                    self.core.handle(ev.WorkerMessage(worker_ident(a.slot, a.generation, a.token),
                                                      {"op": ops.READY, "capacity": 4}, []), self.now)
                elif isinstance(a, ev.Kill):
                    self.kills.append(a)
                elif isinstance(a, ev.GiveUp):
                    self.given_up.append(a.slot)

    def infer(self, rid, client=b"c", **header) -> None:
        self.handle(ev.ClientMessage(client, {"op": ops.INFER, "id": rid, **header}, [msgpack.packb(rid)]))

    def answer(self, slot: int, rid, attempt: int = 1, client=b"c", op=ops.RESULT) -> None:
        w = self.core.workers[slot]
        self.handle(ev.WorkerMessage(w.ident, {"op": op, "id": [client, rid], "attempt": attempt},
                                     [msgpack.packb("ok")]))

    def die(self, slot: int) -> None:
        self.handle(ev.WorkerExited(slot, {"exit_code": None, "signal": "SIGKILL", "reason": "SIGKILL"}))

    def final(self, rid) -> list[dict]:
        return [h for _, h, _ in self.replies if h.get("id") == rid and h["op"] in (ops.RESULT, ops.ERROR)]

    def error_type(self, rid) -> str:
        [(_, h, body)] = [r for r in self.replies if r[1].get("id") == rid]
        return msgpack.unpackb(body[0])["type"]


# ------------------------------------------------------------ purity


@pytest.mark.parametrize("module", CORE_MODULES)
def test_the_core_imports_no_io(module):
    """The core and its rooms import no socket, process or clock API (the shell does)."""
    tree = ast.parse((Path(__file__).parents[2] / "supervisor" / f"{module}.py").read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not names & FORBIDDEN


# ------------------------------------------------------------ phases


def test_the_pool_serves_once_every_worker_is_ready_and_stops_after_a_drain():
    pool = Pool()
    assert pool.core.phase is Phase.SERVING and len(pool.spawns) == 2
    pool.infer(1)
    pool.tick()
    pool.handle(ev.SignalReceived("SIGTERM"))
    assert pool.core.phase is Phase.DRAINING
    pool.infer(2)
    assert pool.error_type(2) == "ShuttingDown"
    pool.answer(next(iter(pool.runs)), 1)
    pool.tick()
    assert pool.core.phase is Phase.STOPPING and pool.final(1)[0]["op"] == ops.RESULT
    for slot in list(pool.core.workers):
        pool.die(slot)
    pool.tick()
    assert pool.core.phase is Phase.STOPPED


def test_a_second_signal_stops_at_once_and_answers_what_is_open():
    pool = Pool()
    pool.infer(1)
    pool.tick()
    pool.handle(ev.SignalReceived("SIGTERM"))
    pool.handle(ev.SignalReceived("SIGINT"))
    assert pool.core.phase is Phase.STOPPING
    assert pool.error_type(1) == "ShuttingDown"


def test_an_illegal_worker_move_is_refused():
    pool = Pool()
    w = pool.core.workers[0]
    with pytest.raises(IllegalTransition):
        w.move(State.BACKOFF)


# ------------------------------------------------------------ admission


def test_a_full_queue_refuses_at_once_and_keeps_nothing():
    pool = Pool(max_queue=2, prefetch=1)
    for slot in list(pool.core.workers):  # no worker free: everything queues
        pool.core.workers[slot].capacity = 0
    for rid in range(1, 4):
        pool.infer(rid)
    assert pool.core.ledger.queued == 2
    assert pool.error_type(3) == "Overloaded" and 3 not in {k[1] for k in pool.core.ledger.open}


@pytest.mark.parametrize("header, expected", [
    ({"timeout": 0}, "BadRequest"), ({"timeout": "soon"}, "BadRequest"), ({"tenant": 5}, "BadRequest"),
])
def test_bad_fields_are_refused_with_a_typed_error(header, expected):
    pool = Pool(isolation="tenant")
    pool.infer(1, **header)
    assert pool.error_type(1) == expected and not pool.core.ledger.open


def test_an_id_in_flight_is_refused_and_the_first_request_kept():
    pool = Pool()
    pool.infer(1)
    pool.infer(1)
    assert pool.error_type(1) == "BadRequest" and len(pool.core.ledger) == 1


def test_control_needs_admin():
    pool = Pool()
    pool.handle(ev.ClientMessage(b"c", {"op": ops.CONTROL, "id": 9, "action": "scale", "args": {"workers": 5}},
                                 [], admin=False))
    assert pool.error_type(9) == "NotAllowed" and pool.core.target == 2


# ------------------------------------------------------------ dispatch


def test_dispatch_spreads_by_free_credit():
    pool = Pool()
    for rid in range(1, 5):
        pool.infer(rid)
    pool.tick()
    assert sorted(len(v) for v in pool.runs.values()) == [2, 2]


def test_answers_read_together_keep_the_time_their_batch_ran():
    """A batching worker answers its batch at once; the pacing (protocol/pacing.py) must see
    the batch's run time, not 0 for all but the first answer, or slow batched work looks
    quick and the I/O thread is given the policy for quick work."""
    pool = Pool(workers=1)
    for rid in range(1, 5):
        pool.infer(rid)
    pool.tick()
    [slot] = pool.runs
    assert len(pool.runs[slot]) == 4  # all on the one worker (capacity 4)
    pool.now += 0.030  # the batch of 4 runs for 30 ms
    for run in pool.runs[slot]:
        pool.answer(slot, run["id"][1], attempt=run["attempt"])  # read in one pass: the same `now`
    assert [h["op"] for rid in range(1, 5) for h in pool.final(rid)] == [ops.RESULT] * 4
    assert pool.core.work_s == pytest.approx(0.030)
    pool.infer(5)
    pool.tick()
    pool.now += 0.001
    run = pool.runs[slot][-1]
    pool.answer(slot, 5, attempt=run["attempt"])  # the next answer alone: its own time
    assert pool.final(5)[0]["op"] == ops.RESULT and pool.core.work_s == pytest.approx(0.001)


def test_a_start_that_failed_says_why_its_generation_was_skipped():
    pool = Pool(workers=1)
    [w] = pool.core.workers.values()
    pool.die(w.slot)
    pool.tick()  # restarted at once (the first restart has no backoff)
    assert w.state is State.IDLE and w.generation == 2
    # it dies again, and the template cannot fork its replacement (taken by hand, not spawned)
    pool.core.handle(ev.WorkerExited(w.slot, {"exit_code": None, "signal": "SIGKILL", "reason": "SIGKILL"}), pool.now)
    pool.core.handle(ev.Tick(), pool.now + 60.0)
    _, _, actions = pool.core.take()
    assert [a.generation for a in actions if isinstance(a, ev.Spawn)] == [3]
    pool.now += 60.0
    pool.handle(ev.SpawnFailed(w.slot, "the template did not answer within 5 s", template=False))
    assert w.state is State.BACKOFF and w.pid is None
    assert w.last_error == "generation 3 could not be started: the template did not answer within 5 s"
    pool.tick(60.0)
    assert w.generation == 4 and w.state is State.IDLE  # the next start: the generation after the skipped one


def test_an_answer_from_a_dead_process_is_dropped():
    pool = Pool(workers=1)
    pool.infer(1)
    pool.tick()
    old = pool.core.workers[0].ident
    pool.boards[0] = (0, 0)  # it had not begun the request: requeued, not blamed
    pool.die(0)
    pool.tick()  # restarted
    pool.tick()  # dispatched again
    assert pool.core.ledger.get((b"c", 1)).attempt == 2
    pool.handle(ev.WorkerMessage(old, {"op": ops.RESULT, "id": [b"c", 1], "attempt": 1}, [msgpack.packb("old")]))
    assert pool.final(1) == []
    pool.answer(0, 1, attempt=2)
    assert len(pool.final(1)) == 1 and not pool.core.ledger.open


# ------------------------------------------------------------ crash blame and backoff


def test_the_request_the_board_says_was_running_takes_the_blame():
    pool = Pool(workers=1, max_attempts=1)
    for rid in (1, 2, 3):
        pool.infer(rid)
    pool.tick()
    seqs = {h["id"][1]: h["seq"] for h in pool.runs[0]}
    pool.boards[0] = (seqs[2], seqs[1])  # finished 1 (answer unsent), running 2, 3 not begun
    pool.die(0)
    assert pool.error_type(2) == "WorkerCrashed"
    assert [r.key[1] for r in pool.core.ledger.queue.values()] == [1, 3]  # requeued, in order, at the head


def test_consecutive_crashes_back_off_and_the_first_restart_is_immediate():
    pool = Pool(workers=1, backoff_base=0.1, backoff_max=10)
    delays = []
    for _ in range(4):
        pool.boards.pop(0, None)
        pool.die(0)
        w = pool.core.workers[0]
        delays.append(w.spawn_at - pool.now)
        pool.tick(w.spawn_at - pool.now)
    assert delays[0] == 0.0
    assert 0.05 <= delays[1] <= 0.15 and 0.1 <= delays[2] <= 0.3 and 0.2 <= delays[3] <= 0.6


def test_a_good_answer_resets_the_backoff():
    pool = Pool(workers=1)
    pool.die(0)
    pool.tick()
    pool.die(0)
    assert pool.core.workers[0].crashes_in_row == 2
    pool.tick(pool.core.workers[0].spawn_at - pool.now)
    pool.infer(1)
    pool.tick()
    pool.answer(0, 1)
    assert pool.core.workers[0].crashes_in_row == 0


def test_restarts_are_counted_once_by_reason():
    pool = Pool(workers=1)
    pool.die(0)
    pool.tick()
    assert pool.core.replacements == {"crash": 1} and pool.core.restarts_total == 1


def test_a_stuck_worker_holding_only_unbegun_requests_is_replaced():
    """Found by the simulator: such a worker sent nothing and was never replaced."""
    pool = Pool(workers=1, heartbeat_timeout=2.0, request_timeout=60.0)
    pool.infer(1)
    pool.tick()
    pool.boards[0] = (0, 0)  # it began nothing
    pool.tick(3.0)
    assert [k.sig for k in pool.kills] == ["TERM"] and pool.core.workers[0].leaving == "heartbeat"


def test_a_worker_alive_after_sigkill_is_given_up_its_request_served_elsewhere_and_the_pool_stops():
    """A process stuck in the kernel (a driver, a file system) outlives SIGKILL. The core
    waited for its exit for ever, and with it the slot, the requests it held and a stopping
    pool (the simulator found it once its workers could ignore KILL: 104 of 2,000 seeds)."""
    pool = Pool(workers=1, heartbeat_timeout=2.0, request_timeout=60.0)
    [w] = pool.core.workers.values()
    stuck = w.pid
    pool.infer(1)
    pool.tick()
    pool.boards[0] = (0, 0)  # it began nothing, and says nothing: replaced for its silence
    pool.tick(3.0)
    grace = pool.core.config.kill_grace
    pool.tick(grace)
    assert [k.sig for k in pool.kills] == ["TERM", "KILL"] and not pool.given_up
    pool.tick(KILLED_WITHIN_S - 1)  # a slow teardown (a GPU context) is waited for
    assert not pool.given_up
    pool.tick(1.0)  # still no exit: given up, and its slot starts again after a backoff, as after a crash
    assert pool.given_up == [0] and w.state is State.BACKOFF
    pool.tick(pool.core.config.backoff_max)
    assert w.pid not in (None, stuck)
    pool.tick()
    assert [r["id"] for r in pool.runs[0]] == [[b"c", 1]] * 2  # request 1 is back, on the new process
    pool.answer(0, 1, attempt=pool.runs[0][-1]["attempt"])
    assert [h["op"] for h in pool.final(1)] == [ops.RESULT]
    pool.handle(ev.SignalReceived("SIGTERM"))
    for _ in range(3):  # the new one ignores its STOP and KILL as well
        pool.tick(KILLED_WITHIN_S)
    assert pool.core.phase is Phase.STOPPED and pool.given_up == [0, 0]


def test_a_template_that_broke_its_protocol_in_a_spawn_fails_the_start_with_why():
    """Its error went with the template (stopped at once, restarted at once, for ever)."""
    pool = Pool(workers=1, preload="model")
    pool.core.handle(ev.TemplateReady("model"), pool.now)
    pool.core.handle(ev.SpawnFailed(0, "the template of this model broke its protocol (a malformed line: ...)",
                                    template=True, broken=True), pool.now)
    assert "broke its protocol" in (pool.core.startup_error or "")


def test_a_reused_id_never_gets_the_answer_of_the_cancelled_request_before_it():
    """Found by the simulator (seed 3700): the cancelled request, still running on the same
    worker when its id was reused, answered the new one (both were 'attempt 1')."""
    pool = Pool(workers=1)
    pool.infer(1)
    pool.tick()
    old_attempt = pool.runs[0][-1]["attempt"]
    pool.handle(ev.ClientMessage(b"c", {"op": ops.CANCEL, "id": 1}, []))
    pool.infer(1)  # the id is free again: the client reuses it
    pool.tick()
    new_attempt = pool.runs[0][-1]["attempt"]
    assert new_attempt != old_attempt
    pool.answer(0, 1, attempt=old_attempt)  # the cancelled run finishes
    assert [h["op"] for h in pool.final(1)] == [ops.ERROR]  # only the cancellation so far
    pool.answer(0, 1, attempt=new_attempt)
    assert [h["op"] for h in pool.final(1)] == [ops.ERROR, ops.RESULT]


def test_the_supervisor_never_imports_the_worker_or_the_client():
    """Their contract is protocol/'s (contract.py): the daemon and the workers share no code."""
    for path in (Path(__file__).parents[2] / "supervisor").glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not {m for m in names if m.startswith(("isopool.worker", "isopool.client"))}, path.name


def test_scale_past_the_worker_cap_is_refused():
    """scale(10**9) once ran the supervisor out of memory."""
    pool = Pool()
    pool.handle(ev.ClientMessage(b"c", {"op": ops.CONTROL, "id": 9, "action": "scale",
                                        "args": {"workers": 10**9}}, []))
    assert pool.error_type(9) == "BadRequest" and pool.core.target == 2 and len(pool.core.workers) == 2


def test_hello_answers_with_the_limits():
    pool = Pool(max_message_bytes=1 << 20)
    pool.handle(ev.ClientMessage(b"c", {"op": ops.HELLO, "id": 5}, []))
    [(_, header, body)] = [r for r in pool.replies if r[1].get("id") == 5]
    assert header["op"] == ops.RESULT and msgpack.unpackb(body[0])["limits"]["max_message_bytes"] == 1 << 20


@pytest.mark.parametrize("outcome", ["spawned then exited", "spawn failed"])
def test_a_replacement_stopped_before_its_process_exists_still_lets_the_pool_stop(outcome):
    """Found in a CI run: a worker timed out, its replacement's Spawn was decided, and SIGTERM
    stopped the pool in the same pass, before the shell carried the Spawn out. The slot went
    STOPPING with no pid; the Spawned that followed was ignored (not STARTING), so its exit
    was too (no pid), and the supervisor waited for it for ever."""
    pool = Pool(workers=1)
    [w] = pool.core.workers.values()
    pool.core.handle(ev.WorkerExited(w.slot, {"exit_code": None, "signal": "SIGKILL", "reason": "SIGKILL"}), pool.now)
    pool.core.handle(ev.Tick(), pool.now)
    _, _, actions = pool.core.take()
    [spawn] = [a for a in actions if isinstance(a, ev.Spawn)]  # decided, not yet carried out
    pool.core.handle(ev.SignalReceived("SIGTERM"), pool.now)
    pool.core.handle(ev.Tick(), pool.now)  # nothing to drain: its workers are stopped
    pool.core.take()
    assert w.state is State.STOPPING and w.pid is None
    if outcome == "spawned then exited":
        kills = len(pool.kills)
        pool.handle(ev.Spawned(spawn.slot, 4242))  # the shell forks it after all
        assert w.pid == 4242 and [(k.slot, k.sig) for k in pool.kills[kills:]] == [(w.slot, "TERM")]
        pool.die(w.slot)  # the TERM (or, after --kill-grace, the KILL) it is sent
    else:
        pool.handle(ev.SpawnFailed(spawn.slot, "the template is not running", template=True))
    for _ in range(3):
        pool.tick(pool.core.config.kill_grace)
    assert pool.core.phase is Phase.STOPPED and not pool.core.workers


def test_an_id_cancelled_and_sent_again_at_once_times_out_once():
    """Found by seed 7391 of 20,000: a request cancelled and sent again with the same id in
    the same instant, with the same timeout, has the same deadline as the first; the first's
    stale heap entry was taken for the second's, which was then answered twice."""
    pool = Pool(workers=1)
    pool.infer(1, timeout=2.0)
    pool.handle(ev.ClientMessage(b"c", {"op": ops.CANCEL, "id": 1}, []))
    pool.infer(1, timeout=2.0)  # the same id, free again, the same deadline
    pool.tick(2.5)  # its worker never answers
    assert [msgpack.unpackb(body[0])["type"] for _, h, body in pool.replies
            if h.get("id") == 1 and h["op"] == ops.ERROR] == ["Cancelled", "RequestTimeout"]


def test_an_id_cancelled_and_sent_again_to_the_same_worker_is_answered_once_when_it_dies():
    """Found by seed 39139 of 20,000-40,000: a request cancelled while its worker runs it
    stays held there (the worker is busy with it); sent again with the same id, it went to
    the same worker, which then held the key twice, and its death answered the open
    request once for each."""
    pool = Pool(workers=1)
    pool.infer(1)
    pool.tick()
    pool.handle(ev.ClientMessage(b"c", {"op": ops.CANCEL, "id": 1}, []))
    pool.infer(1, retry=False)  # the same id, free again, to the only worker, which still holds the first
    pool.tick()
    first, second = pool.runs[0]
    pool.boards[0] = (second["seq"], first["seq"])  # finished the first (answer unsent), running the second
    pool.die(0)
    assert [msgpack.unpackb(body[0])["type"] for _, h, body in pool.replies
            if h.get("id") == 1 and h["op"] == ops.ERROR] == ["Cancelled", "WorkerCrashed"]
