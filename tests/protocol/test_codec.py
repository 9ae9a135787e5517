"""The codec: round trips of every allowed dtype and shape, and strict refusal of bad input."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from isopool.protocol import (
    DTYPES,
    BadRequest,
    Limits,
    decode_payload,
    encode,
    encode_payload,
    ops,
    pack_header,
    unpack_header,
    validate_payload,
)
from isopool.protocol import schemas
from isopool.protocol.codec import EXT_ARRAY
from isopool.protocol.limits import DEFAULT_LIMITS
from isopool.protocol.transport import messages

NUMPY_DTYPES = [d for d in DTYPES.values() if d is not None]


def arrays_of(dtype: np.dtype):
    """Arrays of `dtype` including 0-d, empty, and non-contiguous (strided / transposed) ones."""
    base = hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
    return st.one_of(
        base,
        base.filter(lambda a: a.ndim >= 1).map(lambda a: a[::2]),
        base.filter(lambda a: a.ndim >= 2).map(lambda a: a.T),
    )


any_array = st.sampled_from(NUMPY_DTYPES).flatmap(arrays_of)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False),
                    st.text(max_size=20), st.binary(max_size=20))
payloads = st.recursive(scalars | any_array,
                        lambda children: st.lists(children, max_size=4)
                        | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=12)


def assert_same(a, b) -> None:
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    else:
        assert a == b and type(a) is type(b)


@settings(max_examples=300, deadline=None)
@given(payloads)
def test_round_trip_nested_payloads(value):
    frames = encode_payload(value)
    validate_payload(frames)
    assert_same(value, decode_payload(frames))


@settings(max_examples=100, deadline=None)
@given(any_array)
def test_arrays_arrive_read_only_and_zero_copy(arr):
    frames = encode_payload(arr)
    out = decode_payload([bytes(f) for f in frames])
    assert not out.flags.writeable
    with pytest.raises(ValueError):
        out.flags.writeable = True


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool,
                                   torch.uint8, torch.complex64])
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 3, 4)])
def test_torch_round_trip_preserves_type(dtype, shape):
    t = (torch.rand(shape) * 10).to(dtype)
    nc = t.transpose(0, -1) if t.dim() >= 2 else t
    out = decode_payload(encode_payload({"t": t, "nc": nc}))
    assert isinstance(out["t"], torch.Tensor) and out["t"].dtype == dtype and out["t"].shape == t.shape
    assert torch.equal(out["t"], t)
    assert torch.equal(out["nc"], nc)


def test_receiver_chooses_the_array_type():
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    as_torch = decode_payload(encode_payload(arr), arrays="torch")
    assert isinstance(as_torch, torch.Tensor) and as_torch.tolist() == arr.tolist()
    as_numpy = decode_payload(encode_payload(torch.from_numpy(arr.copy())), arrays="numpy")
    assert isinstance(as_numpy, np.ndarray) and as_numpy.tolist() == arr.tolist()


def test_large_buffers_travel_as_their_own_frames_without_copy():
    arr = np.ones(1 << 20, dtype=np.float32)
    payload, buf = encode_payload(arr)
    assert len(payload) < 64
    assert np.shares_memory(np.frombuffer(buf, dtype=np.uint8), arr)  # a view, not a copy


def test_non_native_byte_order_is_normalised():
    arr = np.arange(5, dtype=">i4")
    out = decode_payload(encode_payload(arr))
    assert out.dtype == np.dtype("int32") and out.tolist() == [0, 1, 2, 3, 4]


def test_unsendable_values_are_refused_at_encode():
    with pytest.raises(TypeError, match="cannot send"):
        encode_payload({"f": object()})
    with pytest.raises(TypeError, match="not allowed"):
        encode_payload(np.array(["a", "b"], dtype=object))


# ------------------------------------------------------------------ strict decoding

def ext(name, shape, index, origin=0):
    return msgpack.ExtType(EXT_ARRAY, msgpack.packb([name, shape, index, origin]))


@pytest.mark.parametrize("frames, match", [
    ([msgpack.packb(ext("float32", [4], 0)), b"\0" * 8], "needs 16 bytes"),
    ([msgpack.packb(ext("float32", [4], 0)), b"\0" * 20], "needs 16 bytes"),
    ([msgpack.packb(ext("object", [1], 0)), b"\0" * 8], "not allowed"),
    ([msgpack.packb(ext("float32", [1], 3)), b"\0" * 4], "missing"),
    ([msgpack.packb([ext("uint8", [1], 0), ext("uint8", [1], 0)]), b"\0"], "already used"),
    ([msgpack.packb(ext("uint8", [-1], 0)), b""], "shape"),
    ([msgpack.packb(ext("uint8", [2**40, 2**40], 0)), b""], "max_elements|needs|too large"),
    ([msgpack.packb(msgpack.ExtType(9, b"x"))], "ext code 9"),
    ([msgpack.packb(msgpack.ExtType(EXT_ARRAY, b"\xc1"))], "malformed"),
    ([msgpack.packb(1), b"extra"], "not referenced"),
    ([b"\xc1"], "not valid msgpack"),
    ([msgpack.packb([1, 2, 3])[:-1]], "not valid msgpack"),
    ([b"\x91" * 5000 + b"\xc0"], "nests lists or maps deeper than the decoder's stack allows"),
    ([msgpack.packb(ext("float32", [0, 2**62 - 1, 2**62 - 1], 0)), b""], "too large: its non-zero dimensions"),
    ([], "no payload"),
])
def test_bad_payloads_are_refused(frames, match):
    with pytest.raises(BadRequest, match=match):
        validate_payload(frames)
    with pytest.raises(BadRequest, match=match):
        decode_payload(frames)


def test_depth_and_size_limits_name_their_setting():
    deep = []
    for _ in range(40):
        deep = [deep]
    with pytest.raises(BadRequest, match="max_depth=32") as info:
        validate_payload(encode_payload(deep))
    assert info.value.setting == "max_depth"
    with pytest.raises(BadRequest, match="max-message-bytes") as info:
        validate_payload(encode_payload(np.zeros(100)), Limits(max_message_bytes=100))
    assert info.value.setting == "max_message_bytes"
    with pytest.raises(BadRequest, match="max_elements"):
        validate_payload(encode_payload(list(range(100))), Limits(max_elements=50))


def test_headers_are_checked():
    assert unpack_header(pack_header(ops.INFER, 7, timeout=1.0))["timeout"] == 1.0
    with pytest.raises(BadRequest, match="version"):
        unpack_header(msgpack.packb({"v": 99, "op": "infer", "id": 1}))
    with pytest.raises(BadRequest, match="unknown op"):
        unpack_header(msgpack.packb({"v": 1, "op": "exec", "id": 1}))
    with pytest.raises(BadRequest, match="map"):
        unpack_header(msgpack.packb([1, 2]))
    with pytest.raises(BadRequest, match="max_header_bytes"):
        unpack_header(b"\0" * 70000)
    with pytest.raises(BadRequest, match="stack allows"):
        unpack_header(b"\x91" * 5000 + b"\xc0")


@pytest.mark.parametrize("fields", [
    {"timeout": "soon", "tenant": ["a", "b"]},  # a list beside the field that fails
    {"timeout": -1, "shm": [1, 2, 3, 4, 5, 6]},
    {"timeout": -1, "note": "x" * 5000},  # a long string
    {"v": 2, "extra": [1]},  # another version, with a list
])
def test_a_refused_message_keeps_its_id_whatever_else_its_header_holds(fields):
    """A refusal is routed to its request by the id: a header that fails a check but decodes
    gives its id, lists and long strings beside it or not (a hostile pass found them hiding it)."""
    header = msgpack.packb({"v": 1, "op": ops.INFER, "id": 7, **fields})
    [(rid, body, error)] = messages([header, msgpack.packb(1)], DEFAULT_LIMITS, side=schemas.CLIENT)
    assert rid == 7 and body is None and isinstance(error, BadRequest), error


def test_whole_message_layout():
    frames = encode(ops.RESULT, 5, {"a": np.arange(3)})
    header = unpack_header(frames[0])
    assert header["op"] == "result" and header["id"] == 5
    assert decode_payload(frames[1:])["a"].tolist() == [0, 1, 2]


# ------------------------------------------------------------------ one array, the common payload

def test_a_payload_seen_before_is_still_checked_against_its_buffer_and_limits():
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    payload, buf = encode_payload(arr)
    decode_payload([payload, buf])  # now remembered as checked
    validate_payload([payload, buf])
    for frames, match in [([payload, bytes(buf)[:-4]], "needs 48 bytes"),
                          ([payload, bytes(buf) + b"\0"], "needs 48 bytes"),
                          ([payload], "missing"),
                          ([payload, buf, b"x"], "not referenced")]:
        with pytest.raises(BadRequest, match=match):
            validate_payload(frames)
        with pytest.raises(BadRequest, match=match):
            decode_payload(frames)
    with pytest.raises(BadRequest, match="max_elements"):
        decode_payload([payload, buf], limits=Limits(max_elements=11))
    with pytest.raises(BadRequest, match="max_message_bytes"):
        validate_payload([payload, buf], Limits(max_message_bytes=48))


@pytest.mark.parametrize("value", [
    np.arange(6, dtype=np.int16).reshape(2, 3),
    np.arange(6, dtype=np.int16).reshape(2, 3).T,  # not contiguous: the general path
    np.arange(6, dtype=">i2"),  # not native: the general path
    np.zeros((0, 3), dtype=np.uint8),
    np.array(2.5),
    torch.arange(6.0).reshape(2, 3),
    torch.arange(6.0).reshape(2, 3).t(),
    torch.ones(3, requires_grad=True),
    torch.ones(2, dtype=torch.bfloat16),
])
def test_single_arrays_round_trip_the_same_through_either_path(value):
    for _ in range(2):  # first the full decode, then the remembered payload
        out = decode_payload(encode_payload(value))
        assert type(out) is type(value) and tuple(out.shape) == tuple(value.shape)
        if isinstance(value, torch.Tensor):
            assert out.dtype == value.dtype and torch.equal(out, value.detach())
        else:
            assert out.dtype == value.dtype.newbyteorder("=")
            np.testing.assert_array_equal(out, value)
            assert not out.flags.writeable


def test_a_payload_of_many_small_containers_is_refused_as_it_is_built():
    """Each byte of msgpack can become a Python object of 50-70 bytes: 16 MiB of empty lists
    made the supervisor build 2.4 GB of them (and spend 34 s) before any count was looked at.
    A large payload's lists and maps are counted as msgpack builds them, and past MAX_ITEMS
    the decode stops."""
    import tracemalloc

    from isopool.protocol.codec import MAX_ITEMS, validate_payload
    from isopool.protocol.transport import INDEX_ITEMS, unbundle

    inner = b"\xdd" + (1 << 20).to_bytes(4, "big") + b"\x90" * (1 << 20)  # 2**20 empty lists
    tracemalloc.start()
    try:
        with pytest.raises(BadRequest, match=f"more than {MAX_ITEMS} list and map items"):
            validate_payload([b"\xdc" + (2).to_bytes(2, "big") + inner * 2])
        peak = tracemalloc.get_traced_memory()[1]
        # and a bundle index of nested lists, as large as an honest one may be
        index = b"\xc1\xdc" + (64).to_bytes(2, "big") + (b"\xdc" + (4098).to_bytes(2, "big") + b"\x90" * 4098) * 64
        with pytest.raises(ValueError, match=f"more than {INDEX_ITEMS} items"):
            unbundle([index])
    finally:
        tracemalloc.stop()
    assert peak < 256 << 20, peak >> 20  # was ~2.4 GB for 16 MiB of them
    assert validate_payload([msgpack.packb({"a": list(range(100_000)), "b": ["s"] * 100_000})]) is None  # fine
    blob = {"image": b"\xff" * (3 << 20), "text": "t" * (2 << 20)}  # a long str or bin is one item: fine too
    assert decode_payload([msgpack.packb(blob)]) == blob


def test_decoding_is_strict_about_types_python_calls_equal():
    """true and 1.0 equal 1 in Python, so `v: true`, `v: 1.0` and an array's origin `true`
    or `0.0` passed as version 1 and origin numpy or torch, and a request's map could have
    float or nil keys, which docs/protocol.md does not allow (a hostile pass found them)."""
    from isopool.protocol import unpack_header
    from isopool.protocol.codec import validate_payload

    for v in (True, 1.0):
        with pytest.raises(BadRequest, match="protocol version"):
            unpack_header(msgpack.packb({"v": v, "op": "infer", "id": 1}))
    assert unpack_header(msgpack.packb({"v": 1, "op": "infer", "id": 1}))["op"] == "infer"
    for origin in (True, 0.0):
        ext = msgpack.ExtType(EXT_ARRAY, msgpack.packb(["float32", [2], 0, origin]))
        with pytest.raises(BadRequest, match="origin"):
            validate_payload([msgpack.packb(ext), b"\0" * 8])
    for key in (1.5, None, True):
        with pytest.raises(BadRequest, match="map key"):
            validate_payload([msgpack.packb({key: 1}, strict_types=False)])
    assert validate_payload([msgpack.packb({"a": {1: [2.5, None]}})]) is None
