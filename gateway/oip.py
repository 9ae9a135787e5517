"""Open Inference Protocol (v2) tensors: JSON and the binary tensor extension, to and from numpy.

    request body = JSON [+ binary blobs]      (Inference-Header-Content-Length: the JSON's length)
    inputs[i]    = {name, shape, datatype, data | parameters.binary_data_size}
    the model gets one input's array, or {name: array} for several (and "parameters" when sent)
    outputs      = the model's array as OUTPUT0, or one output per key of the map it returns

Every check raises BadInput with what was wrong; the app answers it with 400.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import numpy as np
import orjson

# OIP datatype <-> numpy dtype (BF16 has no numpy dtype; BYTES are object arrays of bytes)
DATATYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
             "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
             "FP32": np.float32, "FP64": np.float64}
OF_DTYPE = {np.dtype(v).name: k for k, v in DATATYPES.items()}
MAX_DIMS = 32
DEFAULT_OUTPUT = "OUTPUT0"


class BadInput(ValueError):
    """The request does not follow the protocol; the message says how."""


NON_FINITE = (b"NaN", b"Infinity")  # not JSON, but written by Triton and tritonclient for such floats


def _loads(head: bytes | memoryview) -> Any:
    """The request's JSON; where orjson refuses it for NaN, Infinity or -Infinity (as
    tritonclient sends non-finite floats), read by Python's json, which takes them."""
    try:
        return orjson.loads(head)
    except (ValueError, UnicodeDecodeError) as exc:
        error = exc
    raw = bytes(head)
    if any(word in raw for word in NON_FINITE):
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            pass
    raise BadInput(f"the request body is not JSON: {error}") from None


def parse_request(body: bytes | bytearray, header_length: int | None, max_elements: int) -> dict:
    """The request's JSON, with each input's `array` decoded (from JSON data or its binary blob)."""
    if header_length is not None:
        if not 0 <= header_length <= len(body):
            raise BadInput(f"Inference-Header-Content-Length {header_length} does not fit a body of {len(body)} bytes")
        head, blobs = memoryview(body)[:header_length], memoryview(body)[header_length:]
    else:
        head, blobs = body, memoryview(b"")
    request = _loads(head)
    if not isinstance(request, dict):
        raise BadInput("the request must be a JSON object with \"inputs\"")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadInput("\"inputs\" must be a non-empty list of {name, shape, datatype, data}")
    at, names = 0, set()
    for i, item in enumerate(inputs):
        if not isinstance(item, dict):
            raise BadInput(f"inputs[{i}] must be an object")
        at = _decode_input(item, i, blobs, at, max_elements)
        if item["name"] in names:  # the model is called with {name: array}: a second would hide the first
            raise BadInput(f"inputs[{i}]: the name {item['name']!r} is taken by an earlier input; each input's "
                           "name must be its own")
        names.add(item["name"])
    if at != len(blobs):
        raise BadInput(f"{len(blobs) - at} bytes of binary data follow the JSON but no input's binary_data_size "
                       "accounts for them")
    for key in ("parameters",):
        if key in request and not isinstance(request[key], dict):
            raise BadInput(f"\"{key}\" must be an object")
    if "id" in request and not isinstance(request["id"], str):  # the answer echoes it: a nesting too deep
        # for orjson to write back was a 500 after the model had run
        raise BadInput(f"\"id\" must be a string, got {type(request['id']).__name__}")
    outputs = request.get("outputs")
    if outputs is not None and (not isinstance(outputs, list)
                                or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                           and isinstance(o.get("parameters", {}), dict) for o in outputs)):
        raise BadInput("\"outputs\" must be a list of {\"name\": ..., \"parameters\": {...}} objects "
                       "(parameters optional)")
    return request


def _decode_input(item: dict, i: int, blobs: memoryview, at: int, max_elements: int) -> int:
    name, shape, datatype = item.get("name"), item.get("shape"), item.get("datatype")
    where = f"input {name!r}" if isinstance(name, str) else f"inputs[{i}]"
    if not isinstance(name, str) or not name:
        raise BadInput(f"inputs[{i}] needs a \"name\" (a string)")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(type(d) is int and 0 <= d for d in shape)):
        raise BadInput(f"{where}: \"shape\" must be a list of at most {MAX_DIMS} non-negative ints, got {shape!r}")
    count = math.prod(shape)
    if count > max_elements or math.prod(d for d in shape if d) > max_elements:  # [0, 2**62] holds 0, but
        # no array can have that shape
        raise BadInput(f"{where}: shape {shape} is over max_elements={max_elements}")
    if not isinstance(datatype, str) or datatype != "BYTES" and datatype not in DATATYPES:  # (a list: unhashable)
        raise BadInput(f"{where}: datatype {datatype!r} is not one of {', '.join([*DATATYPES, 'BYTES'])}")
    params = item.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadInput(f"{where}: \"parameters\" must be an object")
    size = params.get("binary_data_size")
    if size is not None:
        if type(size) is not int or size < 0 or at + size > len(blobs):
            raise BadInput(f"{where}: binary_data_size {size!r} does not fit the {len(blobs) - at} bytes left")
        item["array"] = _from_binary(blobs[at:at + size], datatype, shape, where)  # a view: no copy
        return at + size
    if "data" not in item:
        raise BadInput(f"{where}: needs \"data\", or parameters.binary_data_size with the bytes after the JSON")
    item["array"] = _from_json(item["data"], datatype, shape, count, where)
    return at


def _from_json(data: Any, datatype: str, shape: list, count: int, where: str) -> np.ndarray:
    # flat data (as tritonclient sends it) needs no flattening: the type checks below refuse
    # a list inside it all the same
    flat = data if type(data) is list and datatype != "BYTES" and (not data or type(data[0]) is not list) \
        else _flatten(data, where)
    if len(flat) != count:
        raise BadInput(f"{where}: shape {shape} holds {count} elements, data has {len(flat)}")
    if datatype == "BYTES":
        return np.array([_bytes_of(v, where) for v in flat], dtype=object).reshape(shape)
    dtype = DATATYPES[datatype]
    if datatype == "BOOL":
        if not all(type(v) is bool for v in flat):
            raise BadInput(f"{where}: BOOL data must be true or false")
    elif datatype[0] in "IU":  # a float there was truncated silently (1.5 became 1)
        if not all(type(v) is int for v in flat):
            raise BadInput(f"{where}: {datatype} data must be integers, got "
                           f"{next(v for v in flat if type(v) is not int)!r}")
    elif not all(type(v) in (int, float) for v in flat):
        raise BadInput(f"{where}: {datatype} data must be numbers")
    try:
        array = np.array(flat, dtype=dtype).reshape(shape)
    except (OverflowError, ValueError) as exc:
        raise BadInput(f"{where}: data does not fit {datatype}: {exc}") from None
    if datatype[0] == "F" and not np.isfinite(array).all() and np.isfinite(np.array(flat, dtype=np.float64)).all():
        # a finite number that became inf: past the type's range (NaN and Infinity as sent are kept)
        raise BadInput(f"{where}: data does not fit {datatype}: a number is beyond its range "
                       f"(±{np.finfo(dtype).max:.4g})")
    return array


def _flatten(data: Any, where: str, depth: int = 0) -> list:
    if not isinstance(data, list):
        return [data]
    if depth > MAX_DIMS:
        raise BadInput(f"{where}: data nests deeper than {MAX_DIMS}")
    out: list = []
    for v in data:
        out.extend(_flatten(v, where, depth + 1) if isinstance(v, list) else (v,))
    return out


def _bytes_of(value: Any, where: str) -> bytes:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, dict) and isinstance(value.get("b64"), str):  # the spec's base64 form
        try:
            return base64.b64decode(value["b64"], validate=True)
        except ValueError:
            raise BadInput(f"{where}: \"b64\" is not base64") from None
    raise BadInput(f"{where}: BYTES data must be strings (or {{\"b64\": ...}})")


def _from_binary(raw: memoryview, datatype: str, shape: list, where: str) -> np.ndarray:
    """The tensor in `raw`: numbers as a view of the body (copied only to change byte order)."""
    count = math.prod(shape)
    if datatype == "BYTES":  # each element: a 4-byte little-endian length, then its bytes
        if len(raw) < 4 * count:  # each needs its length at least: say so before reading any
            raise BadInput(f"{where}: shape {shape} holds {count} BYTES elements, which need at least "
                           f"{4 * count} bytes; the binary data has {len(raw)}")
        raw = bytes(raw)
        items, at = [], 0
        for _ in range(count):  # as many as the shape says, and no more
            if at + 4 > len(raw):
                raise BadInput(f"{where}: BYTES binary data is cut short")
            n = int.from_bytes(raw[at:at + 4], "little")
            items.append(raw[at + 4:at + 4 + n])
            at += 4 + n
        if at != len(raw):
            raise BadInput(f"{where}: shape {shape} holds {count} elements; the binary data has "
                           f"{'more' if at < len(raw) else 'fewer'}")
        return np.array(items, dtype=object).reshape(shape)
    dtype = np.dtype(DATATYPES[datatype]).newbyteorder("<")
    if len(raw) != count * dtype.itemsize:
        raise BadInput(f"{where}: shape {shape} of {datatype} needs {count * dtype.itemsize} bytes, got {len(raw)}")
    array = np.frombuffer(raw, dtype=dtype)
    return (array if dtype.isnative else array.astype(dtype.newbyteorder("="))).reshape(shape)


def check_inputs(request: dict, signature: dict, model: str) -> None:
    """BadInput unless the inputs are the ones `model` declares (protocol/signature.py):
    known names, the declared datatype, the declared rank and sizes (-1: any)."""
    declared = {t["name"]: t for t in signature.get("inputs", [])}
    if not declared:
        return
    for item in request["inputs"]:
        want = declared.get(item["name"])
        if want is None:
            raise BadInput(f"model {model!r} takes input(s) {', '.join(declared)}, not {item['name']!r} "
                           f"(GET /v2/models/{model} has its signature)")
        shape = list(item["array"].shape)
        if item["datatype"] != want["datatype"]:
            raise BadInput(f"input {item['name']!r} of model {model!r} is {want['datatype']}, not {item['datatype']}")
        if len(shape) != len(want["shape"]) or any(w not in (-1, g) for w, g in zip(want["shape"], shape)):
            raise BadInput(f"input {item['name']!r} of model {model!r} has shape {want['shape']} (-1: any size), "
                           f"not {shape}")
    missing = [n for n in declared if n not in {i["name"] for i in request["inputs"]}]
    if missing:
        raise BadInput(f"model {model!r} needs input(s) {', '.join(missing)} as well")


def model_input(request: dict) -> Any:
    """What the model is called with: one input's array, else {name: array}; with request
    parameters, those under "parameters" beside the inputs."""
    inputs = request["inputs"]
    arrays = {item["name"]: _for_model(item["array"]) for item in inputs}
    params = request.get("parameters")
    params = {k: v for k, v in (params or {}).items() if k != "binary_data_output"}
    if len(arrays) == 1 and not params:
        return next(iter(arrays.values()))
    if params and "parameters" in arrays:
        raise BadInput("an input is named \"parameters\", the key under which the model gets the request's "
                       "parameters: rename the input, or send the request without parameters")
    return {**arrays, **({"parameters": params} if params else {})}


def _for_model(array: np.ndarray) -> Any:
    if array.dtype == object:  # BYTES: a list of bytes (the wire has no object arrays)
        return [bytes(v) for v in array.reshape(-1)] if array.ndim == 1 else array.tolist()
    return array


def outputs_of(result: Any, request: dict | None = None) -> dict[str, np.ndarray]:
    """The model's answer as named output tensors: those the request names under "outputs",
    if it names any (the others need not be tensors), else all."""
    if not isinstance(result, dict):
        return {DEFAULT_OUTPUT: _tensor(result, DEFAULT_OUTPUT)}
    wanted = {o["name"] for o in (request or {}).get("outputs") or ()}
    return {str(k): _tensor(v, str(k)) for k, v in result.items() if not wanted or str(k) in wanted}


def _tensor(value: Any, name: str) -> np.ndarray:
    if hasattr(value, "numpy") and not isinstance(value, np.ndarray):  # a torch tensor
        value = value.detach().cpu().numpy()
    if isinstance(value, (bytes, str)) or (isinstance(value, list) and isinstance(_leaf(value), (bytes, str))):
        nested = np.array(value if isinstance(value, list) else [value], dtype=object)  # any rank (as BYTES came in)
        items = [v.encode() if isinstance(v, str) else v for v in nested.reshape(-1)]
        if not all(isinstance(v, bytes) for v in items):
            raise ValueError(f"output {name!r} mixes strings or bytes with other values")
        flat = np.empty(len(items), dtype=object)
        flat[:] = items
        return flat.reshape(nested.shape)
    array = np.asarray(value)
    if array.dtype == object:  # a map, None, or a list of such: no tensor (BYTES came in above)
        raise ValueError(f"output {name!r} is {_kind_of(value)}, which is not a tensor; a model's answer is an "
                         "array, a list of numbers, bytes or strings, or a map of those by output name")
    if array.dtype.name not in OF_DTYPE:
        raise ValueError(f"output {name!r} has dtype {array.dtype}, which the protocol cannot carry")
    return array


def _kind_of(value: Any) -> str:
    kind = type(value if not isinstance(value, list) else _leaf(value)).__name__
    return f"a {type(value).__name__}" + (f" holding a {kind}" if isinstance(value, list) else "")


def _leaf(value: list) -> Any:
    """The first element of a nested list, however deep."""
    for _ in range(MAX_DIMS + 1):
        if not isinstance(value, list) or not value:
            break
        value = value[0]
    return value


def response(model: str, request: dict, outputs: dict[str, np.ndarray]) -> tuple[bytes, list]:
    """(JSON, binary blobs) of the response: the outputs asked for (all, if none were named),
    as binary where the request asked for it. A blob is a view of its array where it can be
    (C order, little-endian): the body is written to the socket from the answer's memory."""
    wanted = request.get("outputs")
    every_binary = bool((request.get("parameters") or {}).get("binary_data_output"))
    if wanted:
        missing = [o["name"] for o in wanted if o["name"] not in outputs]
        if missing:
            raise BadInput(f"output(s) {', '.join(missing)} are not among the model's: {', '.join(outputs)}")
        chosen = [(o["name"], bool((o.get("parameters") or {}).get("binary_data", every_binary))) for o in wanted]
    else:
        chosen = [(name, every_binary) for name in outputs]
    out, blobs = [], []
    for name, binary in chosen:
        array = outputs[name]
        entry: dict[str, Any] = {"name": name, "shape": list(array.shape), "datatype": _datatype(array)}
        if binary:
            raw = _to_binary(array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = _to_json(array)
        out.append(entry)
    body: dict[str, Any] = {"model_name": model, "outputs": out}
    if "id" in request:
        body["id"] = request["id"]
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), blobs


def _datatype(array: np.ndarray) -> str:
    return "BYTES" if array.dtype == object else OF_DTYPE[array.dtype.name]


def _to_json(array: np.ndarray) -> list | np.ndarray | orjson.Fragment:
    """The tensor's elements, flat: strings for BYTES, else the array itself (orjson writes it).
    JSON has no NaN or infinity, and orjson writes them as null, which loses them: a float
    tensor holding any is written as NaN, Infinity and -Infinity, as Triton writes them and
    its clients read them (a strict JSON parser refuses them: binary output carries them)."""
    flat = array.reshape(-1)
    if array.dtype == object:
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat]
    if flat.dtype.kind == "f" and not np.isfinite(flat).all():
        return orjson.Fragment(json.dumps(flat.tolist()))
    return np.ascontiguousarray(flat, dtype=flat.dtype.newbyteorder("="))  # orjson takes native order only


def _to_binary(array: np.ndarray) -> bytes | memoryview:
    if array.dtype == object:
        return b"".join(len(v).to_bytes(4, "little") + v for v in (bytes(x) for x in array.reshape(-1)))
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))  # a copy only if it is not so
    return memoryview(little.reshape(-1)).cast("B") if little.size else b""
