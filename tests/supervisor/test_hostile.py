"""Hostile clients against a live supervisor: it never dies, no worker notices, honest work succeeds."""

from __future__ import annotations

import random
import threading

import msgpack
import numpy as np
import pytest
import zmq

from isopool.errors import BadRequest, RemoteError
from isopool.protocol import decode_error, ops, pack_header, unpack_header
from isopool.protocol.codec import EXT_ARRAY
from isopool.protocol import Limits
from isopool.protocol.transport import BUNDLE, bounds, bundle, data, unbundle

HOSTILE = 3000


def ext(name, shape, index, origin=0) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_ARRAY, msgpack.packb([name, shape, index, origin]))


def hostile_message(rng: random.Random, i: int) -> list[bytes]:
    """A message that is certainly invalid, of one of many kinds."""
    kind = i % 12
    if kind == 0:
        return [b"\xc1" + rng.randbytes(rng.randint(0, 64))]  # never valid msgpack
    if kind == 1:
        return [msgpack.packb({"v": rng.choice([0, 2, 99, "1", None]), "op": "infer", "id": i}), b"\xc0"]
    if kind == 2:
        return [msgpack.packb({"v": 1, "op": rng.choice(["exec", "eval", "pickle", "", "RUN"]), "id": i})]
    if kind == 3:  # lying shape
        n = rng.randint(1, 100)
        return [pack_header(ops.INFER, i), msgpack.packb(ext("float32", [n + 1], 0)), b"\0" * (4 * n)]
    if kind == 4:
        return [pack_header(ops.INFER, i), msgpack.packb(ext(rng.choice(["object", "U4", "V8"]), [1], 0)), b"\0" * 8]
    if kind == 5:  # too deep
        return [pack_header(ops.INFER, i), b"\x91" * rng.randint(33, 500) + b"\xc0"]
    if kind == 6:
        return [pack_header(ops.INFER, i), msgpack.packb(msgpack.ExtType(rng.randint(2, 127), b"boom"))]
    if kind == 7:  # truncated payload
        return [pack_header(ops.INFER, i), msgpack.packb(list(range(50)))[: rng.randint(1, 40)]]
    if kind == 8:
        return [pack_header(ops.INFER, i, timeout=rng.choice([-1, 0, "soon", [1]]))] + [b"\xc0"]
    if kind == 9:
        return [pack_header(ops.INFER, i)]  # no payload frame
    if kind == 10:  # huge declared sizes
        return [pack_header(ops.INFER, i), b"\xdd\xff\xff\xff\xff"]
    return [msgpack.packb({"v": 1, "op": "infer", "id": [i]}), b"\xc0"]  # an id of the wrong type


def test_thousands_of_hostile_messages_interleaved_with_honest_requests(start_pool):
    pool = start_pool("--workers", "2")
    before = {w["id"]: w["pid"] for w in pool.workers()}
    honest_ok, honest_failed = [], []

    def honest() -> None:
        with pool.client() as c:
            for i in range(600):
                x = np.full(16, float(i), dtype=np.float32)
                try:
                    y = c.infer(x)
                    honest_ok.append(y.shape == (4,))
                except Exception as exc:  # noqa: BLE001 - recorded, asserted on
                    honest_failed.append(repr(exc))

    rng = random.Random(7)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(pool.endpoint)
    thread = threading.Thread(target=honest)
    thread.start()
    errors = 0
    try:
        for i in range(HOSTILE):
            sock.send_multipart(hostile_message(rng, i))
            if i % 100 == 99:  # answers come back: one per hostile message, each a BadRequest
                for _ in range(100):
                    assert sock.poll(10_000), "a hostile message went unanswered"
                    reply = sock.recv_multipart()
                    assert unpack_header(reply[0])["op"] == ops.ERROR
                    assert isinstance(decode_error(reply[1:]), BadRequest)
                    errors += 1
    finally:
        thread.join(120)
        sock.close()
    assert errors == HOSTILE
    assert honest_failed == [] and len(honest_ok) == 600 and all(honest_ok)
    status = pool.status()
    assert status["pool"]["healthy"] and status["pool"]["outcomes"]["bad_request"] == HOSTILE
    assert {w["id"]: w["pid"] for w in status["workers"]} == before  # no worker disturbed
    assert all(w["errors"] == 0 and w["restarts"] == 0 for w in status["workers"])


def test_an_oversized_request_fails_alone_and_its_client_serves_on(start_pool):
    """The client learns the server's limits (hello) and refuses an oversized request itself:
    once it cost the shared connection, failing every other call on it with Unavailable."""
    pool = start_pool("--workers", "1", "--model", "isopool.examples.faulty:make_echo", "--max-message-bytes", "1MiB")
    with pool.client(timeout=10) as c:
        others = [c.submit({"n": i}) for i in range(20)]
        with pytest.raises(BadRequest, match="max_message_bytes=1048576") as info:
            c.infer(np.zeros(1 << 19, dtype=np.float32))  # 2 MiB
        assert info.value.setting == "max_message_bytes"
        assert [f.result(timeout=30) for f in others] == [{"n": i} for i in range(20)]
        assert c.infer(np.zeros(1000)).shape == (1000,)  # the same connection
    assert pool.status()["pool"]["healthy"]


def test_oversized_messages_from_a_raw_client_are_refused_by_size_of_all_frames(start_pool):
    """max_message_bytes counts every frame of a message. One the supervisor reads is refused
    with BadRequest naming the limit; one past its read bounds (transport.bounds) is read no
    further and let go frame by frame; a single frame past them makes ZeroMQ cut that one
    connection off. Nobody else notices any of it."""
    pool = start_pool("--workers", "1", "--model", "isopool.examples.faulty:make_echo", "--max-message-bytes", "1MiB")
    most, frames = bounds(Limits(max_message_bytes=1 << 20))
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(pool.endpoint)

    def refused(rid: int) -> BadRequest:
        assert raw.poll(30_000), f"message {rid} went unanswered"
        reply = raw.recv_multipart()
        assert unpack_header(reply[0])["id"] == rid and unpack_header(reply[0])["op"] == ops.ERROR
        return decode_error(reply[1:])

    try:
        raw.send_multipart([pack_header(ops.INFER, 1), b"\x00" * (2 << 20)])  # read, then refused
        err = refused(1)
        assert isinstance(err, BadRequest) and err.setting == "max_message_bytes" and "1048576" in str(err)
        piece = b"\x00" * (512 << 10)
        many = most // len(piece) + 2  # every frame small, all of them past the bound
        raw.send_multipart([pack_header(ops.INFER, 2), *[piece] * many])
        err = refused(2)
        assert isinstance(err, BadRequest) and "read no further" in str(err) and str(many + 1) in str(err)
        raw.send_multipart([pack_header(ops.INFER, 3), *[b"x"] * (frames + 5)])  # too many frames
        assert "read no further" in str(refused(3))
        raw.send_multipart([pack_header(ops.INFER, 4), msgpack.packb("still here")])  # the same connection
        assert raw.poll(30_000)
        reply = raw.recv_multipart()
        assert unpack_header(reply[0])["op"] == ops.RESULT and msgpack.unpackb(reply[1]) == "still here"
        with pool.client() as small:
            assert small.infer({"ok": 1}) == {"ok": 1}
            assert small.infer(np.zeros(1000)).shape == (1000,)
        raw.send_multipart([pack_header(ops.INFER, 5), b"\x00" * (most + 1)])  # ZeroMQ drops the connection
        with pool.client() as small:
            assert small.infer({"ok": 2}) == {"ok": 2}
    finally:
        raw.close()
    status = pool.status()
    assert status["pool"]["healthy"] and status["pool"]["outcomes"]["bad_request"] == 3


def test_array_just_over_a_limit_gets_bad_request_naming_it(start_pool):
    pool = start_pool("--workers", "1", "--model", "isopool.examples.faulty:make_echo", "--max-elements", "1000")
    with pool.client() as c:
        with pytest.raises(BadRequest, match="max_elements=1000") as info:
            c.infer(np.zeros(1001))
        assert info.value.setting == "max_elements"
        assert c.infer(np.zeros(999)).shape == (999,)


def test_arrays_reach_the_handler_read_only(start_pool):
    pool = start_pool("--workers", "1", "--model", "isopool.examples.faulty:Faulty")
    with pool.client() as c:
        with pytest.raises(RemoteError, match="read-only"):
            c.infer({"do": "scribble", "a": np.arange(10.0)})
        assert c.infer({"do": "ok", "a": np.arange(3.0)})["echo"]["a"].tolist() == [0.0, 1.0, 2.0]


def test_raw_clients_may_bundle_requests_and_get_bundled_replies_only_when_they_ask(start_pool):
    pool = start_pool("--workers", "1", "--model", "isopool.examples.faulty:make_echo")
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(pool.endpoint)

    def requests(first: int, **fields) -> list[list[bytes]]:
        return [[pack_header(ops.INFER, i, **fields), msgpack.packb({"n": i})] for i in range(first, first + 3)]

    def replies(n: int) -> dict:
        got: dict = {}
        for _ in range(n):
            if len(got) == n:
                break
            assert sock.poll(10_000), "a bundled request went unanswered"
            for message in unbundle([zmq.Frame(f) for f in sock.recv_multipart()]):
                header = unpack_header(data(message[0]))
                got[header["id"]] = (header["op"], msgpack.unpackb(data(message[1])))
        return got

    try:
        sock.send_multipart(bundle(requests(1)))  # a client that never said it reads bundles
        plain = []
        for _ in range(3):
            assert sock.poll(10_000)
            plain.append(sock.recv_multipart())
        assert sorted(unpack_header(m[0])["id"] for m in plain) == [1, 2, 3]  # each a plain message
        assert all(msgpack.unpackb(m[1]) == {"n": unpack_header(m[0])["id"]} for m in plain)

        sock.send_multipart([BUNDLE + msgpack.packb([2, 2]), b"only", b"three", b"frames"])
        assert sock.poll(10_000)
        reply = sock.recv_multipart()
        err = decode_error(reply[1:])
        assert isinstance(err, BadRequest) and "bundle" in str(err)

        sock.send_multipart(bundle(requests(4, bundles=True)))  # this one reads bundles
        assert replies(3) == {i: ("result", {"n": i}) for i in (4, 5, 6)}
    finally:
        sock.close()
    assert pool.status()["pool"]["outcomes"]["bad_request"] == 1
