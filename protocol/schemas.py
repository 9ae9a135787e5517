"""Every op's header schema, checked once where a message arrives (transport.messages).

    frames ──unpack_header (version, op known)──► check(header, side) ──► a well-formed header
                                                        └──► BadRequest naming the field

A side is the set of ops one receiver takes: the supervisor's frontend takes client ops
(CLIENT), its backend worker ops (WORKER). A field is required or optional; each has a
test and words for what it expects, so an error says what was wrong and what to send.
Fields a schema does not name are ignored (a newer client may send more). Nothing that
passes here can make the supervisor's core raise: ids are hashable scalars, timeouts are
finite and positive, control arguments are a map of plain values.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from . import ops
from .errors import BadRequest
from .signature import valid_signature

MAX_ID_LEN = 256  # bytes of a str or bytes request id
MAX_TENANT_LEN = 256
MAX_WORKERS = 1024  # the most workers `scale` may ask for (the worker cap)
MAX_ATTEMPT = 2**63 - 1

Test = Callable[[Any], bool]


def _id(v: Any) -> bool:
    t = type(v)
    return (t is int and -2**63 <= v < 2**64) or ((t is str or t is bytes) and len(v) <= MAX_ID_LEN)


def _bool(v: Any) -> bool:
    return type(v) is bool


def _seconds(v: Any) -> bool:
    return type(v) in (int, float) and 0 < v < math.inf


def _tenant(v: Any) -> bool:
    return type(v) is str and len(v) <= MAX_TENANT_LEN


def _int_between(lo: int, hi: int) -> Test:
    return lambda v: type(v) is int and lo <= v <= hi


def _plain(v: Any) -> bool:
    return v is None or type(v) in (bool, int, float, str)


def _args(v: Any) -> bool:
    return type(v) is dict and len(v) <= 16 and all(type(k) is str and _plain(x) for k, x in v.items())


def _worker_rid(v: Any) -> bool:
    """A reply's id as the supervisor sent it in RUN: [client routing id, the client's id]."""
    return type(v) is list and len(v) == 2 and type(v[0]) is bytes and _id(v[1])


def _shm(v: Any) -> bool:
    """[client pid, in fd (-1: none), in bytes, out fd, in inode (0: none), out inode] (protocol/shm.py)."""
    return (type(v) is list and len(v) == 6 and all(type(x) is int for x in v) and 0 < v[0] < 2**31
            and -1 <= v[1] < 2**31 and 0 <= v[2] < 2**62 and 0 <= v[3] < 2**31 and 0 <= v[4] < 2**64
            and 0 < v[5] < 2**64 and (v[1] >= 0 or v[2] == v[4] == 0))


def _opt_str(v: Any) -> bool:
    return v is None or (type(v) is str and len(v) <= 4096)


ID = (_id, "an int, or a str or bytes of at most 256 bytes")
MAX_MODEL_NAME = 64
MODEL = (lambda v: type(v) is str and 0 < len(v) <= MAX_MODEL_NAME, "a model name: a str of 1 to 64 characters")
SECONDS = (_seconds, "a finite number of seconds above 0")
BOOL = (_bool, "true or false")

# op -> {field: (required, test, what it expects)}
CLIENT: dict[str, dict[str, tuple]] = {
    ops.INFER: {"id": (True, *ID), "timeout": (False, *SECONDS), "retry": (False, *BOOL), "stream": (False, *BOOL),
                "bundles": (False, *BOOL), "tenant": (False, _tenant, "a str of at most 256 characters"),
                "model": (False, *MODEL),
                "shm": (False, _shm, "[pid, in fd or -1, in bytes, out fd, in inode or 0, out inode]: the client's shared memory")},
    ops.CANCEL: {"id": (True, *ID), "model": (False, *MODEL)},
    ops.STATUS: {"id": (True, *ID)},
    ops.HELLO: {"id": (True, *ID)},
    ops.CONTROL: {"id": (True, *ID),
                  "action": (True, lambda v: type(v) is str and v in ops.ACTIONS, "one of " + ", ".join(sorted(ops.ACTIONS))),
                  "args": (False, _args, "a map of at most 16 names to plain values (null, bool, number, str)")},
}
WORKER: dict[str, dict[str, tuple]] = {
    ops.READY: {"capacity": (False, _int_between(1, 1024), "an int from 1 to 1024"),
                "pid": (False, _int_between(1, 2**31), "a process id"), "device": (False, _opt_str, "a str"),
                "kind": (False, _opt_str, "a str: what the model is, e.g. embedding"),
                "signature": (False, lambda v: valid_signature(v) is not None,
                              "a signature (protocol/signature.py): inputs and outputs of name, datatype, shape")},
    ops.HEARTBEAT: {},
    ops.RESULT: {"id": (True, _worker_rid, "[client id (bytes), request id] as sent in run"),
                 "attempt": (True, _int_between(0, MAX_ATTEMPT), "the int sent in run"),
                 "reuse": (False, *BOOL)},
    ops.LOAD_FAILED: {},
    ops.INTEGRITY_FAILED: {"when": (False, _opt_str, "a str")},
}
WORKER[ops.ERROR] = WORKER[ops.CHUNK] = WORKER[ops.RESULT]
# what a client takes back from the supervisor (status and control answers have plain ids)
REPLIES: dict[str, dict[str, tuple]] = {op: {"id": (False, lambda v: v is None or _id(v), ID[1])}
                                        for op in (ops.RESULT, ops.CHUNK, ops.ERROR)}

SIDES = {"client": CLIENT, "worker": WORKER, "reply": REPLIES}
_WHO = {id(CLIENT): "a client op; clients send infer, cancel, status, control or hello",
        id(WORKER): "a worker op; workers send ready, heartbeat, result, chunk, error, load_failed or integrity_failed",
        id(REPLIES): "a reply op; the supervisor answers with result, chunk or error"}


def check(header: dict, side: dict[str, dict[str, tuple]]) -> dict:
    """`header` if it fits its op's schema on this side; else BadRequest naming the field."""
    op = header["op"]
    schema = side.get(op)
    if schema is None:
        raise BadRequest(f"field 'op': {op!r} is not {_WHO[id(side)]}", field="op")
    for name, (required, test, expected) in schema.items():
        if name not in header:
            if required:
                raise BadRequest(f"{op}: field {name!r} is missing; it must be {expected}", field=name)
            continue
        value = header[name]
        if not (required is False and value is None) and not test(value):
            raise BadRequest(f"{op}: field {name!r} must be {expected}, got {_show(value)}", field=name)
    return header


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
