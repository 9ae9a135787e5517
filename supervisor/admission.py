"""Client messages: which requests are accepted, and the answers to the others.

A request is accepted only when the pool takes requests, its id is fresh on its
connection, its payload passes the limits, the queue has room and its input is not
known poison. Otherwise it is refused at once with a typed error, and nothing of it is
kept. Status and control ops are answered here too; cancel withdraws a request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from isopool.protocol import (
    BadRequest,
    Cancelled,
    IsopoolError,
    NotAllowed,
    Overloaded,
    PoisonRequest,
    ShuttingDown,
    encode,
    encode_error,
    ops,
    pack_header,
    validate_payload,
)

from isopool.protocol.transport import body_bytes

from .actions import AnswerStatus
from .control import control
from .phase import ACCEPTING
from .dispatch import dispatch
from .ledger import Request

if TYPE_CHECKING:
    from .core import Core


def on_client(core: "Core", ident: bytes, header: dict, body: list, admin: bool, now: float) -> None:
    """One decoded client message (header checked by protocol.unpack_header)."""
    try:
        op = header["op"]
        if op == ops.INFER:
            accept(core, ident, header, body, now)
        elif op == ops.STATUS:
            if core.ledger.queue:
                dispatch(core, now)  # report what the pool is doing, not what this batch left undone
            core.actions.append(AnswerStatus(ident, header.get("id")))
        elif op == ops.CONTROL:
            if not admin:
                raise NotAllowed("control ops (scale, reload, stop) need an admin key; this client's key "
                                 "is not in --curve-admins")
            result = control(core, header.get("action"), header.get("args") or {})
            core.to_clients.append((ident, encode(ops.RESULT, header.get("id"), result), False))
        elif op == ops.CANCEL:
            cancel(core, (ident, header.get("id")))
        elif op == ops.HELLO:  # the limits, so a client refuses what we would refuse, and fails alone
            core.to_clients.append((ident, encode(ops.RESULT, header.get("id"), hello(core, header)), False))
        else:
            raise BadRequest(f"op {op!r} is not a client op; clients send infer, cancel, status, control or hello")
    except IsopoolError as err:
        refuse(core, ident, header.get("id"), err)


def refuse(core: "Core", ident: bytes, rid: Any, err: IsopoolError) -> None:
    """Answer a message that was not accepted (nothing of it is kept)."""
    core.stats.count(outcome_of(err))
    core.to_clients.append((ident, encode_error(rid if usable_id(rid) else None, err), False))


def accept(core: "Core", ident: bytes, header: dict, body: list, now: float) -> None:
    cid = header.get("id")
    if type(cid) not in ID_TYPES:
        raise BadRequest("request id must be an int, str or bytes")
    key = (ident, cid)
    if core.phase not in ACCEPTING:
        raise ShuttingDown("the pool is shutting down and accepts no new requests; retry on another instance")
    ledger = core.ledger
    if key in ledger.open:
        raise BadRequest(f"request id {cid!r} is already in flight on this connection; ids must be unique")
    shm = header.get("shm")
    validate_payload(body, core.limits, segment=None if shm is None else shm[2])
    if shm is not None and shm[2]:
        shared_memory_room(core, shm[2])
    timeout, setting = timeout_of(core, header)
    if ident in core.stalled:
        raise Overloaded("this client's replies are not being read: the ones waiting for it are at their bound; "
                         "read the replies you asked for before sending more", client_backlog=True)
    max_queue = core.config.max_queue
    share = max_queue - max_queue // 8  # one client's share: an eighth of the queue is kept for others
    if share < max_queue and ledger.queued_by.get(ident, 0) >= share:
        raise Overloaded(f"this client already has {ledger.queued_by[ident]} requests queued, its share of "
                         f"--max-queue {max_queue} (the last eighth is kept for other clients); retry later or "
                         "send fewer at once", queue_depth=ledger.queued, max_queue=max_queue, client_share=share)
    if len(ledger.queue) >= max_queue:
        dispatch(core, now)  # requests read in this same batch may still have workers waiting
        if ledger.queued >= max_queue:
            raise Overloaded(f"the queue is full ({ledger.queued} waiting, --max-queue {max_queue}); "
                             "retry later, add workers or raise --max-queue",
                             queue_depth=ledger.queued, max_queue=max_queue)
    size = body_bytes(body)
    cap = core.config.max_queue_bytes
    mine = ledger.held_by.get(ident, 0)
    if mine and mine + size > cap - cap // 8:  # as by count: an eighth is kept for other clients
        raise Overloaded(f"this client's requests held for this model already take {mine} bytes; this one's "
                         f"{size} would pass its share of --max-queue-bytes {cap} (the last eighth is kept for "
                         "other clients); retry later or send less at once", held_bytes=mine,
                         max_queue_bytes=cap, client_share=cap - cap // 8)
    if ledger.held_bytes + size > cap and ledger.open:  # one alone is always taken: it is under max_message_bytes
        raise Overloaded(f"the requests held for this model already take {ledger.held_bytes} bytes; this one's "
                         f"{size} would pass --max-queue-bytes {cap}. Retry later, add workers or raise "
                         "--max-queue-bytes (a client on this host sends large arrays in shared memory instead)",
                         held_bytes=ledger.held_bytes, max_queue_bytes=cap)
    if core.poison.kills and shm is None and core.poison.is_poison(body):
        raise PoisonRequest(f"this input has killed {core.config.poison_threshold} workers and is refused; "
                            "fix the input or the handler", threshold=core.config.poison_threshold)
    tenant = isolation_key(core, key, header) if core.config.isolation != "none" else None
    ledger.admit(Request(key, body, now + timeout, timeout, setting, now, bool(header.get("retry", True)),
                         bool(header.get("stream")), header.get("bundles") is True, tenant, shm, size=size))


def hello(core: "Core", header: dict) -> dict:
    """The limits; and where the client may use shared memory, the pid we see it as (it uses
    shared memory only if that is its own: not across pid namespaces) and the threshold."""
    answer: dict[str, Any] = {"limits": {k: v for k, v in core.limits.__dict__.items() if type(v) is int}}
    peer = header.get("peer")  # set by the loop from the connection, never by the client
    if shm_served(core.config) and type(peer) is int:
        answer["shm"] = {"pid": peer, "threshold": core.config.shm_threshold}
    return answer


def shm_served(config: Any) -> bool:
    """Workers can open a client's memory: not under --sandbox (another uid), and not if off."""
    return config.shm == "auto" and not config.sandbox


def shared_memory_room(core: "Core", size: int) -> None:
    if not shm_served(core.config):
        raise BadRequest("this pool takes no shared memory (--shm off, or --sandbox): send arrays as frames "
                         "(Client(shm=False))", setting="shm")
    cap = core.config.max_shm_bytes
    if core.ledger.shm_bytes + size > cap:
        raise Overloaded(f"the requests in flight already name {core.ledger.shm_bytes} bytes of shared memory; "
                         f"this one's {size} would pass --max-shm-bytes {cap}. Retry later, or send it as frames",
                         shm_bytes=core.ledger.shm_bytes, max_shm_bytes=cap)


ID_TYPES = frozenset({int, str, bytes})  # exact types: a bool is not an id


def usable_id(cid: Any) -> bool:
    return type(cid) in ID_TYPES


def isolation_key(core: "Core", key: tuple, header: dict) -> object:
    mode = core.config.isolation
    if mode == "none":
        return None
    if mode == "request":
        return key
    tenant = header.get("tenant")
    if tenant is not None and not isinstance(tenant, str):
        raise BadRequest(f"tenant must be a string, got {type(tenant).__name__}")
    return "" if tenant is None else tenant  # requests without a tenant share the default one


def timeout_of(core: "Core", header: dict) -> tuple[float, str]:
    cap = core.config.request_timeout
    timeout = header.get("timeout")
    if timeout is None:
        return cap, "request_timeout"
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise BadRequest(f"timeout must be a positive number of seconds, got {timeout!r}")
    return (float(timeout), "timeout") if timeout < cap else (cap, "request_timeout")


def client_gone(core: "Core", ident: bytes) -> None:
    """The client went away: nobody waits for its answers. Its queued requests are dropped,
    its running ones cancelled in their workers (a stream stops at its next part)."""
    for req in core.ledger.of_client(ident):
        stop_in_worker(core, req)
        core.ledger.abandon(req, grace=core.config.kill_grace)
        core.stats.count("client_gone")
    core.stalled.discard(ident)


def cut_stream(core: "Core", key: tuple) -> None:
    """A stream's parts came faster than its client read them: cancel it in its worker and
    end it with Overloaded. Its client has every part before the cut, in order, then this
    error (replies.py drops the parts after it), never a stream with a gap."""
    req = core.ledger.get(key) if usable_id(key[1]) else None
    if req is None or not req.stream:
        return
    stop_in_worker(core, req)
    core.fail(req, stream_cut(req.chunks_sent))


def stream_cut(parts: int | None) -> Overloaded:
    """The error that ends a stream whose parts came faster than its client read them."""
    after = f" after {parts} parts" if parts is not None else ""
    return Overloaded(f"the stream was cut{after}: its parts came faster than this client read them, and the "
                      "replies waiting for it reached their bound. Read a stream's parts as they come (or make "
                      "them fewer or smaller)", **({"parts": parts} if parts is not None else {}))


def stop_in_worker(core: "Core", req: Request) -> None:
    """Tell the worker running `req` to drop it (a stream stops at its next part)."""
    if req.worker is not None:
        core.to_workers.append((core.workers[req.worker].ident, [pack_header(ops.CANCEL, list(req.key))]))


def cancel(core: "Core", key: tuple) -> None:
    req = core.ledger.get(key) if usable_id(key[1]) else None
    if req is None:
        return
    stop_in_worker(core, req)
    # a dispatched request stays held by its worker until the worker answers
    core.fail(req, Cancelled("cancelled by the client"))


OUTCOMES = {"RequestTimeout": "timeout", "PoisonRequest": "poison", "WorkerCrashed": "crashed",
            "ShuttingDown": "shutting_down", "Cancelled": "cancelled", "BadRequest": "bad_request",
            "Overloaded": "overloaded", "NotAllowed": "not_allowed", "InternalError": "internal_error"}


def outcome_of(err: IsopoolError) -> str:
    """The `outcome` label of a request that ended in `err` (status, metrics)."""
    return OUTCOMES.get(type(err).__name__, "error")
