"""Messages that once killed the supervisor, sent to a live one: each is refused with a
BadRequest naming the field, or its sender replaced, and the pool serves on."""

from __future__ import annotations

import random

import msgpack
import pytest
import zmq

from isopool.errors import BadRequest, WorkerCrashed
from isopool.protocol import decode_error, ops, unpack_header

FAULTY = "isopool.examples.faulty:Faulty"

KILLERS = [  # (header, the field the refusal names)
    ({"v": 1, "op": "infer"}, "id"),
    ({"v": 1, "op": "infer", "id": [1, 2]}, "id"),
    ({"v": 1, "op": "infer", "id": {"a": 1}}, "id"),
    ({"v": 1, "op": ["infer"], "id": 1}, None),
    ({"v": 1, "op": {"x": 1}, "id": 1}, None),
    ({"v": 1, "op": "control", "id": 2, "action": "scale", "args": [1]}, "args"),
    ({"v": 1, "op": "control", "id": 3, "action": ["scale"]}, "action"),
    ({"v": 1, "op": "cancel", "id": {"x": [1]}}, "id"),
    ({"v": 1, "op": "infer", "id": 4, "timeout": float("nan")}, "timeout"),
    ({"v": 1, "op": "infer", "id": 5, "timeout": float("inf")}, "timeout"),
    ({"v": 1, "op": "infer", "id": 6, "retry": "yes"}, "retry"),
    ({"v": 1, "op": "status"}, "id"),
    ({"v": 1, "op": "result", "id": 7}, "op"),
    ({"v": 1, "op": "infer", "id": 8, "shm": 5}, "shm"),
]


@pytest.fixture
def raw(start_pool):
    pool = start_pool("--workers", "1", "--model", FAULTY)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(pool.endpoint)
    yield pool, sock
    sock.close()


def test_each_message_that_once_killed_the_supervisor_gets_a_bad_request(raw):
    pool, sock = raw
    pid = pool.pid
    for header, field in KILLERS:
        sock.send_multipart([msgpack.packb(header), msgpack.packb(None)])
        assert sock.poll(10_000), f"no answer to {header}"
        reply = sock.recv_multipart()
        assert unpack_header(reply[0])["op"] == ops.ERROR
        err = decode_error(reply[1:])
        assert isinstance(err, BadRequest), (header, err)
        if field is not None:
            assert err.details.get("field") == field and repr(field) in str(err), (header, str(err))
        with pool.client() as c:  # and the pool serves on
            assert c.infer({"do": "ok"})["echo"] == {"do": "ok"}
    assert pool.pid == pid and pool.status()["pool"]["healthy"]


def test_random_headers_in_thousands_with_honest_requests_between(raw):
    """Any op, any field, any odd value: every message is answered or accepted; none kills."""
    pool, sock = raw
    rng = random.Random(16)
    odd = [None, True, 0, -1, 2**64 - 1, -2**63, 1.5, float("nan"), float("inf"), "", "x" * 300, b"\x00" * 300,
           [1, [2]], {"a": {"b": 1}}, [b"c", 1], {"workers": 10**9}]
    fields = ["id", "op", "timeout", "retry", "stream", "tenant", "action", "args", "attempt", "bundles", "shm",
              "model", "zzz"]
    op_choices = [*sorted(ops.ALL_OPS), "exec", None, 7, ["infer"]]
    sent = replies = cancels = 0
    with pool.client() as honest:
        for i in range(3000):
            header = {"v": 1, "op": rng.choice(op_choices), "id": 10_000 + i}
            for name in rng.sample(fields, rng.randint(0, 4)):
                header[name] = rng.choice(odd)
            if header.get("action") is not None and header.get("op") == "control":
                header["action"] = "reload"  # never stop the pool under test
            sock.send_multipart([msgpack.packb(header), msgpack.packb({"do": "ok"})])
            sent += 1
            cancels += header.get("op") == "cancel"  # a cancel of nothing has nothing to say
            if i % 200 == 199:
                assert honest.infer({"do": "ok", "i": i})["echo"]["i"] == i
                while sock.poll(0):  # read as it goes: a client that never reads is stalled (test_clients.py)
                    sock.recv_multipart()
                    replies += 1
    while sock.poll(3000):  # everything answered (errors at once; accepted ones when done)
        sock.recv_multipart()
        replies += 1
    assert sent - cancels <= replies <= sent
    status = pool.status()
    assert status["pool"]["healthy"] and status["pool"]["phase"] == "serving"
    assert status["pool"]["outcomes"].get("internal_error", 0) == 0


def test_a_worker_that_forges_an_unusable_reply_is_replaced(start_pool):
    """A compromised handler sends, on its worker's socket, a RESULT whose id is a nested list:
    the worker is killed and replaced, the request blamed, the pool serves on."""
    pool = start_pool("--workers", "1", "--model", FAULTY, "--kill-grace", "1")
    victim = pool.workers()[0]["pid"]
    with pool.client() as c:
        with pytest.raises(WorkerCrashed, match="broke the protocol"):
            c.infer({"do": "forge"}, retry=False, timeout=30)
        assert c.infer({"do": "ok"})["pid"] != victim
    status = pool.status()
    assert status["pool"]["restarts_by_reason"].get("protocol") == 1 and status["pool"]["healthy"]
