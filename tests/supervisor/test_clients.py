"""Clients that misbehave: one that never reads its replies, one that goes away with work
queued, one that floods the queue. Each is bounded; the others are served."""

from __future__ import annotations

import time

import msgpack
import psutil
import zmq

from isopool.errors import Overloaded
from isopool.protocol import ops, pack_header
from isopool.protocol.transport import data, unbundle

FAULTY = "isopool.examples.faulty:Faulty"
ECHO = "isopool.examples.faulty:make_echo"


def raw_client(endpoint: str, rcvhwm: int = 1000) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, rcvhwm)
    sock.connect(endpoint)
    return sock


def test_a_client_that_never_reads_cannot_grow_the_supervisor(start_pool):
    pool = start_pool("--workers", "2", "--model", ECHO)
    sup = psutil.Process(pool.pid)
    rss_before = sup.memory_info().rss
    greedy = raw_client(pool.endpoint, rcvhwm=4)  # reads nothing, and its own pipe is small
    blob = b"x" * (64 << 10)
    try:
        with pool.client() as honest:
            for i in range(10_000):  # 10,000 replies of 64 KiB asked for, none read
                greedy.send_multipart([pack_header(ops.INFER, i), msgpack.packb(blob)])
                if i % 1000 == 999:
                    assert honest.infer({"i": i}) == {"i": i}  # others are served meanwhile
            status = pool.wait_until(lambda s: s["pool"]["clients_stalled"] == 1, "client_stalled", timeout=60)
            rss_growth = sup.memory_info().rss - rss_before
            assert honest.infer({"after": 1}) == {"after": 1}
    finally:
        greedy.close()
    pool_status = status["pool"]
    assert pool_status["outcomes"].get("overloaded", 0) > 0  # its new requests were refused
    # events name it by an alias, never by its routing id: libzmq's own names are 0x00 and a
    # counter (5 bytes), and the next one, once known, could be taken first: libzmq then aborts
    stalled = pool.saw("client_stalled") or [pool.wait_event("client_stalled", timeout=5)]
    assert len(stalled[0]["client"]) == 16 and not stalled[0]["client"].startswith("00"), stalled
    assert rss_growth < 400 << 20, rss_growth >> 20  # was ~600 MiB for these 10,000 replies
    # and its log: a line for each of the first 10 replies dropped, then one in a thousand
    # (it was a line per reply: a client could fill a disk at its sending rate)
    assert pool.output().count("was dropped") <= 10 + pool.status()["pool"]["replies_dropped"] // 1000
    print({"supervisor_rss_growth_mib": rss_growth >> 20, "replies_waiting": pool_status["replies_waiting"],
           "replies_dropped": pool_status["replies_dropped"], "overloaded": pool_status["outcomes"]["overloaded"]})


def test_a_client_that_goes_away_leaves_no_work_behind(start_pool, tmp_path):
    pool = start_pool("--workers", "1", "--model", FAULTY, "--prefetch", "1")
    gate = tmp_path / "gate"
    gone = raw_client(pool.endpoint)
    # the first runs until the gate opens: the other 999 are still queued when the client leaves
    gone.send_multipart([pack_header(ops.INFER, 0), msgpack.packb({"do": "wait", "path": str(gate), "s": 30})])
    for i in range(1, 1000):
        gone.send_multipart([pack_header(ops.INFER, i), msgpack.packb({"do": "sleep", "s": 0.05})])
    gone.send_multipart([pack_header(ops.STATUS, "st"), msgpack.packb(None)])  # read after all 1,000, in order
    for _ in range(1001):
        assert gone.poll(30_000), "no status answer"
        if msgpack.unpackb(gone.recv_multipart()[0]).get("id") == "st":
            break
    with pool.client() as c:  # all 1,000 were accepted before it leaves
        gone.close()
        # the first answer finds its client gone (the supervisor learns it on a reply): the
        # rest are dropped, not run. Only what starts before ZeroMQ reports the peer gone runs
        gate.touch()
        t0 = time.monotonic()
        assert c.infer({"do": "ok"}, timeout=30)["echo"] == {"do": "ok"}
        waited = time.monotonic() - t0
        status = c.status()
    assert status["pool"]["outcomes"].get("client_gone", 0) >= 990  # dropped, not run
    assert sum(w["requests"] for w in status["workers"]) <= 12
    print({"next_client_waited_s": round(waited, 3), "dropped": status["pool"]["outcomes"]["client_gone"]})


def test_one_client_cannot_take_the_whole_queue(start_pool, tmp_path):
    pool = start_pool("--workers", "1", "--model", FAULTY, "--prefetch", "1", "--max-queue", "16")
    gate = tmp_path / "gate"
    with pool.client() as hog, pool.client() as other:
        running = hog.submit({"do": "wait", "path": str(gate), "s": 30})  # holds the worker until the gate opens
        assert hog.status()["pool"]["in_flight"] == 1  # same connection: read after the submit
        futures = [hog.submit({"do": "ok", "i": i}) for i in range(20)]
        assert hog.status()["pool"]["queue_depth"] == 14  # 16 - 16 // 8: its share; the rest refused
        gate.touch()
        fine = [other.submit({"do": "ok", "other": j}) for j in range(2)]  # the kept eighth
        assert [f.result(timeout=30)["echo"]["other"] for f in fine] == [0, 1]
        assert running.result(timeout=30)["echo"]["do"] == "wait"
        outcomes = []
        for f in futures:
            try:
                outcomes.append(f.result(timeout=30)["echo"]["i"])
            except Overloaded as exc:
                assert "its share" in str(exc)
                outcomes.append("refused")
        assert outcomes == [*range(14), *["refused"] * 6]


def routing_ids(endpoint: str, make) -> list[bytes]:
    """The routing ids a ROUTER bound at `endpoint` sees for two connections made by `make`."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)
    seen, made = [], []
    try:
        for _ in range(2):
            made.append(make())
            assert router.poll(10_000), "the client sent nothing within 10 s"
            seen.append(router.recv_multipart()[0])
    finally:
        for m in made:
            m.close()
        router.close()
        ctx.term()
    return seen


def test_isopool_clients_name_themselves_at_random(tmp_path):
    """The supervisor routes answers by a connection's routing id. libzmq's own names are a
    counter (0x00 and 4 bytes, one up per connection): another client could tell a departed
    client's name, connect under it and be sent its answers. isopool's clients name each of
    their connections with 16 random bytes (client/connection.py: configure_socket, which
    every client socket goes through); no name is 0x00 and a counter."""
    from isopool import Client

    ids = routing_ids(f"ipc://{tmp_path}/r.sock", lambda: Client(f"ipc://{tmp_path}/r.sock", timeout=5))
    ids += routing_ids(f"ipc://{tmp_path}/s.sock", lambda: Client(f"ipc://{tmp_path}/s.sock", timeout=5))
    assert all(len(i) == 16 and i[0] != 0 for i in ids), ids
    assert len(set(ids)) == 4
    assert len({i[1:5] for i in ids}) == 4  # no shared counter either


SEEDED = """
import sys, zmq
from isopool.supervisor.sockets import unpredictable_routing_ids
if sys.argv[2] == "seeded":
    unpredictable_routing_ids()
ctx = zmq.Context()
router = ctx.socket(zmq.ROUTER)
router.bind(sys.argv[1])
dealer = ctx.socket(zmq.DEALER)
dealer.connect(sys.argv[1])
dealer.send(b"hello")
assert router.poll(10_000)
print(router.recv_multipart()[0].hex())
dealer.close(linger=0)
router.close(linger=0)
"""


def test_the_supervisors_names_for_plain_clients_differ_from_run_to_run(tmp_path):
    """A plain ZeroMQ client (no name of its own) is named by the ROUTER from a counter that
    starts at the C library's rand(), which libzmq never seeds: the same first name in every
    process, so a client could connect under the next one and libzmq would abort the
    supervisor when it gave that name again (it does not check its own names). The supervisor
    seeds rand() from the kernel before it binds its frontend."""
    import subprocess
    import sys

    def first_name(how: str, n: int) -> str:
        out = subprocess.run([sys.executable, "-c", SEEDED, f"ipc://{tmp_path}/{how}{n}.sock", how],
                             capture_output=True, text=True, timeout=60, check=True)
        return out.stdout.strip()

    plain = {first_name("plain", n) for n in range(2)}
    seeded = {first_name("seeded", n) for n in range(3)}
    assert len(plain) == 1  # the precondition: unseeded, every process names its first client alike
    assert len(seeded) == 3 and not seeded & plain


def test_a_client_that_pauses_reading_is_sent_every_answer(start_pool):
    """A burst the client's queue share takes (3,000 of 3,584), and a reader that pauses
    until all of it is done: more replies wait than the 1,024 the supervisor once held before
    dropping the oldest in silence (56 of 3,000 lost, and 696 with a smaller receive buffer,
    by a hostile pass). Small replies are held now, so every request gets its answer, once.
    (Those read after the client is known to be stalled, which on a loaded machine may be
    some, as a client is read 64 messages ahead, are answered Overloaded: once too.)"""
    pool = start_pool("--workers", "2", "--model", ECHO)
    n = 3000
    slow = raw_client(pool.endpoint, rcvhwm=4)
    try:
        for i in range(n):
            slow.send_multipart([pack_header(ops.INFER, i), msgpack.packb({"i": i, "pad": b"x" * 1024})])
        most, end = 0, time.monotonic() + 120
        for _ in range(50_000):  # bounded: status round trips until all of it is done
            status = pool.status()["pool"]
            most = max(most, status["replies_waiting"])
            if sum(status["outcomes"].values()) >= n or time.monotonic() > end:
                break
        assert set(status["outcomes"]) <= {"ok", "overloaded"} and sum(status["outcomes"].values()) == n, status
        answers: dict = {}
        for _ in range(n):
            assert slow.poll(30_000), f"only {len(answers)} of {n} answers came"
            frames = slow.recv_multipart()
            header = msgpack.unpackb(frames[0])
            assert header["op"] == ops.RESULT or msgpack.unpackb(frames[1])["type"] == "Overloaded", frames
            answers[header["id"]] = answers.get(header["id"], 0) + 1
    finally:
        slow.close()
    assert answers == dict.fromkeys(range(n), 1)
    assert most > 1024, most  # more waited than the old bound, and none was dropped
    assert pool.status()["pool"]["replies_dropped"] == 0
    print({"most_replies_waiting": most})


def test_a_stream_faster_than_its_reader_is_cut_with_an_error_and_no_gap(start_pool):
    """A generator of 3,000 parts of 1 MiB, as fast as it can, for a client that reads
    nothing until it is over: the parts past what may wait for the client were dropped from
    the middle of the stream, which then ended as if whole. Now the stream is cut: the client
    gets parts 0..k in order, then Overloaded, and the generator is closed in its worker."""
    from isopool.protocol import decode_payload

    pool = start_pool("--workers", "1", "--model", "isopool.examples.streaming:Countdown")
    reader = raw_client(pool.endpoint, rcvhwm=4)
    try:
        reader.send_multipart([pack_header(ops.INFER, "s", stream=True), msgpack.packb({"n": 3000, "pad": 1 << 20})])
        end = time.monotonic() + 120
        for _ in range(50_000):  # bounded: status round trips until the stream has ended
            outcomes = pool.status()["pool"]["outcomes"]
            if outcomes or time.monotonic() > end:
                break
        assert outcomes == {"overloaded": 1}, outcomes
        parts, last = [], None
        for _ in range(3001):
            assert reader.poll(30_000), f"the stream stopped after {len(parts)} parts with no end"
            frames = reader.recv_multipart()
            header = msgpack.unpackb(frames[0])
            if header["op"] != ops.CHUNK:
                last = (header["op"], msgpack.unpackb(frames[1]))
                break
            parts.append(decode_payload(frames[1:])["i"])
    finally:
        reader.close()
    assert last is not None and last[0] == ops.ERROR and last[1]["type"] == "Overloaded", last
    assert 0 < len(parts) < 3000 and parts == list(range(len(parts)))  # a prefix: no gap
    assert f"after {len(parts)} parts" in last[1]["message"]
    with pool.client() as c:
        assert c.infer({"stats": True})["closed_early"] == 1  # cancelled in its worker, not run to the end
    assert pool.status()["pool"]["replies_dropped"] == 0
    print({"parts_before_the_cut": len(parts)})


def test_a_burst_of_status_asks_is_answered_from_one_status_a_pass(start_pool):
    """A bundle carries 64 asks, and 512 bundles are read in a pass: a status flood made the
    supervisor build a status for each (128,000 in 2,000 bundles kept every other client
    waiting 6 s). One status is built a pass now and sent to each ask, under its own id."""
    pool = start_pool("--workers", "1", "--model", ECHO)
    asker = raw_client(pool.endpoint)
    asks = [[pack_header(ops.STATUS, f"s{i}", bundles=True), msgpack.packb(None)] for i in range(64)]
    try:
        for _ in range(20):
            asker.send_multipart([b"\xc1" + msgpack.packb(asks, use_bin_type=True)])
        seen: dict = {}
        bodies = set()
        while sum(seen.values()) < 20 * 64:
            assert asker.poll(30_000), f"{sum(seen.values())} of {20 * 64} status answers came"
            frames = asker.recv_multipart()
            for reply in unbundle(frames):
                header = msgpack.unpackb(data(reply[0]))
                assert header["op"] == ops.RESULT
                seen[header["id"]] = seen.get(header["id"], 0) + 1
                bodies.add(len(data(reply[1])))
    finally:
        asker.close()
    assert seen == {f"s{i}": 20 for i in range(64)}
    with pool.client() as c:
        assert c.infer({"after": 1}) == {"after": 1}
    print({"distinct_status_sizes": len(bodies)})


def test_a_client_that_sends_faster_than_it_is_read_is_pushed_back_and_others_are_served(start_pool):
    """Each message of 64 KiB of empty lists passes every limit but takes the supervisor tens of
    milliseconds to check. The frontend read ahead without bound (RCVHWM 0): a hostile pass sent
    6,000 of them in 0.3 s, the supervisor's RSS rose by 450 MiB, and an honest request waited
    over 90 s. Now ZeroMQ stops reading a connection 64 messages ahead, so the sender is pushed
    back (its sends fail with EAGAIN long before 4,000), and client messages are read at most
    20 ms a loop pass, so an honest client is answered while the flood goes on."""
    pool = start_pool("--workers", "1", "--model", ECHO)
    sup = psutil.Process(pool.pid)
    rss_before = sup.memory_info().rss
    flood = raw_client(pool.endpoint, rcvhwm=4)
    flood.setsockopt(zmq.SNDHWM, 8)
    slow = b"\xdc\xff\xff" + b"\x90" * 65535  # a msgpack array of 65,535 empty arrays
    sent, end = 0, time.monotonic() + 2  # unchecked, it all went in 0.3 s
    try:
        for i in range(4000):  # 250 MiB, were it all taken; bounded in time too: pushed back, it goes
            if time.monotonic() > end:  # at the pace of the checks
                break
            if flood.poll(100, zmq.POLLOUT):
                flood.send_multipart([pack_header(ops.INFER, i), slow], zmq.NOBLOCK)
                sent += 1
        with pool.client() as honest:
            assert honest.infer({"i": 1}, timeout=60) == {"i": 1}
        assert sent < 1000, sent
        assert sup.memory_info().rss - rss_before < 100 << 20
    finally:
        flood.close()
    print({"sent_before_pushed_back": sent})


def test_a_stalled_clients_stream_ends_in_an_error_never_in_a_success_without_its_part(start_pool, tmp_path):
    """A plain model asked to stream sends its one part and its end back to back. For a client
    whose replies wait at their bound the part is not sent but the stream cut: the client
    gets Overloaded, never an empty stream that succeeds. (Where the part and the end are
    read in the very pass that takes the backlog past its bound, before the client is known
    to be stalled, replies.py turns the end into the same error: a review found that race.)
    The first request waits on a gate until every request is queued: otherwise, on a loaded
    machine, the stream can be read after the client is known to be stalled, and is refused
    at the door with another Overloaded (a CI run saw it)."""
    pool = start_pool("--workers", "1", "--model", FAULTY)
    slow = raw_client(pool.endpoint, rcvhwm=4)
    gate = tmp_path / "gate"
    fill = b"x" * (4 << 20)
    try:
        slow.send_multipart([pack_header(ops.INFER, "gate"), msgpack.packb({"do": "wait", "path": str(gate), "s": 120})])
        for i in range(90):  # 64 in the pipe, then the 64 MiB backlog: nothing read
            slow.send_multipart([pack_header(ops.INFER, i), msgpack.packb({"pad": fill})])
        slow.send_multipart([pack_header(ops.INFER, "s", stream=True), msgpack.packb({"pad": b"y" * (5 << 20)})])
        end = time.monotonic() + 120
        for _ in range(50_000):  # bounded: status round trips until the stream is queued behind the gate
            held = pool.status()["pool"]  # queued, or sent ahead to the one worker (--prefetch)
            if held["queue_depth"] + held["in_flight"] >= 92 or time.monotonic() > end:
                break
        assert held["queue_depth"] + held["in_flight"] == 92, held
        gate.touch()
        end = time.monotonic() + 120
        for _ in range(50_000):  # bounded: status round trips until all of it has been answered
            done = sum(pool.status()["pool"]["outcomes"].values())
            if done >= 92 or time.monotonic() > end:
                break
        assert done >= 92
        stream = []
        for _ in range(93):
            assert slow.poll(30_000), "a reply is missing"
            frames = slow.recv_multipart()
            header = msgpack.unpackb(frames[0])
            if header["id"] == "s":
                stream.append((header["op"], msgpack.unpackb(frames[1]) if header["op"] == ops.ERROR else None))
                if header["op"] != ops.CHUNK:
                    break
    finally:
        slow.close()
    assert [op for op, _ in stream] == [ops.ERROR], stream  # no part came, and no success either
    assert stream[0][1]["type"] == "Overloaded" and "stream was cut" in stream[0][1]["message"]
