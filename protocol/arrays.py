"""Arrays on the wire: the dtypes allowed, and building a received array (a numpy view of
its frame or segment, or a torch tensor) from its descriptor (codec.py decodes them)."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from .errors import BadRequest

EXT_ARRAY = 1
ORIGIN_NUMPY = 0
ORIGIN_TORCH = 1

# The dtype allow-list: name -> numpy dtype (None: torch only).
DTYPES: dict[str, np.dtype | None] = {
    name: np.dtype(name)
    for name in (
        "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
        "float16", "float32", "float64", "complex64", "complex128",
    )
}
DTYPES["bfloat16"] = None
ITEMSIZE = {name: (dt.itemsize if dt is not None else 2) for name, dt in DTYPES.items()}

ARRAY_MODES = ("auto", "numpy", "torch")


def build_array(name: str, shape: tuple, origin: int, buf: memoryview, arrays: str, readonly: bool) -> Any:
    if arrays == "torch" or DTYPES[name] is None or (arrays == "auto" and origin == ORIGIN_TORCH and _has_torch()):
        return _torch_array(name, shape, buf)
    if readonly:
        buf = buf.toreadonly()
    arr = np.frombuffer(buf, dtype=DTYPES[name]).reshape(shape)
    return arr if readonly or not buf.readonly else arr.copy()  # writable asked of a read-only frame: a copy


_torch_found: bool | None = None


def _has_torch() -> bool:
    """Whether this process can build torch tensors (a client-only install has no torch:
    a tensor's answer comes as numpy there)."""
    global _torch_found
    if _torch_found is None:
        if "torch" in sys.modules:
            _torch_found = True
        else:
            import importlib.util

            _torch_found = importlib.util.find_spec("torch") is not None
    return _torch_found


def _torch_array(name: str, shape: tuple, buf: memoryview) -> Any:
    try:
        import torch
    except ImportError:
        raise BadRequest(f"a {name} array needs torch, which this process lacks: install torch, or send "
                         "another dtype") from None

    dtype = getattr(torch, name) if name != "bool" else torch.bool
    if len(buf) == 0:
        return torch.empty(shape, dtype=dtype)
    if buf.readonly:  # torch has no read-only tensors: never hand it memory it may not write
        buf = memoryview(bytearray(buf))
    # otherwise the buffer is this process's private copy of the received frame
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)
