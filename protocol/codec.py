"""The msgpack codec: headers, payloads and array frames.

    frames = [header, payload, *buffers]

    header   msgpack map {v, op, id, ...}. Small; every hop decodes it.
    payload  one msgpack value. An array inside it is an ext value
             [dtype, shape, buffer index, origin] and its bytes are buffers[index].
    buffers  raw array bytes, one frame each: sent with copy=False, received as
             views of the ZeroMQ frame (numpy arrays are read-only views).

The supervisor decodes headers and *validates* payloads (validate_payload checks
every limit without building an array); it forwards the payload and buffer frames
untouched. Workers and clients decode payloads (decode_payload).

Every decode is strict: any violation raises BadRequest naming the limit.
"""

from __future__ import annotations

import math
import sys
from itertools import chain
from typing import Any, Iterable, Sequence

import msgpack
import numpy as np

from .arrays import ARRAY_MODES, DTYPES, EXT_ARRAY, ITEMSIZE, ORIGIN_NUMPY, ORIGIN_TORCH  # noqa: F401 - re-exported
from .arrays import build_array as _build_array
from .errors import BadRequest
from .failures import decode_error, encode_error  # noqa: F401 - error replies, re-exported
from .headers import pack_header, unreadable
from .limits import DEFAULT_LIMITS, Limits

Frame = Any  # bytes, memoryview or zmq.Frame


# ---------------------------------------------------------------- payloads

def encode_payload(value: Any, spill: Any = None) -> list[Frame]:
    """[payload, *buffers]; array buffers are zero-copy views of the arrays. With a `spill`
    (shm.Spill), arrays of its threshold or more go to shared memory instead of frames."""
    single = _encode_single(value)
    if single is not None and (spill is None or len(single[1]) < spill.threshold):
        return single
    buffers: list[memoryview] = []

    def default(obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            return _array_ext(obj, ORIGIN_NUMPY, buffers, spill)
        torch = sys.modules.get("torch")  # a tensor can only exist if torch is imported
        if torch is not None and isinstance(obj, torch.Tensor):
            return _tensor_ext(obj, torch, buffers, spill)
        if isinstance(obj, np.generic):
            return obj.item()
        raise TypeError(
            f"cannot send a {type(obj).__module__}.{type(obj).__qualname__}: payloads are "
            "None, bool, int, float, str, bytes, lists, maps, numpy arrays and CPU torch tensors"
        )

    payload = msgpack.packb(value, default=default, use_bin_type=True)
    return [payload, *buffers]


def _array_ext(arr: np.ndarray, origin: int, buffers: list[memoryview], spill: Any = None) -> msgpack.ExtType:
    name = arr.dtype.name
    if name not in DTYPES or arr.dtype.hasobject:
        raise TypeError(f"dtype {arr.dtype} is not allowed; allowed: {', '.join(DTYPES)}")
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    return _ext(name, arr.shape, origin, memoryview(flat), buffers, spill)


# ---------------------------------------------------------------- one array, the common payload
#
# Most requests and results are one array and nothing else. Its payload frame is a few bytes
# that depend only on dtype and shape, so both ends keep them: the sender reuses the packed
# bytes, the receiver remembers exactly which bytes it has already fully decoded and checked,
# and for those bytes only checks the buffer's length and the limits again. A payload never
# seen before takes the full path, so no check is skipped for new input.

_SINGLE_MAX = 1024  # payloads remembered per process; forgotten all at once when full
_single_out: dict[tuple, bytes] = {}
_single_in: dict[bytes, tuple] = {}
_EXT_MARKERS = frozenset((0xc7, 0xc8, 0xc9, 0xd4, 0xd5, 0xd6, 0xd7, 0xd8))  # msgpack ext formats


def _remember(cache: dict, key: Any, value: Any) -> None:
    if len(cache) >= _SINGLE_MAX:
        cache.clear()
    cache[key] = value


def _encode_single(value: Any) -> list[Frame] | None:
    """[payload, buffer] when value is one contiguous CPU array of an allowed dtype, else None."""
    if type(value) is np.ndarray:
        arr, origin = value, ORIGIN_NUMPY
    else:
        torch = sys.modules.get("torch")
        if torch is None or type(value) is not torch.Tensor or value.device.type != "cpu" \
                or value.dtype is torch.bfloat16:
            return None
        arr, origin = value.detach().resolve_conj().resolve_neg().numpy(), ORIGIN_TORCH
    dtype = arr.dtype
    if not (arr.flags.c_contiguous and dtype.isnative) or dtype.hasobject:
        return None
    key = (dtype, arr.shape, origin)
    payload = _single_out.get(key)
    if payload is None:
        if dtype.name not in DTYPES:
            return None
        payload = msgpack.packb(_ext(dtype.name, arr.shape, origin, memoryview(b""), []), use_bin_type=True)
        _remember(_single_out, key, payload)
    return [payload, memoryview(arr.reshape(-1).view(np.uint8))]


def _single_seen(frames: Sequence[Frame], limits: Limits) -> tuple | None:
    """(name, shape, origin, buffer) when frames are [payload, buffer] and this exact payload was
    fully decoded before as one array; None sends the caller down the full path."""
    if len(frames) != 2 or limits.max_buffers < 1:
        return None
    first = frames[0]
    payload = first if type(first) is bytes else bytes(frame_view(first))
    seen = _single_in.get(payload)
    if seen is None:
        return None
    name, shape, origin, count, size = seen
    buf = frame_view(frames[1])
    if (len(buf) != size or count > limits.max_elements
            or len(payload) + size > limits.max_message_bytes):
        return None  # the full path says what is wrong
    return name, shape, origin, buf


def _tensor_ext(t: Any, torch: Any, buffers: list[memoryview], spill: Any = None) -> msgpack.ExtType:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous()
    if t.dtype == torch.bfloat16:
        raw = t.view(torch.int16).numpy()
        return _ext("bfloat16", tuple(t.shape), ORIGIN_TORCH, memoryview(raw.reshape(-1).view(np.uint8)), buffers,
                    spill)
    return _array_ext(t.numpy(), ORIGIN_TORCH, buffers, spill)


def _ext(name: str, shape: Sequence[int], origin: int, data: memoryview, buffers: list,
         spill: Any = None) -> msgpack.ExtType:
    if spill is not None and len(data) >= spill.threshold:  # [offset] in the call's shared memory
        return msgpack.ExtType(EXT_ARRAY, msgpack.packb([name, list(shape), [spill.place(data, ITEMSIZE[name])],
                                                         origin]))
    meta = msgpack.packb([name, list(shape), len(buffers), origin])
    buffers.append(data)
    return msgpack.ExtType(EXT_ARRAY, meta)


def decode_payload(frames: Sequence[Frame], arrays: str = "auto", limits: Limits = DEFAULT_LIMITS,
                   readonly: bool = True, segment: memoryview | None = None) -> Any:
    """Decode [payload, *buffers]. arrays: 'auto' (numpy or torch as sent), 'numpy' or 'torch'.
    `segment`: the message's shared memory, which arrays may name instead of a frame (shm.py)."""
    seen = _single_seen(frames, limits)
    if seen is not None and arrays in ARRAY_MODES:
        return _build_array(*seen, arrays, readonly)
    return _Decoder(frames, limits, build=True, arrays=arrays, readonly=readonly, segment=segment).run()


def validate_payload(frames: Sequence[Frame], limits: Limits = DEFAULT_LIMITS, segment: int | None = None) -> None:
    """Check [payload, *buffers] against every limit without building arrays (supervisor side);
    `segment`: the size the header gives the message's shared memory, which it never opens."""
    if _single_seen(frames, limits) is None:
        _Decoder(frames, limits, build=False, segment=segment).run()


def frame_view(frame: Frame) -> memoryview:
    buf = getattr(frame, "buffer", None)
    return buf if buf is not None else memoryview(frame)


# A payload larger than this has its lists and maps counted as they are built, and at most
# MAX_ITEMS items in all (a smaller one cannot hold enough objects to matter: 64 KiB of empty
# lists is ~4 MiB of them). Data that large belongs in arrays, which are never unpacked.
COUNTED_ABOVE = 64 << 10
MAX_ITEMS = 1 << 20
_LEAVES = (bool, int, float, str, bytes)
_KEYS = (str, int)  # what a payload's map keys may be (docs/protocol.md)
_KEY_TYPES = frozenset(_KEYS)
_ALLOWED = frozenset((*_LEAVES, type(None), list, dict))  # and arrays (_is_array_type)


def _is_array_type(kind: type) -> bool:
    if issubclass(kind, np.ndarray):
        return True
    torch = sys.modules.get("torch")
    return torch is not None and issubclass(kind, torch.Tensor)


class _Decoder:
    def __init__(self, frames: Sequence[Frame], limits: Limits, build: bool, arrays: str = "auto",
                 readonly: bool = True, segment: memoryview | int | None = None):
        if not frames:
            raise BadRequest("message has no payload frame")
        if arrays not in ARRAY_MODES:
            raise ValueError(f"arrays must be one of {ARRAY_MODES}, not {arrays!r}")
        self.limits = limits
        self.build = build
        self.arrays = arrays
        self.readonly = readonly
        self.payload = frame_view(frames[0])
        self.buffers = [frame_view(f) for f in frames[1:]]
        self.used = [False] * len(self.buffers)
        self.elements = 0
        self.items = 0  # list and map items of a large payload, counted as msgpack builds them
        self.segment = segment
        self.room = 0  # bytes shared-memory arrays may still take under max_message_bytes
        self.single: tuple | None = None  # the last array descriptor read: (name, shape, origin, count, bytes)

    def run(self) -> Any:
        lim = self.limits
        if len(self.buffers) > lim.max_buffers:
            raise BadRequest(f"{len(self.buffers)} array frames, over max_buffers={lim.max_buffers}",
                             setting="max_buffers")
        total = len(self.payload) + sum(len(b) for b in self.buffers)
        if total > lim.max_message_bytes:
            raise BadRequest(
                f"message is {total} bytes, over max_message_bytes={lim.max_message_bytes} "
                f"(raise {lim.flag('max_message_bytes')})", setting="max_message_bytes")
        self.room = lim.max_message_bytes - total
        cap = items = min(len(self.payload), 2**31 - 1)
        hooks: dict = {}
        if len(self.payload) > COUNTED_ABOVE:  # containers counted as they are built, not after
            hooks = {"list_hook": self._items, "object_hook": self._items}
            items = min(cap, MAX_ITEMS)  # a str or bin may still be as long as the payload
        try:
            value = msgpack.unpackb(
                self.payload, raw=False, ext_hook=self._ext_hook, strict_map_key=False,
                max_str_len=cap, max_bin_len=cap, max_array_len=items, max_map_len=items, max_ext_len=cap, **hooks,
            )
        except BadRequest:
            raise
        except Exception as exc:
            raise BadRequest(f"payload is not valid msgpack: {unreadable(exc)}") from None
        self._check_shape(value)
        if not all(self.used):
            raise BadRequest(f"{self.used.count(False)} array frame(s) are not referenced by the payload")
        if self.single is not None and len(self.buffers) == 1 and self.payload[0] in _EXT_MARKERS:
            # the whole payload is this one array: remember its exact bytes as checked
            _remember(_single_in, bytes(self.payload), self.single)
        return value

    def _check_shape(self, value: Any) -> None:
        """Depth and element caps over the decoded containers, and only allowed leaf types. Level
        by level, each level's types, lengths and children taken by C loops (set, map, chain):
        a payload of many small containers costs its level lists, not a Python step each (64 KiB
        of empty lists took 120 ms of the supervisor's loop when walked one by one)."""
        lim = self.limits
        level, depth = [value], 1
        while True:
            kinds = set(map(type, level))
            if not kinds <= _ALLOWED and any(not _is_array_type(k) for k in kinds - _ALLOWED):
                bad = next(k for k in kinds - _ALLOWED if not _is_array_type(k))
                raise BadRequest(f"payload holds a {bad.__name__}, which is not an accepted type")
            has_lists, has_maps = list in kinds, dict in kinds
            if not has_lists and not has_maps:
                return
            if depth > lim.max_depth:
                raise BadRequest(f"payload nests deeper than max_depth={lim.max_depth} "
                                 f"(raise {lim.flag('max_depth')})", setting="max_depth")
            alone = len(kinds) == 1  # a level of lists only, or of maps only: itself, unfiltered
            lists = (level if alone else [o for o in level if type(o) is list]) if has_lists else ()
            maps = (level if alone else [o for o in level if type(o) is dict]) if has_maps else ()
            self._count(sum(map(len, lists)) + sum(map(len, maps)))
            if maps and not self.build and not set(map(type, chain.from_iterable(maps))) <= _KEY_TYPES:
                bad = next(k for m in maps for k in m if type(k) not in _KEY_TYPES)  # a request, at the supervisor
                raise BadRequest(f"payload has a map key of type {type(bad).__name__}: map keys must be "
                                 "strings or integers")
            level = [*chain.from_iterable(lists), *chain.from_iterable(map(dict.values, maps))]
            depth += 1

    def _items(self, container: Any) -> Any:
        """msgpack's hook for each list and map of a large payload, as it is built: each byte of
        msgpack can be an object of 50-70 bytes (16 MiB of empty lists was 2.4 GB, built
        before any count was looked at), so past MAX_ITEMS items in all the decode stops."""
        self.items += len(container) + 1  # an empty one is an object too
        if self.items > MAX_ITEMS:
            raise BadRequest(f"payload holds more than {MAX_ITEMS} list and map items; send large data as arrays "
                             "(numpy or torch), which travel as raw frames and are never unpacked item by item")
        return container

    def _count(self, n: int) -> None:
        self.elements += n
        if self.elements > self.limits.max_elements:
            raise BadRequest(f"payload holds more than max_elements={self.limits.max_elements} elements "
                             f"(raise {self.limits.flag('max_elements')})", setting="max_elements")

    def _ext_hook(self, code: int, data: bytes) -> Any:
        if code != EXT_ARRAY:
            raise BadRequest(f"unknown msgpack ext code {code}; only arrays (code {EXT_ARRAY}) are accepted")
        try:
            name, shape, index, origin = msgpack.unpackb(data, raw=False, max_bin_len=0, max_ext_len=0,
                                                         max_str_len=16, max_array_len=64)
        except Exception:
            raise BadRequest("array descriptor is malformed; expected [dtype, shape, index, origin]") from None
        if name not in DTYPES:
            raise BadRequest(f"dtype {name!r} is not allowed; allowed: {', '.join(DTYPES)}")
        if (not isinstance(shape, list) or len(shape) > 32
                or not all(type(d) is int and 0 <= d < 2**62 for d in shape)):
            raise BadRequest(f"array shape {shape!r} is invalid: a list of at most 32 non-negative ints")
        if math.prod(d for d in shape if d) * ITEMSIZE[name] >= 2**62:  # numpy refuses it, a zero dim or not
            raise BadRequest(f"array shape {shape!r} is too large: its non-zero dimensions alone make more "
                             "than 2**62 bytes, which no array can have, even an empty one")
        if type(origin) is not int or origin not in (ORIGIN_NUMPY, ORIGIN_TORCH):
            raise BadRequest(f"array origin {origin!r} is unknown")
        if type(index) is list:
            count = math.prod(shape)
            self._count(count)
            buf = self._shared(index, count * ITEMSIZE[name])
            if not self.build:
                return None
            return _build_array(name, tuple(shape), origin, buf, self.arrays, self.readonly)
        if type(index) is not int or not 0 <= index < len(self.buffers) or self.used[index]:
            raise BadRequest(f"array refers to buffer frame {index!r}, which is missing or already used")
        count = math.prod(shape)
        self._count(count)
        buf = self.buffers[index]
        if count * ITEMSIZE[name] != len(buf):
            raise BadRequest(f"array of shape {tuple(shape)} and dtype {name} needs {count * ITEMSIZE[name]} "
                             f"bytes but its frame holds {len(buf)}")
        self.used[index] = True
        self.single = (name, tuple(shape), origin, count, len(buf))
        return _build_array(name, tuple(shape), origin, buf, self.arrays, self.readonly) if self.build else None


    def _shared(self, ref: list, nbytes: int) -> memoryview | None:
        """The `nbytes` at [offset] in the message's shared memory (checked, never past its end)."""
        seg = self.segment
        if seg is None:
            raise BadRequest("an array names shared memory, but the message has none (header field shm)")
        size = seg if type(seg) is int else len(seg)
        if len(ref) != 1 or type(ref[0]) is not int or not 0 <= ref[0] <= size - nbytes:
            raise BadRequest(f"array names shared memory at {ref!r}, which is not [offset] with its {nbytes} "
                             f"bytes inside the segment's {size}")
        self.room -= nbytes
        if self.room < 0:
            lim = self.limits
            raise BadRequest(f"message is over max_message_bytes={lim.max_message_bytes} with its shared-memory "
                             f"arrays (raise {lim.flag('max_message_bytes')})", setting="max_message_bytes")
        return None if type(seg) is int else seg[ref[0]:ref[0] + nbytes]


def encode(op: str, rid: Any, value: Any = None, **fields: Any) -> list[Frame]:
    """A whole message: [header, payload, *buffers]."""
    return [pack_header(op, rid, **fields), *encode_payload(value)]


def json_default(value: Any) -> Any:
    """json.dumps(default=...) for decoded answers: arrays and tensors as nested lists, bytes as text."""
    tolist = getattr(value, "tolist", None)
    if tolist is not None:
        return tolist()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    raise TypeError(f"a {type(value).__name__} cannot be written as JSON")


def total_bytes(frames: Iterable[Frame]) -> int:
    return sum(len(frame_view(f)) for f in frames)
