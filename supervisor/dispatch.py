"""Dispatch: which queued request goes to which worker.

Without isolation, the oldest queued request goes to the worker with the most free
credit, found in O(1) (Credits, below). With isolation, each request goes to a worker of
its own tenant or a fresh one, never across tenants (dispatch_isolated).

Credits:

A worker may hold up to `capacity` requests (prefetch, or a full batch for batching
models). Workers sit in buckets by free credit; dispatch takes from the fullest bucket, so
load spreads evenly (a worker announcing room for 8 does not swallow a burst of 4 while
another idles). Within a bucket it takes the newest entry: of equally free workers, the
one that finished most recently, whose caches still hold the model and the interpreter's
hot paths. Under light load one worker then serves back-to-back requests warm instead of
the workers taking turns cold (sequential p50 ~25 µs lower with 2 workers on 2 cores).
Entries are never searched for: one that no longer matches its worker (it died, drains,
or its load changed) is skipped when met.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable

from isopool.protocol import ops, pack_header

from .slots import SERVING, State, Worker, retire

if TYPE_CHECKING:
    from .core import Core
    from .ledger import Request

LOOKAHEAD = 64  # with isolation: queued requests considered per dispatch, oldest first


class Credits:
    def __init__(self) -> None:
        self.buckets: dict[int, OrderedDict[tuple[int, int], None]] = {}
        self.top = 0  # no bucket above this is non-empty

    def offer(self, slot: int, generation: int, free: int) -> None:
        """(slot, generation) now has `free` credits (0: none; it leaves every bucket lazily)."""
        if free <= 0:
            return
        bucket = self.buckets.setdefault(free, OrderedDict())
        bucket.pop((slot, generation), None)
        bucket[(slot, generation)] = None
        self.top = max(self.top, free)

    def take(self, free_of: Callable[[int, int], int]) -> tuple[int, int] | None:
        """The least-loaded worker; free_of(slot, generation) says its current free credit (-1: gone)."""
        while self.top > 0:
            bucket = self.buckets.get(self.top)
            while bucket:
                (slot, generation), _ = bucket.popitem(last=True)
                if free_of(slot, generation) == self.top:
                    return slot, generation
                # stale: its load changed since it was offered, or it is gone; it was re-offered if live
            self.top -= 1
        return None

    def clear(self) -> None:
        self.buckets.clear()
        self.top = 0


def dispatch(core: "Core", now: float) -> None:
    if core.config.isolation != "none":
        dispatch_isolated(core, now)
        return
    queue, credits, workers, ledger = core.ledger.queue, core.credits, core.workers, core.ledger
    free_of = core.free_credit
    while queue:
        taken = credits.take(free_of)
        if taken is None:
            return
        w = workers[taken[0]]
        send_run(core, w, next(iter(queue.values())), now)
        credits.offer(w.slot, w.generation, w.capacity - ledger.load(w.slot))


def dispatch_isolated(core: "Core", now: float) -> None:
    """Each request to a worker of its own tenant, or a fresh one; never across tenants.

    FIFO with a bounded look-ahead. When the oldest waiting request has no worker it may
    use, one idle worker bound to another tenant is recycled (its replacement starts
    first), so capacity is shared by arrival order and no tenant is starved.
    """
    core.credits.clear()  # credits are the shared-pool fast path; here every slot is checked
    one_each = core.config.isolation == "request"
    ledger = core.ledger
    free = [w for w in core.workers.values()
            if w.state in SERVING and w.leaving is None and ledger.load(w.slot) < (1 if one_each else w.capacity)]
    placed = []
    held = {w.slot: ledger.load(w.slot) for w in free}
    for req in itertools.islice(ledger.queued_requests(), LOOKAHEAD):
        w = next((w for w in free if w.tenant == req.tenant), None) or \
            next((w for w in free if w.tenant is None), None)
        if w is None:
            continue
        w.tenant = req.tenant
        placed.append((w, req))
        held[w.slot] += 1
        if held[w.slot] >= (1 if one_each else w.capacity):
            free.remove(w)
    for w, req in placed:
        send_run(core, w, req, now)
    if ledger.queue and not placed:
        recycle_for(core, ledger.next_queued())


def recycle_for(core: "Core", req: "Request") -> None:
    """Make room for a request whose tenant has no worker: recycle an idle foreign one."""
    if any(w.leaving == "tenant" and w.state in SERVING for w in core.workers.values()):
        return  # one recycle at a time; its replacement will take this request
    idle = [w for w in core.workers.values() if w.state is State.IDLE and w.leaving is None
            and w.tenant is not None and w.tenant != req.tenant]
    if idle:
        retire(core, min(idle, key=lambda w: w.ready_at), "tenant")


def send_run(core: "Core", w: Worker, req: "Request", now: float) -> None:
    core.ledger.dispatch(req, w.slot, now)
    w.dispatched += 1
    req.seq = w.dispatched  # what the worker marks on its board when it starts this one
    # workers share this machine's monotonic clock, so the deadline travels as is
    if req.stream or req.shm is not None:  # a stream is answered in parts; shm names the client's memory
        header = pack_header(ops.RUN, list(req.key), attempt=req.attempt, deadline=req.deadline, seq=req.seq,
                             stream=req.stream, shm=req.shm)
    else:
        header = pack_header(ops.RUN, list(req.key), attempt=req.attempt, deadline=req.deadline, seq=req.seq)
    core.to_workers.append((w.ident, [header, *req.body]))
    if w.state is State.IDLE:
        w.move(State.BUSY, "dispatch")
