"""The supervisor under real load and real faults: crash basics, bad frames, clean stop."""

from __future__ import annotations

import signal
import threading

import msgpack
import pytest
import zmq

from isopool.errors import BadRequest, Overloaded, RequestTimeout, WorkerCrashed
from isopool.protocol import decode_error, encode, ops, pack_header, unpack_header
from tests.helpers import wait_gone


def test_os_exit_is_a_worker_crash_and_the_pool_heals(faulty):
    with faulty.client() as c:
        before = {w["id"]: w["pid"] for w in faulty.workers()}
        stop = threading.Event()
        served: list[int] = []

        def others() -> None:  # requests on other workers succeed meanwhile
            while not stop.is_set() and len(served) < 2000:
                served.append(c.infer({"do": "ok"})["pid"])

        bg = threading.Thread(target=others)
        bg.start()
        with pytest.raises(WorkerCrashed) as info:
            c.infer({"do": "exit", "code": 3}, retry=False)
        ready = faulty.wait_event("ready", generation=2)
        stop.set()
        bg.join(30)
    err = info.value
    assert err.exit_code == 3 and "exit code 3" in str(err)
    assert err.attempts[0]["exit_code"] == 3
    assert served, "the other worker served meanwhile"
    workers = {w["id"]: w for w in faulty.all_ready()["workers"]}
    crashed = ready["worker"]
    assert workers[crashed]["pid"] != before[crashed] and workers[crashed]["restarts"] == 1
    assert workers[crashed]["last_exit"]["exit_code"] == 3
    other = 1 - crashed
    assert workers[other]["pid"] == before[other] and workers[other]["restarts"] == 0


def raw_dealer(endpoint: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(endpoint)
    return sock


def test_malformed_frames_get_clear_errors_and_the_supervisor_keeps_serving(pool):
    sock = raw_dealer(pool.endpoint)
    cases = [
        ([b"\xc1garbage"], "not valid msgpack"),
        ([msgpack.packb({"v": 99, "op": "infer", "id": 1}), msgpack.packb(None)], "version"),
        ([msgpack.packb({"v": 1, "op": "exec", "id": 2}), msgpack.packb(None)], "unknown op"),
        ([pack_header(ops.INFER, 3), msgpack.packb(msgpack.ExtType(1, msgpack.packb(["float32", [16], 0, 0]))),
          b"\0" * 8], "needs 64 bytes"),
        ([pack_header(ops.INFER, 4)], "no payload"),
        ([pack_header(ops.RUN, 5), msgpack.packb(None)], "not a client op"),
        ([pack_header(ops.INFER, 6, timeout=-1), msgpack.packb(None)], "timeout"),
    ]
    try:
        for frames, match in cases:
            sock.send_multipart(frames)
            reply = sock.recv_multipart()
            header = unpack_header(reply[0])
            assert header["op"] == ops.ERROR
            err = decode_error(reply[1:])
            assert isinstance(err, BadRequest) and match in str(err), (match, err)
        sock.send_multipart(encode(ops.INFER, 99, [0.5] * 16))
        reply = sock.recv_multipart()
        assert unpack_header(reply[0])["op"] == ops.RESULT
    finally:
        sock.close()
    status = pool.status()["pool"]
    assert status["healthy"] and status["outcomes"]["bad_request"] == len(cases)
    assert all(w["restarts"] == 0 for w in pool.workers())


def test_sigterm_exits_zero_and_leaves_no_worker(pool):
    pids = pool.worker_pids()
    assert len(pids) == 2
    assert pool.terminate() == 0
    assert wait_gone(pids, 10) == []


def test_sigint_stops_like_sigterm(pool):
    pids = pool.worker_pids()
    pool.proc.send_signal(signal.SIGINT)
    assert pool.proc.wait(30) == 0
    assert wait_gone(pids, 10) == []


def test_full_queue_refuses_at_once_with_overloaded_and_counts_it_once(start_pool, tmp_path):
    pool = start_pool("--workers", "1", "--model", "isopool.examples.faulty:Faulty", "--prefetch", "1",
                      "--max-queue", "2")
    gate = tmp_path / "gate"
    with pool.client() as c:
        running = c.submit({"do": "wait", "path": str(gate), "s": 30})  # holds the worker until the gate opens
        queued = [c.submit({"do": "ok", "i": i}) for i in range(2)]
        pool_now = c.status()["pool"]  # same connection: all three were accepted before this
        assert pool_now["in_flight"] == 1 and pool_now["queue_depth"] == 2
        with pytest.raises(Overloaded, match="--max-queue 2") as info:
            c.infer({"do": "ok", "i": 99})
        assert info.value.max_queue == 2
        gate.touch()
        assert running.result(timeout=30)["echo"]["do"] == "wait"
        assert [f.result(timeout=30)["echo"]["i"] for f in queued] == [0, 1]
    outcomes = pool.status()["pool"]["outcomes"]
    assert outcomes == {"ok": 3, "overloaded": 1}


def test_a_live_deadline_survives_thousands_of_answered_requests(start_pool):
    """Answered requests' deadline entries are dropped in bulk (the heap is rebuilt from the
    live requests); a request still running meanwhile must keep its deadline."""
    pool = start_pool("--workers", "2", "--model", "isopool.examples.faulty:Faulty", "--prefetch", "1")
    with pool.client() as c:
        hung = c.submit({"do": "hang"}, timeout=8.0)
        in_flight = [c.submit({"do": "ok", "i": i}) for i in range(64)]
        answered = 0
        for i in range(64, 6000):  # over COMPACT_ABOVE answered while `hung` runs
            assert in_flight.pop(0).result(timeout=30)["echo"]["do"] == "ok"
            answered += 1
            in_flight.append(c.submit({"do": "ok", "i": i}))
        answered += sum(f.result(timeout=30)["echo"]["do"] == "ok" for f in in_flight)
        with pytest.raises(RequestTimeout) as info:
            hung.result(timeout=30)
    assert answered == 6000
    assert info.value.started is True  # the supervisor's deadline fired, not the client's backstop
