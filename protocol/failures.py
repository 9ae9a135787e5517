"""Errors on the wire: an error reply's frames [header, msgpack map], and back to an exception.

The map is the error's to_dict() (type, message, its typed fields) made plain data: an
error's details never carry anything but None, bools, numbers, str, bytes, lists and maps.
"""

from __future__ import annotations

from typing import Any, Sequence

import msgpack

from .errors import IsopoolError
from .headers import pack_header


def encode_error(rid: Any, err: Exception, **fields: Any) -> list[bytes]:
    return [pack_header("error", rid, **fields), msgpack.packb(_error_dict(err), use_bin_type=True)]


def _error_dict(err: Exception) -> dict:
    to_dict = getattr(err, "to_dict", None)
    if to_dict is not None:
        return _plain(to_dict())
    return {"type": "IsopoolError", "message": f"{type(err).__name__}: {err}"}


def _plain(value: Any) -> Any:
    """Error details are plain data; anything exotic becomes its repr."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return repr(value)


def decode_error(frames: Sequence[Any]) -> Exception:
    try:
        data = msgpack.unpackb(_view(frames[0]), raw=False, strict_map_key=False)
        if not isinstance(data, dict):
            raise ValueError("error payload is not a map")
        return IsopoolError.from_dict(data)
    except Exception as exc:
        return IsopoolError(f"undecodable error reply: {exc}")


def _view(frame: Any) -> memoryview:
    buf = getattr(frame, "buffer", None)
    return buf if buf is not None else memoryview(frame)
