"""Crash blame and retry: when a worker dies, whose request killed it, and what happens next.

A worker holds several requests (prefetch, batches), but runs one (or one batch) at a
time. Its board (protocol/board.py) says which: the sequence number it started last and
the one it finished last. The request it was running takes the blame: it is retried on
another worker (up to --max-attempts, and only where retry is allowed and nothing was
streamed), or failed with WorkerCrashed, or with PoisonRequest once its input has killed
--poison-threshold workers. Every other request it held was not begun, or finished with
its answer unsent: they go back to the head of the queue, untouched by the crash.

Then the slot: a worker we stopped for good is given up; one that crashed, or that we
killed for a restart reason, starts again in its slot, after a backoff that grows with
consecutive crashes (policy.RestartPolicy).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from isopool.protocol import PoisonRequest, WorkerCrashed
from isopool.protocol.exits import EXIT_LOAD_FAILED

from .slots import RECYCLE_REASONS, RESTART_IN_PLACE, State, Worker
from .phase import Phase

if TYPE_CHECKING:
    from .core import Core
    from .ledger import Request

FAILURES = frozenset({"crash"}) | RESTART_IN_PLACE  # replacements that count as restarts
BACKS_OFF = frozenset({"crash", "start_timeout", "load_max_rss"})  # in a row, each waits longer to retry
NOT_LOADED = {  # killed before the model was ready: at start-up that fails `serve`, saying why
    "start_timeout": "was not ready within --start-timeout {cfg.start_timeout:g}s (the model's constructor is still "
                     "running, or hangs); raise --start-timeout if it needs longer",
    "load_max_rss": "passed --max-rss while its model loaded; raise --max-rss (or 0: no limit) if the model needs it",
}


def progress(core: "Core", w: Worker) -> tuple[tuple | None, int]:
    """(key of the request `w` is running, or was when it died, or None between requests;
    the sequence number of the last it finished), from its board. Without a board: the
    oldest request it holds, and nothing known to be finished."""
    held = core.ledger.holding(w.slot)
    seen = core.boards(w.slot) if w.pid is not None else None
    if seen is None:
        return (held[0] if held else None), 0
    started, finished = seen
    if started > finished:
        for key in held:
            req = core.ledger.get(key)
            if req is not None and req.worker == w.slot and req.seq == started:
                return key, finished
    return None, finished


def wants_last_words(core: "Core", slot: int) -> bool:
    """Should the shell read what this dead worker sent before delivering its exit? Its last
    result can still be on its way when the pidfd fires; without it, the request it had
    finished would be blamed for the one it was running."""
    w = core.workers.get(slot)
    return w is not None and w.state is not State.STOPPING and bool(core.ledger.load(slot))


def exited(core: "Core", w: Worker, info: dict, now: float) -> None:
    # a worker we killed for breaking the protocol is blamed like a crash: the request it
    # ran may be what drove it there, and must not come back to it for ever
    expected = w.state is State.STOPPING and w.leaving != "protocol"
    info = {"pid": w.pid, "worker": w.id, **info}
    if w.leaving == "protocol":
        info["reason"] = "killed by the supervisor: it sent a message that broke the protocol (see the log)"
    elif w.signalled is not None and info.get("signal") in ("SIGTERM", "SIGKILL"):
        info["reason"] = killed_by_us(core, w, info["signal"])
    elif info.get("signal") == "SIGSYS" and core.config.sandbox:
        info["reason"] = ("killed by its sandbox (SIGSYS): it made a forbidden system call: ptrace, another "
                          "process's memory, or a signal to the supervisor. Its model may be compromised")
    w.last_exit = info
    culprit = None if expected else progress(core, w)[0]
    held = core.ledger.forget_worker(w.slot)
    if not expected and culprit is None:  # it died holding these, and its board blames none of them:
        # between requests, or a board its model wrote over. A request in that many such deaths
        # is blamed from then on, so a model that forges its board cannot requeue for ever
        # (a crash loop to the deadline); an innocent one rarely sees even one
        for req in held:
            req.unblamed += 1
            if culprit is None and req.unblamed > core.config.max_attempts + core.config.poison_threshold:
                culprit = req.key  # the oldest past the bound
    for req in held:
        if req.key == culprit:
            on_crash(core, req, info)
    # the others it was not running (finished but unsent, or not begun), or we stopped it: back
    # to the head of the queue in their order (each requeue goes in front of the last)
    for req in reversed(held):
        if req.key != culprit:
            core.ledger.requeue(req)
    was_ready = w.state is not State.STARTING
    reason = w.leaving if expected or w.leaving == "protocol" else "crash"
    w.move(State.EXITED, info["reason"])
    fields = {k: info[k] for k in ("exit_code", "signal", "reason")}
    if expected:
        kind = "recycled" if reason in RECYCLE_REASONS else "exited"
        core.emit(kind, w, stopped_for=reason, **fields)
    else:
        core.emit("crashed", w, during="start" if not was_ready else "serve", **fields)
        core.log(logging.WARNING, "worker %d (pid %s) died: %s", w.id, info["pid"], info["reason"])
    after_exit(core, w, reason, now)


# why the supervisor kills a worker, and the setting behind it
KILLED_FOR = {
    "timeout": "a request ran past its deadline (the client's timeout, capped by --request-timeout)",
    "heartbeat": "it sent no heartbeat within --heartbeat-timeout",
    "start_timeout": "it was not ready within --start-timeout",
    "load_max_rss": "it passed --max-rss while loading",
    "stop": "it was being stopped",
    "shutdown": "the pool was stopping",
}


def killed_by_us(core: "Core", w: Worker, signal_name: str) -> str:
    why = KILLED_FOR.get(w.leaving or "", f"it was being stopped ({w.leaving})")
    if signal_name == "SIGKILL" and w.signalled == "KILL":
        return (f"SIGKILL, sent by the supervisor: {why}, and it had not exited "
                f"{core.config.kill_grace:g}s after SIGTERM (--kill-grace)")
    return f"{signal_name}, sent by the supervisor: {why}"


def after_exit(core: "Core", w: Worker, reason: str, now: float) -> None:
    if reason in FAILURES or reason in RECYCLE_REASONS:
        core.replacements[reason] += 1
    if (w.leaving is not None and reason not in RESTART_IN_PLACE) or not core.phase.runs_workers:
        del core.workers[w.slot]
        return
    if reason in NOT_LOADED and core.phase is Phase.STARTING and not core.startup_error:
        # a model that cannot load at start-up will not next time either: say so, and stop
        del core.workers[w.slot]
        core.fail_startup(f"worker {w.id} " + NOT_LOADED[reason].format(cfg=core.config), EXIT_LOAD_FAILED)
        return
    if reason in BACKS_OFF:
        w.crashes_in_row += 1
        if core.phase is Phase.STARTING and w.crashes_in_row >= 2 and not core.startup_error:
            del core.workers[w.slot]
            core.fail_startup(f"worker {w.id} died twice before it was ready: {w.last_exit['reason']}",
                              EXIT_LOAD_FAILED)
            return
    delay = core.restarts.delay(w.crashes_in_row) if reason in BACKS_OFF else 0.0
    troubled = not w.for_client  # a client's own short deadline says nothing of the pool's health
    w.reset_process()
    w.move(State.BACKOFF, f"restart in {delay:.2f}s")
    w.spawn_at = now + delay
    w.restarts += 1
    if troubled:
        core.restarts.record(now)
    if delay:
        core.emit("backoff", w, delay_s=round(delay, 3))


def on_crash(core: "Core", req: "Request", info: dict) -> None:
    cfg = core.config
    req.crashes.append({k: info[k] for k in ("worker", "pid", "exit_code", "signal", "reason")})
    # a shared-memory request's body names its segment, not its data (the same for every array of
    # that dtype and shape): it is not remembered as poison, only its own deaths count
    kills = core.poison.add_kill(req.body) if req.shm is None else len(req.crashes)
    if kills >= cfg.poison_threshold:
        core.fail(req, PoisonRequest(
            f"this input has killed {kills} workers (--poison-threshold {cfg.poison_threshold}); "
            "it is refused from now on. Last death: " + info["reason"], attempts=req.crashes))
    elif req.retry and not req.chunks_sent and len(req.crashes) < cfg.max_attempts:
        core.ledger.requeue(req)
    else:
        why = ("streamed parts cannot be retried" if req.chunks_sent else "retry=False" if not req.retry
               else f"--max-attempts {cfg.max_attempts} reached")
        after = f" after {req.chunks_sent} streamed part(s)" if req.stream else ""
        core.fail(req, WorkerCrashed(
            f"worker {info['worker']} (pid {info['pid']}) died running this request{after}: {info['reason']} "
            f"[attempt {len(req.crashes)}; not retried: {why}]", attempts=req.crashes,
            exit_code=info["exit_code"], signal=info["signal"], parts_delivered=req.chunks_sent))
