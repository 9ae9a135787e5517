"""Worker messages: readiness, answers (relayed to their clients), and reports of failure.

An answer is relayed only if it is for the request's current dispatch on this worker (its
`attempt`, a number unique in the supervisor); a late answer from a dispatch the request
has left (it was retried, cancelled, timed out), or from an earlier request that had the
same id (found by the simulator: a cancelled request still running when its client reused
the id answered the new one), is dropped, but still frees the worker's credit. Parts of a stream are relayed as they come.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from isopool.logs import worth_a_line
from isopool.protocol import decode_error, ops, pack_header
from isopool.protocol.contract import parse_ident
from isopool.protocol.exits import EXIT_LOAD_FAILED
from isopool.protocol.signature import valid_signature

from . import admission
from .actions import Sample
from .control import serving
from .slots import SERVING, State, Worker, kill, retire, stop
from .phase import Phase

log = logging.getLogger("isopool.supervisor")

if TYPE_CHECKING:
    from .core import Core

MAX_CAPACITY = 1024


def worker_of(core: "Core", ident: bytes) -> Worker | None:
    """The live worker that owns `ident`, or None: a stale message from a process given up
    on, or a forgery (a live worker's slot and generation without its token: reported)."""
    parsed = parse_ident(ident)
    w = core.workers.get(parsed[0]) if parsed else None
    if w is None or w.generation != parsed[1] or w.pid is None:
        return None
    if w.ident != ident:
        intruder(core, w)
        return None
    return w


def stranger(seen: int) -> int:
    """A backend message under an identity the supervisor never gives: ignored, and said
    (the first, the 100th, the 10,000th). Returns how many there have been."""
    seen += 1
    if seen in (1, 100, 10000):
        log.warning("a process on the backend that is no worker of ours sent %d message(s); ignored. A compromised "
                    "model may be probing the pool", seen)
    return seen


def intruder(core: "Core", w: Worker) -> None:
    """Someone connected to the backend as worker w without its token: refused, and said."""
    core.intruders += 1
    if core.intruders == 1 or core.intruders % 100 == 0:  # a flood of them is one line in a hundred
        core.log(logging.WARNING, "a process on the backend claimed worker %d's identity without its token "
                 "(%d such message(s) so far); refused. A compromised model may be probing the pool", w.id,
                 core.intruders)
        core.emit("intruder", w, messages=core.intruders)


def refused(core: "Core", e) -> None:
    """A sandboxed worker's call refused (actions.SandboxRefused): counted, logged (the first
    ten, then one in a hundred) and told as the event "sandbox_refused"."""
    w = core.workers.get(e.slot)
    if w is None:
        return
    core.sandbox_refused += 1
    if worth_a_line(core.sandbox_refused):
        aim = f" aimed at process {e.target}" if e.target is not None else ""
        core.log(logging.WARNING, "worker %d (thread %d) called %s%s; its sandbox refused it (EPERM). %d such "
                 "call(s) so far; a model that needs it cannot run sandboxed, and one that did not ask for it may be "
                 "compromised", w.id, e.caller, e.call, aim, core.sandbox_refused)
        core.emit("sandbox_refused", w, call=e.call, target=e.target, caller=e.caller, refused=core.sandbox_refused)


def on_worker(core: "Core", ident: bytes, header: dict, body: list, now: float) -> None:
    w = worker_of(core, ident)
    if w is None:
        return
    w.last_seen = now
    op = header["op"]
    if op == ops.RESULT or op == ops.ERROR or op == ops.CHUNK:
        on_reply(core, w, op, header, body, now)
    elif op == ops.READY:
        on_ready(core, w, header, now)
    elif op == ops.LOAD_FAILED:
        if not w.ready_at:  # starting (or killed while starting: its reason still says most)
            on_load_failure(core, w, body)
        else:  # a model loads once: said later, it is a model at play with the worker's socket
            broken(core, ident, "it said its model failed to load, after it was ready", now)
    elif op == ops.INTEGRITY_FAILED:
        if w.leaving is None:  # once is enough (it is leaving after that): more would be log and events
            on_integrity_failure(core, w, header, now)


def broken(core: "Core", ident: bytes, why: str, now: float) -> None:
    """The worker broke the protocol (sent something undecodable, or out of place), or lost
    its connection: it is not to be trusted with more work."""
    w = worker_of(core, ident)
    if w is None or w.state is State.STOPPING:  # on its way out already: one line, not one a message
        return
    core.log(logging.WARNING, "worker %d broke the protocol (%s); replacing it", w.id, why[:500])
    kill(core, w, "protocol", now)


def on_ready(core: "Core", w: Worker, header: dict, now: float) -> None:
    if w.state is not State.STARTING:
        return
    w.move(State.IDLE, "ready")
    w.ready_at = now
    core.actions.append(Sample([w.slot]))  # status and metrics show a new worker's memory at once
    capacity = header.get("capacity")
    ok = isinstance(capacity, int) and not isinstance(capacity, bool) and 1 <= capacity <= MAX_CAPACITY
    w.capacity = capacity if ok else core.config.prefetch
    core.credits.offer(w.slot, w.generation, w.capacity)
    kind = header.get("kind")
    core.kind = kind if isinstance(kind, str) else None  # what the model says it is (the gateway reads it)
    core.signature = valid_signature(header.get("signature"))  # the tensors it declares (protocol/signature.py)
    core.emit("ready", w, startup_s=round(now - w.started_at, 4), device=w.device)
    serving(core)


# the most of a worker's own words kept in a log line, status or an event: it may say anything
SAID = 16 << 10


def on_load_failure(core: "Core", w: Worker, body: list) -> None:
    err = decode_error(body)
    tb = str(getattr(err, "details", {}).get("traceback", ""))[-SAID:]  # its end says most
    w.last_error = str(err)[:SAID]
    core.log(logging.ERROR, "worker %d: %s\n%s", w.id, w.last_error, tb)
    if core.phase is Phase.STARTING:
        core.fail_startup(f"{w.last_error}\n\n{tb}".rstrip(), EXIT_LOAD_FAILED)


def on_integrity_failure(core: "Core", w: Worker, header: dict, now: float) -> None:
    """Its weights changed: no more work for it; what it holds finishes elsewhere."""
    said = {k: str(header.get(k))[:128] for k in ("when", "expected", "actual")}  # fingerprints are short
    core.log(logging.ERROR, "worker %d (pid %s): model weights changed (%s); recycling it", w.id, w.pid,
             said["when"])
    core.emit("integrity", w, **said)
    retire(core, w, "integrity")
    if w.state in SERVING:
        stop(core, w, now)  # it runs nothing more; what it holds is requeued


def on_reply(core: "Core", w: Worker, op: str, header: dict, body: list, now: float) -> None:
    rid = header.get("id")
    key = (rid[0], rid[1]) if type(rid) is list and len(rid) == 2 else None
    ledger = core.ledger
    req = ledger.get(key) if key is not None else None
    current = req is not None and req.worker == w.slot and req.attempt == header.get("attempt")
    if op == ops.CHUNK:
        if current and not req.stream:  # a part of an answer that is no stream: never from an honest worker
            broken(core, w.ident, "it sent a stream's part for a request that is no stream", now)
            return
        if current and req.client in core.stalled:  # its client reads no faster than this: cut
            admission.cut_stream(core, key)
        elif current:
            req.chunks_sent += 1
            core.to_clients.append((req.client, [pack_header(op, req.client_id), *body], req.bundles))
        return
    if not ledger.release(w.slot, key):
        return
    if w.state in SERVING:
        load = ledger.load(w.slot)
        core.credits.offer(w.slot, w.generation, w.capacity - load)
        if not load:
            w.move(State.IDLE, "all answered")
    if current:
        # its time on the worker: from its dispatch, or from the worker's previous answer if
        # that came later (before it, it waited behind others there). Answers read together
        # (a batch's, one bundle) ran together: the first says how long; the rest would say 0
        if now > w.answered_at:
            core.work_s = now - max(req.started_at, w.answered_at)
            w.answered_at = now
        w.requests += 1
        w.requests_this_process += 1
        if op == ops.ERROR:
            w.errors += 1
        else:
            w.crashes_in_row = 0
        # a worker done with the client's shared memory says so: the client may reuse it
        reuse = req.shm is not None and op == ops.RESULT and header.get("reuse") is True
        core.finish(req, op, body, "ok" if op == ops.RESULT else "error", now, reuse)
    after_request(core, w, now)


def after_request(core: "Core", w: Worker, now: float) -> None:
    if w.max_requests and w.requests_this_process >= w.max_requests:
        retire(core, w, "max_requests")
    elif core.config.isolation == "request":
        retire(core, w, "isolation")  # its one request is done: start its fresh replacement now
    if w.state is State.DRAINING and not core.ledger.load(w.slot):
        stop(core, w, now)
