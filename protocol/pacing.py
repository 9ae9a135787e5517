"""Pacing: how a process waits for its next message, and how its ZeroMQ I/O thread is
scheduled, by one rule: is the work it relays quick?

    work done ──did(seconds)──► Pacing ──wait()──► spin up to --spin-us, then sleep in poll
                                   └────observe(holding)──► I/O thread: SCHED_BATCH or normal

Work that took at most QUICK_S is quick. After quick work the next message is likely within
a round trip, so a process looks for it awake (Spinner) rather than pay the wake-ups of a
sleep; and while it holds several quick requests its I/O thread may wait for it instead of
preempting it (protocol/iothread.py). Beside longer work, the wake-ups a sleep costs are
noise, and an I/O thread that cannot preempt costs the slow work's answers a scheduler tick.

Two figures are judged by it. The work: the model's run in a worker; in the supervisor, a
request's time on its worker (from its dispatch, or the worker's previous answer if that
came later: the time it ran, not the time it queued there; answers read together, a batch's,
all count as the first: the batch's time). It sets the I/O-thread policy.
The round trip: how soon after its dispatch an answer came. It decides a spin, since a spin
pays only while the next message comes within a round trip: under load, answers queue
behind others and the supervisor stops spinning (a spin there only takes a core from the
workers). In a worker both are its run time. Clients relay no work of
their own and are always quick.
"""

from __future__ import annotations

import os
import time
from typing import Callable, TypeVar

from .iothread import IoThreads

T = TypeVar("T")
QUICK_S = 0.002


class Pacing:
    def __init__(self, io_threads: IoThreads, spin_us: int = 0, work_s: float = float("inf")):
        self.io_threads = io_threads
        self.spinner = Spinner(spin_us / 1e6) if spin_us else None
        self.work_s = work_s  # how long the last piece of work took; none yet: slow
        self.round_trip_s = work_s  # how soon its answer came after it was sent out

    def did(self, seconds: float) -> None:
        """A worker's run: its work and its round trip."""
        self.work_s = self.round_trip_s = seconds

    @property
    def quick(self) -> bool:
        return self.work_s <= QUICK_S

    def wait(self, worked: bool, look: Callable[[], T], sleep: Callable[[], T], cap_s: float = float("inf")) -> T:
        """What look() or sleep() finds: after quick work (`worked`), look() for up to the spin
        window (and cap_s) first; otherwise sleep() at once."""
        if worked and self.spinner is not None and self.round_trip_s <= QUICK_S:
            return self.spinner.wait(look, sleep, cap_s)
        return sleep()

    def pace(self, work_s: float, round_trip_s: float, holding: int) -> None:
        """The supervisor's once-a-pass call: its last answer's work and round trip, and what
        it holds (observe())."""
        self.work_s, self.round_trip_s = work_s, round_trip_s
        self.io_threads.observe(holding if work_s <= QUICK_S else 0)

    def observe(self, holding: int) -> None:
        """This process holds `holding` requests (queued, running or awaited)."""
        self.io_threads.observe(holding if self.work_s <= QUICK_S else 0)

    def idle(self) -> None:
        self.io_threads.idle()


def spin_until(look: Callable[[], T], seconds: float) -> T | None:
    """Look for the next message again and again for up to `seconds` before a caller sleeps
    in poll(): the first truthy answer of look(), or None. The core is offered to any other
    thread between looks (sched_yield), so a spin never holds back the work it waits for.

    Why: a message to a sleeping process is three thread wake-ups (the sender's I/O thread,
    the receiver's, the receiver), and where a wake-up lands on an idle core it costs that
    core's way out of its idle state too; on the 2-core VMs we measure on, idle vCPUs halt at
    once (guest_halt_poll_ns=0), and a sequential request crosses 4 hops. A process that just
    did quick work is likely to get more within a round trip, so it keeps its core awake
    instead: sequential p50 680 -> 580 µs on the 2-vCPU guest of 2026-12-07 (docs/performance.md,
    "The spin window")."""
    end = time.perf_counter() + seconds
    while True:
        found = look()
        if found or time.perf_counter() >= end:
            return found or None
        os.sched_yield()


class Spinner:
    """Spin, then sleep, for as long as spinning has been paying off.

    The window is learnt from the gaps between the end of work and the next message, by the
    rule of Linux's guest haltpoll governor: a message that came after the spin gave up, but
    within `limit`, doubles the window (from GROW_FROM_S, up to the limit); a gap longer than
    the limit, or none at all, halves it, down to nothing. A steady sequential client keeps
    the whole window; sporadic requests stop costing a spin within a few of them.
    """

    GROW_FROM_S = 0.00005

    def __init__(self, limit_s: float):
        self.limit = limit_s
        self.window = limit_s

    def wait(self, look: Callable[[], T], sleep: Callable[[], T], cap_s: float = float("inf")) -> T:
        """The first truthy answer of look(), tried for up to the window (and cap_s), else what
        sleep() returns."""
        start = time.perf_counter()
        if self.window:
            found = spin_until(look, min(self.window, cap_s))
            if found:
                return found
        found = sleep()
        if found and time.perf_counter() - start <= self.limit:
            self.window = min(self.limit, max(2 * self.window, self.GROW_FROM_S))
        elif self.window:
            self.window = self.window / 2 if self.window > self.GROW_FROM_S else 0.0
        return found


