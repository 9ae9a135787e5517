"""Fuzzing the decoder: whatever arrives, the only possible failure is BadRequest."""

from __future__ import annotations

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isopool.protocol import BadRequest, Limits, decode_payload, encode_payload, unpack_header, validate_payload
from isopool.protocol.codec import DTYPES, EXT_ARRAY

DEFAULT = Limits()
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def strict(frames: list, limits: Limits = DEFAULT) -> None:
    """Decoding either succeeds or raises BadRequest; nothing else may escape."""
    for fn in (validate_payload, decode_payload):
        try:
            fn(frames, limits=limits)
        except BadRequest:
            pass


@FUZZ
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=4))
def test_random_bytes(frames):
    strict(frames)


@FUZZ
@given(st.binary(max_size=300))
def test_random_headers(data):
    try:
        unpack_header(data)
    except BadRequest:
        pass


@FUZZ
@given(st.data())
def test_truncated_frames(data):
    value = {"a": np.arange(data.draw(st.integers(0, 50)), dtype=np.float32), "b": [1, "x", None]}
    frames = [bytes(f) for f in encode_payload(value)]
    i = data.draw(st.integers(0, len(frames) - 1))
    frames[i] = frames[i][: data.draw(st.integers(0, max(0, len(frames[i]) - 1)))]
    strict(frames)


@FUZZ
@given(code=st.integers(-128, 127), meta=st.binary(max_size=40), bufs=st.lists(st.binary(max_size=64), max_size=3))
def test_wrong_ext_codes_and_garbage_descriptors(code, meta, bufs):
    # ext 8 on the wire: 0xc7, length, signed type code, data (msgpack's ExtType forbids code < 0)
    raw = b"\xc7" + bytes([len(meta)]) + code.to_bytes(1, "big", signed=True) + meta
    strict([raw, *bufs])


def test_msgpack_timestamps_are_refused():
    ts = b"\xd6\xff" + (0).to_bytes(4, "big")  # fixext 4, type -1: a msgpack Timestamp
    for fn in (validate_payload, decode_payload):
        try:
            fn([b"\x91" + ts])  # a one-element array holding it
        except BadRequest as err:
            assert "Timestamp" in str(err)
        else:
            raise AssertionError("a Timestamp was accepted")


@FUZZ
@given(name=st.sampled_from([*DTYPES, "object", "float128", "", "U8"]),
       shape=st.lists(st.integers(-5, 2**64 - 1), max_size=6),
       index=st.integers(-3, 5), origin=st.integers(-1, 3), buflen=st.integers(0, 4096))
def test_lying_shapes_and_huge_declared_sizes(name, shape, index, origin, buflen):
    meta = msgpack.packb([name, shape, index, origin])
    strict([msgpack.packb([msgpack.ExtType(EXT_ARRAY, meta)]), b"\0" * buflen])


@FUZZ
@given(depth=st.integers(1, 3000), kind=st.sampled_from(["list", "map"]))
def test_deep_nesting(depth, kind):
    payload = b"\x91" * depth + b"\xc0" if kind == "list" else b"\x81\xa1k" * depth + b"\xc0"
    strict([payload], Limits(max_depth=32))


@FUZZ
@given(n=st.integers(0, 2**32 - 1))
def test_huge_declared_container_lengths(n):
    # array32/map32/bin32/str32 headers that claim n items or bytes that are not there
    for prefix in (b"\xdd", b"\xdf", b"\xc6", b"\xdb"):
        strict([prefix + n.to_bytes(4, "big")])
