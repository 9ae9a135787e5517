"""A model's declared signature: the tensors it takes and gives, as Open Inference Protocol metadata.

    class Model:
        signature = {"inputs":  [{"name": "INPUT0",  "datatype": "FP32", "shape": [-1, 4]}],
                     "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, 4]}]}

A shape's -1 is any size. A worker refuses to load a model whose signature is not valid
(the error says which entry and why); the supervisor keeps a valid one from the worker's
READY and shows it in `status` (models.NAME.signature). The HTTP gateway serves it at
GET /v2/models/NAME and checks requests against it.
"""

from __future__ import annotations

from typing import Any

DATATYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
             "FP64", "BF16", "BYTES")
MAX_TENSORS = 64
MAX_NAME = 128
MAX_DIMS = 32


def check_signature(value: Any) -> dict:
    """The signature, as plain data, if it is valid; else ValueError saying what is wrong."""
    if type(value) is not dict or not set(value) <= {"inputs", "outputs"}:
        raise ValueError('a signature is a dict with "inputs" and "outputs", each a list of '
                         '{"name", "datatype", "shape"}')
    out = {}
    for side in ("inputs", "outputs"):
        tensors = value.get(side, [])
        if type(tensors) not in (list, tuple) or len(tensors) > MAX_TENSORS:
            raise ValueError(f"signature {side} must be a list of at most {MAX_TENSORS} tensors")
        out[side] = [_tensor(t, f"signature {side}[{i}]") for i, t in enumerate(tensors)]
        names = [t["name"] for t in out[side]]
        if len(set(names)) != len(names):
            raise ValueError(f"signature {side}: names must differ, got {names}")
    return out


def _tensor(t: Any, where: str) -> dict:
    if type(t) is not dict:
        raise ValueError(f'{where} must be a dict of "name", "datatype" and "shape"')
    name, datatype, shape = t.get("name"), t.get("datatype"), t.get("shape")
    if type(name) is not str or not 0 < len(name) <= MAX_NAME:
        raise ValueError(f"{where}: name must be a str of 1 to {MAX_NAME} characters, got {name!r:.60}")
    if datatype not in DATATYPES:
        raise ValueError(f"{where}: datatype must be one of {', '.join(DATATYPES)}, got {datatype!r:.60}")
    if (type(shape) not in (list, tuple) or len(shape) > MAX_DIMS
            or not all(type(d) is int and -1 <= d < 2**31 for d in shape)):
        raise ValueError(f"{where}: shape must be a list of at most {MAX_DIMS} sizes (ints, -1 for any), "
                         f"got {shape!r:.60}")
    return {"name": name, "datatype": datatype, "shape": list(shape)}


def valid_signature(value: Any) -> dict | None:
    try:
        return check_signature(value)
    except ValueError:
        return None
