"""What moves the pool's phase (phase.py): control ops, signals, drains and stops.

Signals and the CLI's control ops take the same path: a signal handler only records
(the shell), the core acts here.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from isopool.protocol import BadRequest, ShuttingDown, ops
from isopool.protocol.schemas import MAX_WORKERS

from .actions import Notify
from .phase import PHASES, Phase
from .slots import ALIVE, SERVING, State, retire, stop
from . import templates

if TYPE_CHECKING:
    from .core import Core


def enter(core: "Core", phase: Phase) -> None:
    if phase not in PHASES[core.phase]:
        raise RuntimeError(f"the pool cannot go from {core.phase.value} to {phase.value}")
    core.phase = phase
    core.dirty = True


def control(core: "Core", action: Any, args: dict) -> dict:
    if action == ops.SCALE:
        n = args.get("workers")
        if type(n) is not int or not 1 <= n <= MAX_WORKERS:
            raise BadRequest(f"scale needs a worker count from 1 to {MAX_WORKERS}, got {n!r}", field="workers")
        old, core.target = core.target, n
        core.emit("scaled", None, old=old, new=n)
        return {"workers_target": n, "previous": old}
    if action == ops.RELOAD:
        return {"reloading": reload(core, core.now)}
    if action in (ops.SHUTDOWN, ops.DRAIN):
        begin_drain(core, "stop requested by a client", core.now)
        return {"stopping": True, "drain_timeout_s": core.config.drain_timeout}
    raise BadRequest(f"unknown control action {action!r}; use scale, reload or stop")


def reload(core: "Core", now: float) -> int:
    """Replace every worker, one at a time, with no failed request (new code and weights load)."""
    templates.stop(core, now, delay=0.0)  # a new template imports the new code
    count = 0
    for w in core.workers.values():
        if w.leaving is None and w.state not in (State.DRAINING, State.STOPPING):
            retire(core, w, "reload")
            count += 1
    core.reloading = count > 0
    core.emit("reload_started", None, workers=count)
    return count


def on_signal(core: "Core", name: str, now: float) -> None:
    core.dirty = True
    if name == "SIGHUP":
        core.log(logging.INFO, "%s: reloading workers", name)
        reload(core, now)
    elif core.phase is Phase.DRAINING:
        core.log(logging.INFO, "%s again: stopping now", name)
        begin_stop(core, f"second {name}", now)
    else:
        begin_drain(core, name, now)


def begin_drain(core: "Core", why: str, now: float) -> None:
    if core.phase is not Phase.SERVING:
        if core.phase is Phase.STARTING:
            begin_stop(core, why, now)
        return
    core.log(logging.INFO, "draining (%s): finishing %d request(s), at most %gs", why, len(core.ledger),
             core.config.drain_timeout)
    enter(core, Phase.DRAINING)
    core.drain_deadline = now + core.config.drain_timeout
    core.actions.append(Notify("STOPPING=1"))
    core.emit("draining", None, reason=why, requests=len(core.ledger))


def begin_stop(core: "Core", why: str, now: float) -> None:
    if not core.phase.runs_workers:
        return
    enter(core, Phase.STOPPING)
    for req in list(core.ledger.open.values()):
        core.fail(req, ShuttingDown(f"the pool stopped before this request finished ({why})"))
    templates.stop(core, now, delay=0.0)
    for w in list(core.workers.values()):
        if w.state is State.BACKOFF:
            w.move(State.EXITED, "stopping")
            del core.workers[w.slot]
        elif w.state in (State.STARTING, State.IDLE, State.BUSY, State.DRAINING):
            w.leaving = w.leaving or "shutdown"
            stop(core, w, now)


def serving(core: "Core") -> None:
    """A worker became ready: the pool serves once every worker it starts with is."""
    if core.phase is Phase.STARTING and sum(1 for w in core.workers.values() if w.state in SERVING) >= core.target:
        enter(core, Phase.SERVING)
        core.log(logging.INFO, "serving with %d worker(s)", core.target)
        core.actions.append(Notify("READY=1\nSTATUS=serving"))


def advance(core: "Core", now: float) -> None:
    if core.phase is Phase.DRAINING and (not core.ledger or now >= core.drain_deadline):
        begin_stop(core, "drained" if not core.ledger else "--drain-timeout passed", now)
    if core.phase is Phase.STOPPING and not any(w.state in ALIVE for w in core.workers.values()):
        enter(core, Phase.STOPPED)
        core.log(logging.INFO, "stopped")
