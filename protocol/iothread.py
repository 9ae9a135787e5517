"""Scheduling a context's libzmq I/O thread by load: wake-up preemption only when it helps.

    sender thread ──send──► libzmq pipe ──eventfd──► I/O thread ──write──► socket

Every ZeroMQ send wakes the context's I/O thread. On a core the sender shares, a freshly
woken thread preempts the one that woke it, so under load each flush costs the sender two
context switches and its warm caches, though its messages could as well leave when it next
sleeps or its time slice ends. A SCHED_BATCH thread never preempts on wake-up: it runs on an
idle core if there is one, otherwise as soon as the sender yields. That suits a busy process
(at 64 in flight, across client, supervisor and workers: context switches per request
2.6 -> 1.1, CPU per request 233 -> 192 µs, requests/s +3-8% in long runs; python -m
isopool.bench.latency), and it does not suit a lone request, whose every hop is on the
critical path (sequential p50 ~100 µs worse with SCHED_BATCH throughout).

So the policy follows the load each process sees: SCHED_BATCH while it holds two or more
requests, normal again after CALM consecutive looks at one or none. And only while requests
are quick: a thread that cannot preempt also waits, on a machine whose cores are all busy,
up to a scheduler tick for a message that arrives, which costs a slow model's answers more
than the switches it saves. So a process whose last work was not quick (protocol/pacing.py:
a worker's model run, a request's time on its worker for the supervisor) looks "calm".
Switching is one sched_setscheduler() call per thread, made only on a change. Where the
kernel refuses it (a sandbox), the threads keep the normal policy and nothing else changes.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TypeVar

import zmq

log = logging.getLogger("isopool")

CALM = 8  # consecutive looks at one request or none before the I/O thread may preempt again
_IO_NAME = b"ZMQbg/IO/"  # libzmq names its I/O threads so once they run

C = TypeVar("C", bound=zmq.Context)


def _tasks() -> set[int]:
    try:
        return {int(name) for name in os.listdir("/proc/self/task")}
    except OSError:  # no /proc: nothing to tune
        return set()


class IoThreads:
    """The I/O threads of one context; observe() moves them between normal and SCHED_BATCH."""

    def __init__(self, started: set[int]):
        self.candidates = started  # threads that appeared as the context started; named lazily
        self.tids: list[int] | None = None
        self.batch = False
        self.calm = 0
        self.lock = threading.Lock()  # the sync client observes from several threads

    def observe(self, holding: int) -> None:
        """This process now holds `holding` requests (queued, running or awaited)."""
        if holding >= 2:
            self.calm = 0
            if not self.batch:
                self._switch(True)
        elif self.batch:
            self.calm += 1
            if self.calm >= CALM:
                self._switch(False)

    def idle(self) -> None:
        """Nothing to do for a while: the next message is a lone one, on the critical path."""
        if self.batch:
            self._switch(False)

    def _switch(self, batch: bool) -> None:
        with self.lock:
            if self.batch is batch:
                return
            self.batch = batch
            if self.tids is None:
                self.tids = [tid for tid in self.candidates if _named_io(tid)]
            policy = os.SCHED_BATCH if batch else os.SCHED_OTHER
            for tid in self.tids:
                try:
                    os.sched_setscheduler(tid, policy, os.sched_param(0))
                except OSError as exc:
                    log.debug("cannot change the scheduling policy of ZeroMQ's I/O thread (%s); "
                              "leaving it as it is", exc)
                    self.tids = []
                    return


def _named_io(tid: int) -> bool:
    try:
        with open(f"/proc/self/task/{tid}/comm", "rb") as f:
            return f.read().startswith(_IO_NAME)
    except OSError:  # it ended meanwhile
        return False


def io_context(cls: type[C] = zmq.Context) -> tuple[C, IoThreads]:
    """A new context with its threads started, and a handle on its I/O thread.

    libzmq starts a context's threads with its first socket; the threads that appear then
    are its own (they are told apart by name when first switched, so that a thread another
    part of the program starts at the same moment is never touched)."""
    before = _tasks()
    ctx = cls(1)
    try:
        ctx.socket(zmq.PAIR).close(linger=0)
    except BaseException:
        ctx.term()
        raise
    return ctx, IoThreads(_tasks() - before)
