"""Timers: request deadlines, and the checks that keep workers honest.

    deadlines      a request past its deadline is failed with RequestTimeout; if its worker
                   is running it, the worker is killed (it cannot be interrupted otherwise)
    start_timeout  a worker not ready in time is killed
    heartbeats     an idle worker silent for --heartbeat-timeout is killed
    kill grace     a worker told to stop (or TERMed) and still alive is KILLed
    samples        every --stats-interval: memory and CPU of serving workers (--max-rss),
                   the restart-intensity limit (degraded / recovered), stray children
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from isopool.protocol import RequestTimeout

from .actions import GiveUp, Kill, ReapStrays, Sample
from .blame import exited, progress
from .slots import SERVING, State, kill, retire
from .templates import TemplateState

if TYPE_CHECKING:
    from .core import Core


def expire(core: "Core", now: float) -> None:
    for req in core.ledger.due(now):
        w = core.workers.get(req.worker) if req.worker is not None else None
        running, finished = progress(core, w) if w is not None else (None, 0)
        hint = raise_hint(req.timeout_setting)
        if running != req.key and req.seq and req.seq <= finished:
            core.fail(req, RequestTimeout(
                f"the handler finished, but after {req.timeout:g}s its answer had not left worker "
                f"{w.id}, which holds finished answers to send them with those of the requests it "
                f"runs next and was still running one; lower --prefetch so quick requests do not wait "
                f"behind slow ones, or {hint}", setting=req.timeout_setting, started=True))
        elif running != req.key:  # queued, or held behind another
            core.fail(req, RequestTimeout(
                f"no worker was free within {req.timeout:g}s, so the request was never started; "
                f"{hint} or add workers", setting=req.timeout_setting, started=False))
            # a worker holding it refuses it unstarted and gives back the credit
        else:
            core.fail(req, RequestTimeout(
                f"the handler was still running after {req.timeout:g}s; its worker {w.id} (pid {w.pid}) was "
                f"killed and replaced. {hint} if it needs longer", setting=req.timeout_setting, started=True))
            # a deadline the client chose, shorter than --request-timeout: a replacement all the
            # same, but no sign of a pool in trouble (restart intensity, `degraded`, health)
            w.for_client = w.leaving is None and req.timeout_setting == "timeout"
            kill(core, w, "timeout", now)
    for slot, seq in core.ledger.orphans_due(now):
        w = core.workers.get(slot)
        marks = core.boards(slot) if w is not None and w.pid is not None else None
        if w is not None and w.state is not State.STOPPING and marks is not None and marks[0] == seq > marks[1]:
            core.log(logging.WARNING, "worker %d (pid %s) still runs a request that was answered (cancelled, or "
                     "timed out) and is past its deadline; replacing it", w.id, w.pid)
            kill(core, w, "timeout", now)


def raise_hint(setting: str) -> str:
    return "raise the client's timeout=" if setting == "timeout" else "raise --request-timeout"


def check_workers(core: "Core", now: float) -> None:
    cfg = core.config
    sample = now >= core.next_stats
    if sample:
        core.next_stats = now + cfg.stats_interval
    to_sample = []
    for w in list(core.workers.values()):
        if w.state is State.STOPPING and w.kill_at is not None and now >= w.kill_at:
            if w.signalled == "KILL" and w.pid is not None:
                give_up(core, w, now)
                continue
            core.log(logging.WARNING, "worker %d (pid %s) did not exit within %gs; sending SIGKILL", w.id, w.pid,
                     cfg.kill_grace)
            core.actions.append(Kill(w.slot, "KILL"))
            w.signalled = "KILL"
            w.kill_at = now + max(cfg.kill_grace, KILLED_WITHIN_S)  # SIGKILL too is bounded: give_up()
        elif w.state is State.STARTING and now - w.started_at > cfg.start_timeout:
            kill(core, w, "start_timeout", now)
        elif now - w.last_seen > cfg.heartbeat_timeout and silent(core, w):
            core.log(logging.WARNING, "worker %d (pid %s) sent no heartbeat for %.1fs; replacing it", w.id, w.pid,
                     now - w.last_seen)
            kill(core, w, "heartbeat", now)
        elif sample and (w.state in SERVING or w.state is State.STARTING and w.pid is not None):
            to_sample.append(w.slot)  # a loading model counts too: --max-rss applies from the start
    if to_sample:
        core.actions.append(Sample(to_sample))
    if sample:
        check_degraded(core, now)
        core.actions.append(ReapStrays())


# SIGKILL takes effect at once, but a process's teardown may not (freeing a GPU context, a
# large address space): this long after it, at least, a process still there is stuck
KILLED_WITHIN_S = 30.0


def give_up(core: "Core", w, now: float) -> None:
    """A process alive long after SIGKILL is stuck in the kernel (uninterruptible sleep, in a
    driver or a file system) and may stay so. Waiting for it held the slot, the requests it
    had, and a stopping pool for ever: its exit is taken as seen, the shell stops watching it
    (it is ended as a stray once it can be), and the slot starts again after a backoff, as
    after a crash, so a model that always gets stuck leaves such processes at that pace."""
    core.log(logging.ERROR, "worker %d (pid %s) did not exit %gs after SIGKILL: it is stuck in the kernel (a "
             "driver or a file system). Given up: its requests are taken back and its slot starts again after "
             "a backoff; it is killed again and reaped once it can be", w.id, w.pid,
             max(core.config.kill_grace, KILLED_WITHIN_S))
    core.actions.append(GiveUp(w.slot))
    exited(core, w, {"exit_code": None, "signal": None, "reason": "given up: alive after SIGKILL"}, now)
    if w.state is State.BACKOFF:  # restarted in place: not at once
        w.crashes_in_row += 1
        w.spawn_at = max(w.spawn_at, now + core.restarts.delay(w.crashes_in_row + 1))


def silent(core: "Core", w) -> bool:
    """Its silence means it is stuck: it is idle (and heartbeats when idle), or it holds work
    but its board says it runs none of it (found by the simulator: such a worker, holding
    only requests it never began, was never replaced, and a draining pool never stopped)."""
    if w.state is State.IDLE:
        return True
    if w.state in (State.BUSY, State.DRAINING) and core.ledger.load(w.slot):
        marks = core.boards(w.slot)
        return marks is not None and marks[0] <= marks[1]  # started <= finished: running nothing
    return False


def sampled(core: "Core", slot: int, rss: int, uss: int, cpu: float) -> None:
    w = core.workers.get(slot)
    if w is None or w.pid is None:
        return
    w.rss, w.uss, w.cpu_percent = rss, uss, cpu
    max_rss = core.config.max_rss
    if max_rss and rss > max_rss and w.state is State.STARTING:
        core.log(logging.WARNING, "worker %d (pid %s) RSS %d MiB passed --max-rss %d MiB while its model loads; "
                 "killing it", w.id, w.pid, rss >> 20, max_rss >> 20)
        kill(core, w, "load_max_rss", core.now)
    elif max_rss and rss > max_rss and w.leaving is None:
        core.log(logging.WARNING, "worker %d (pid %s) RSS %d MiB is over --max-rss %d MiB; recycling it", w.id, w.pid,
                 rss >> 20, max_rss >> 20)
        retire(core, w, "max_rss")


def check_degraded(core: "Core", now: float) -> None:
    degraded = core.restarts.degraded(now)
    if degraded != core.was_degraded:
        core.was_degraded = degraded
        core.emit("degraded" if degraded else "recovered", None,
                  restarts_in_window=len(core.restarts.recent), window_s=core.config.restart_window)


def next_due(core: "Core", now: float, tick_s: float) -> float:
    """When a timer of a worker or the template is next due (at most tick_s away)."""
    due = now + tick_s
    t = core.template
    if t.state is TemplateState.WAITING and core.phase.runs_workers:
        due = min(due, t.due)
    can_spawn = t.can_fork()
    for w in core.workers.values():
        if w.state is State.BACKOFF and can_spawn:
            due = min(due, w.spawn_at)
        elif w.kill_at is not None:
            due = min(due, w.kill_at)
    return due
