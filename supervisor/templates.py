"""The template's lifecycle, as the core sees it (the process itself is the shell's).

    UNUSED (--preload none: every worker is a fresh interpreter)

    WAITING ──due──► STARTING ──ready──► READY
       ▲                │                  │
       └── (backoff) ───┴── died, failed, ─┘
                            fork failed, reload

Workers start by fork only from a READY template; while it is anything else they wait in
BACKOFF, and its readiness wakes them.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from isopool.protocol.exits import EXIT_LOAD_FAILED

from .actions import StartTemplate, StopTemplate
from .phase import Phase

if TYPE_CHECKING:
    from .core import Core


class TemplateState(enum.Enum):
    UNUSED = "unused"
    WAITING = "waiting"
    STARTING = "starting"
    READY = "ready"


@dataclass
class TemplateRecord:
    state: TemplateState
    due: float = 0.0  # WAITING: when to start it
    started_at: float = 0.0
    restarts: int = 0
    preload: str = ""  # READY: what it preloaded ("model" or "imports"), status's template_preload

    def can_fork(self) -> bool:
        return self.state in (TemplateState.READY, TemplateState.UNUSED)

    @property
    def live(self) -> bool:
        return self.state in (TemplateState.STARTING, TemplateState.READY)


def check(core: "Core", now: float) -> None:
    """Start the template when it is due (and the pool still runs workers)."""
    t = core.template
    if t.state is TemplateState.WAITING and now >= t.due and core.phase.runs_workers:
        t.state = TemplateState.STARTING
        t.started_at = now
        core.actions.append(StartTemplate())


def ready(core: "Core", now: float, preload: str = "imports") -> None:
    t = core.template
    if t.state is not TemplateState.STARTING:
        return
    t.state = TemplateState.READY
    t.preload = preload
    core.log(logging.INFO, "template ready in %.2fs: workers now start by fork%s", now - t.started_at,
             ", with the model built once and shared" if preload == "model" else "")
    core.dirty = True


def stop(core: "Core", now: float, delay: float) -> None:
    """Give up the template process (if any); start a new one after `delay`."""
    t = core.template
    if t.state is TemplateState.UNUSED:
        return
    if t.live:
        core.actions.append(StopTemplate())
    t.state = TemplateState.WAITING
    t.due = now + delay
    core.dirty = True


def failed(core: "Core", error: str, tb: str, now: float) -> None:
    """The template could not import or build the model."""
    core.log(logging.ERROR, "%s\n%s", error, tb)
    if core.phase is Phase.STARTING:
        core.fail_startup(f"{error}\n\n{tb}".rstrip(), EXIT_LOAD_FAILED)
    else:  # e.g. a reload picked up broken code: keep serving with the workers we have
        core.restarts.record(now)
    stop(core, now, delay=core.config.backoff_max)


def exited(core: "Core", pid: int, info: dict, now: float) -> None:
    t = core.template
    if not t.live:
        return  # we stopped it ourselves
    t.state = TemplateState.WAITING  # the process is gone: nothing to stop
    t.due = now + core.config.backoff_base
    t.restarts += 1
    if core.phase.runs_workers:
        core.log(logging.WARNING, "the template (pid %d) died: %s; restarting it", pid, info["reason"])
        core.emit("template_restarted", None, pid=pid, **{k: info[k] for k in ("exit_code", "signal", "reason")})
    core.dirty = True
