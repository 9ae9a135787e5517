"""Headers: the small msgpack map {v, op, id, ...} every hop decodes first."""

from __future__ import annotations

from typing import Any

import msgpack

from .errors import BadRequest
from .limits import DEFAULT_LIMITS, Limits
from .ops import ALL_OPS, VERSION


def pack_header(op: str, rid: Any, **fields: Any) -> bytes:
    fields["v"] = VERSION
    fields["op"] = op
    fields["id"] = rid
    return msgpack.packb(fields, use_bin_type=True)


def unreadable(exc: Exception) -> str:
    """Why msgpack could not decode some bytes, in words (its StackError has none)."""
    if isinstance(exc, msgpack.exceptions.StackError):
        return "it nests lists or maps deeper than the decoder's stack allows"
    if isinstance(exc, ValueError) and " exceeds max_" in str(exc):  # one of the length caps of the unpacker
        return (f"{exc}: a list, map, string or bytes longer than this message may hold; send large data "
                "as arrays (numpy or torch)")
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def unpack_header(data: bytes, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Decode and check a header: a map with the current version and a known op."""
    if len(data) > limits.max_header_bytes:
        raise BadRequest(
            f"header is {len(data)} bytes, over max_header_bytes={limits.max_header_bytes}",
            setting="max_header_bytes",
        )
    try:
        header = msgpack.unpackb(data, raw=False, max_ext_len=0)
    except Exception as exc:
        raise BadRequest(f"header is not valid msgpack ({unreadable(exc)}); is the sender an isopool client?") from None
    if not isinstance(header, dict):
        raise BadRequest("header must be a msgpack map with keys v, op, id")
    version = header.get("v")
    if type(version) is not int or version != VERSION:  # true and 1.0 equal 1 in Python, not on the wire
        raise BadRequest(
            f"protocol version {version!r} is not supported (this supervisor speaks v{VERSION}); "
            "upgrade the client and the server to the same isopool release",
            version=VERSION,
        )
    op = header.get("op")
    if type(op) is not str or op not in ALL_OPS:  # a list or map is unhashable: never look it up
        raise BadRequest(f"unknown op {op!r}; known ops: {', '.join(sorted(ALL_OPS))}")
    return header


PEEK_WHOLE = 64 << 10  # a header up to this size is decoded whole to find its id; a larger one only if flat


def peek_id(data: bytes) -> Any:
    """Best-effort request id from a header that failed a check, so the error can still be routed
    to the request it refuses. A header of at most PEEK_WHOLE bytes is decoded whole (its lists,
    maps and strings included: a field of the wrong type must not hide the id); a larger one
    only if it holds no list and no long string, so that peeking never builds much."""
    try:
        if len(data) <= PEEK_WHOLE:
            header = msgpack.unpackb(data, raw=False, max_ext_len=0)
        else:
            header = msgpack.unpackb(data, raw=False, max_bin_len=0, max_ext_len=0, max_str_len=1024,
                                     max_array_len=0, max_map_len=64)
        rid = header.get("id") if isinstance(header, dict) else None
        return rid if type(rid) in (int, str, bytes) else None
    except Exception:
        return None
