"""The request ledger: the one place that knows where every accepted request is.

    admit ──► queued ──dispatch──► running on (worker, attempt) ──settle──► answered
                ▲                         │ requeue (its worker died, or it was never begun)
                └─────────────────────────┘

A request is open from admit() until its final answer: settle() when its worker answered
it, abandon() when the answer is ours (an error). Its worker's load is a separate fact: a
request answered while its worker still holds it (cancelled, timed out) keeps its place in
that worker's `held` list until the worker answers (release()) or dies, because the worker
really is busy with it. Such an orphan keeps a deadline too, so that a worker that runs it
forever is found (orphans_due()). Everything else (status, metrics, the simulator's
checks) derives its figures from here: nothing else stores membership.

Deadlines live in a heap with lazy deletion: an entry is stale once its request is
answered or re-admitted (each open request knows its own entry), and is skipped when met;
the heap is rebuilt when stale entries outnumber live ones by far.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Iterator

Key = tuple  # (client routing id: bytes, the client's request id)
COMPACT_ABOVE = 4096  # stale deadline entries tolerated before the heap is rebuilt


@dataclass(eq=False, slots=True)
class Request:
    key: Key
    body: list  # payload + buffer frames, forwarded untouched (kept for retries)
    deadline: float
    timeout: float  # seconds the caller allowed (for error messages)
    timeout_setting: str  # which setting bounds it: "timeout" (the client's) or "request_timeout"
    accepted_at: float
    retry: bool = True
    stream: bool = False
    bundles: bool = False  # its client reads bundled replies (protocol/transport.py)
    tenant: object = None  # the isolation key: the client's tenant, or the request itself
    shm: list | None = None  # [client pid, in fd, in bytes, out fd, in inode, out inode] (protocol/shm.py)
    # its latest dispatch's number, unique in this supervisor: an answer from an earlier
    # dispatch (of this request, or of an earlier one that had the same id) never passes for it
    attempt: int = 0
    worker: int | None = None  # slot while dispatched
    seq: int = 0  # its dispatch sequence number on that worker (protocol/board.py)
    started_at: float = 0.0
    chunks_sent: int = 0
    crashes: list = field(default_factory=list)  # one dict per worker death it was running in
    size: int = 0  # bytes of its payload and array frames, held here (for retries) until it is answered
    unblamed: int = 0  # deaths of its worker while it was held there, with nobody to blame (blame.exited)
    # its entry's number on the deadline heap: an entry left by an earlier request of the same
    # key is stale even where the two deadlines are equal (the same timeout, the same instant)
    entry: int = 0

    @property
    def client(self) -> bytes:
        return self.key[0]

    @property
    def client_id(self) -> Any:
        return self.key[1]


class Ledger:
    def __init__(self) -> None:
        self.open: dict[Key, Request] = {}  # accepted, not yet answered
        self.queue: OrderedDict[Key, Request] = OrderedDict()  # open and waiting for a worker, oldest first
        self.held: dict[int, deque] = {}  # slot -> keys it was sent and has not answered, in dispatch order
        self.by_client: dict[bytes, set] = {}  # client routing id -> keys of its open requests
        self.queued_by: dict[bytes, int] = {}  # client routing id -> how many of them are queued
        self.orphans: dict[tuple[int, Key], int] = {}  # (slot, key) -> its seq, for answered requests still held
        self._deadlines: list[tuple[float, int, Key]] = []
        self._orphan_deadlines: list[tuple[float, int, int, Key]] = []
        self._seq = itertools.count()
        self.shm_bytes = 0  # the shared memory the open requests name (a cap: --max-shm-bytes)
        self.held_bytes = 0  # the bytes of the open requests' bodies, held here (a cap: --max-queue-bytes)
        self.held_by: dict[bytes, int] = {}  # the same, by client (one may hold 7/8 of the cap)
        self._dispatches = itertools.count(1)

    # ------------------------------------------------------------ figures

    def __len__(self) -> int:
        return len(self.open)

    def __contains__(self, key: Key) -> bool:
        return key in self.open

    def get(self, key: Key) -> Request | None:
        return self.open.get(key)

    @property
    def queued(self) -> int:
        return len(self.queue)

    @property
    def running(self) -> int:
        """Open requests a worker has been sent."""
        return len(self.open) - len(self.queue)

    @property
    def busy(self) -> int:
        """Requests workers are running or hold: the open ones dispatched, and those answered
        (cancelled, timed out) that their worker has not finished yet."""
        return len(self.open) - len(self.queue) + len(self.orphans)

    def load(self, slot: int) -> int:
        """Requests the worker in `slot` holds (answered ones it still runs included)."""
        held = self.held.get(slot)
        return len(held) if held else 0

    def holding(self, slot: int) -> deque:
        return self.held.get(slot) or deque()

    def of_client(self, client: bytes) -> list[Request]:
        return [self.open[k] for k in self.by_client.get(client, ())]

    # ------------------------------------------------------------ moves

    def admit(self, req: Request) -> None:
        key = req.key
        self.open[key] = req
        self.queue[key] = req
        self.queued_by[key[0]] = self.queued_by.get(key[0], 0) + 1
        mine = self.by_client.get(key[0])
        if mine is None:
            self.by_client[key[0]] = mine = set()
        mine.add(key)
        if req.shm is not None:
            self.shm_bytes += req.shm[2]
        self.held_bytes += req.size
        self.held_by[key[0]] = self.held_by.get(key[0], 0) + req.size
        req.entry = next(self._seq)
        heapq.heappush(self._deadlines, (req.deadline, req.entry, key))
        if len(self._deadlines) > 2 * len(self.open) + COMPACT_ABOVE:
            self._compact()

    def next_queued(self) -> Request | None:
        return next(iter(self.queue.values()), None) if self.queue else None

    def queued_requests(self) -> Iterator[Request]:
        return iter(self.queue.values())

    def dispatch(self, req: Request, slot: int, now: float) -> None:
        """`req` leaves the queue for the worker in `slot` (its next attempt)."""
        del self.queue[req.key]
        self._unqueued(req.key[0])
        req.attempt = next(self._dispatches)
        req.worker = slot
        req.started_at = now
        held = self.held.get(slot)
        if held is None:
            self.held[slot] = held = deque()
        held.append(req.key)

    def release(self, slot: int, key: Key) -> bool:
        """The worker in `slot` answered `key` (or refused it unstarted): it no longer holds it."""
        held = self.held.get(slot)
        if not held:
            return False
        if self.orphans:
            self.orphans.pop((slot, key), None)
        if held[0] == key:  # answers come in dispatch order, as a rule
            held.popleft()
            return True
        try:
            held.remove(key)
        except ValueError:
            return False
        return True

    def requeue(self, req: Request) -> None:
        """Back to the head of the queue: it has waited longest."""
        req.worker = None
        self.queue[req.key] = req
        self.queue.move_to_end(req.key, last=False)
        self.queued_by[req.key[0]] = self.queued_by.get(req.key[0], 0) + 1

    def settle(self, req: Request) -> None:
        """`req` has had its final answer (its worker answered it, or it held no worker)."""
        key = req.key
        if self.open.get(key) is not req:
            return
        del self.open[key]
        if req.shm is not None:
            self.shm_bytes -= req.shm[2]
        self.held_bytes -= req.size
        left = self.held_by.get(key[0], 0) - req.size
        if left > 0:
            self.held_by[key[0]] = left
        else:
            self.held_by.pop(key[0], None)
        if self.queue.pop(key, None) is not None:
            self._unqueued(key[0])
        mine = self.by_client.get(key[0])
        if mine is not None:
            mine.discard(key)
            if not mine:
                del self.by_client[key[0]]

    def abandon(self, req: Request, grace: float) -> None:
        """`req` has had its final answer from us (an error), though a worker may still hold it:
        then it stays held, as an orphan due `grace` after its deadline."""
        if self.open.get(req.key) is not req:
            return
        held = req.worker is not None and req.key not in self.queue and self.held.get(req.worker)
        self.settle(req)
        if held and req.key in held:
            self.orphans[(req.worker, req.key)] = req.seq
            heapq.heappush(self._orphan_deadlines, (req.deadline + grace, next(self._seq), req.worker, req.key))

    def _unqueued(self, client: bytes) -> None:
        n = self.queued_by[client] - 1
        if n:
            self.queued_by[client] = n
        else:
            del self.queued_by[client]

    def forget_worker(self, slot: int) -> list[Request]:
        """The worker in `slot` is gone: the open requests it held, in dispatch order, each once.
        A key may be held twice: a request answered while its worker ran it (cancelled, timed
        out), and a later request with the same id sent to the same worker; only the later is open."""
        keys = self.held.pop(slot, ())
        out: list[Request] = []
        seen: set[Key] = set()
        for key in reversed(keys):  # the later dispatch of a key held twice is the open one
            self.orphans.pop((slot, key), None)
            r = self.open.get(key)
            if r is not None and r.worker == slot and key not in seen:
                seen.add(key)
                out.append(r)
        out.reverse()
        return out

    # ------------------------------------------------------------ deadlines

    def earliest(self) -> float | None:
        """The earliest deadline on the heaps, possibly of a request already answered (a timer
        that fires early finds nothing due: cheaper than cleaning the heaps on every look)."""
        d, o = self._deadlines, self._orphan_deadlines
        if d:
            return min(d[0][0], o[0][0]) if o else d[0][0]
        return o[0][0] if o else None

    def orphans_due(self, now: float) -> list[tuple[int, int]]:
        """(slot, seq) of answered requests a worker still held at their deadline (and grace)."""
        out = []
        o = self._orphan_deadlines
        while o and o[0][0] <= now:
            _, _, slot, key = heapq.heappop(o)
            seq = self.orphans.get((slot, key))
            if seq is not None:
                out.append((slot, seq))
        return out

    def due(self, now: float) -> list[Request]:
        """Open requests whose deadline has come, earliest first (taken off the deadline heap)."""
        out = []
        d = self._deadlines
        while d and d[0][0] <= now:
            _, entry, key = heapq.heappop(d)
            req = self.open.get(key)
            if req is not None and req.entry == entry:
                out.append(req)
        return out

    def _compact(self) -> None:
        """Drop the entries of answered requests. Each stays in the heap until its deadline
        otherwise: at 8,000 req/s and a 30 s timeout, a quarter of a million entries."""
        self._deadlines = [(r.deadline, r.entry, r.key) for r in self.open.values()]
        heapq.heapify(self._deadlines)
