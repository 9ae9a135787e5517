"""Large arrays in shared memory (protocol/shm.py), against real pools: the supervisor routes
them by reference and reads none of their bytes, hostile segment names are refused without a
worker dying, the cap holds, and no segment outlives its call whoever is SIGKILLed when."""

from __future__ import annotations

import fcntl
import os
import random
import signal
import subprocess
import sys
import time
from typing import Callable

import numpy as np
import psutil
import pytest
import torch
import zmq

from isopool.client import Client
from isopool.protocol import BadRequest, Overloaded, PoisonRequest, WorkerCrashed, encode_payload, ops, pack_header, unpack_header
from isopool.protocol import shm
from isopool.protocol.codec import decode_error
from isopool.client.segments import IDLE, Pool, Segments
from isopool.protocol.shm import Spill, segments_in
from isopool.worker.segments import Mappings

from ..helpers import ROOT, assert_replaced, wait_gone

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20
FAULTY = "isopool.examples.faulty:Faulty"


def peak_growth(pid: int, call) -> int:
    """How far process `pid`'s resident memory peaked above where it was, during call()."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark (VmHWM) to the current RSS
    rss = status_kib(pid, "VmRSS")
    call()
    return (status_kib(pid, "VmHWM") - rss) * 1024


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def everywhere() -> dict[int, list[str]]:
    """Every isopool segment held by any process on this host, open or mapped, but for the
    processes of the tests running beside this one (pytest-xdist's other workers: their pools
    and gateways hold segments of their own). An orphan counts: it may be one of ours."""
    found = {}
    me, boss = os.getpid(), os.getppid()
    for name in os.listdir("/proc"):
        if name.isdigit() and (held := segments_in(int(name))):
            try:
                chain = [int(name), *(p.pid for p in psutil.Process(int(name)).parents())]
            except psutil.Error:
                continue  # gone: it holds nothing now
            below = chain[chain.index(boss) - 1] if boss in chain[1:] else me
            if below == me:
                found[int(name)] = held
    return found


def kept_by_a_worker(held: list[str]) -> bool:
    """What a worker may hold between calls (worker/segments.py: Mappings), as many of each
    as it keeps: shared mappings of its clients' out segments, private ones of their in segments."""
    outs = [s for s in held if " rw-s " in s and shm.NAME_OUT in s]
    ins = [s for s in held if " rw-p " in s and shm.NAME_IN in s]
    return len(outs) <= Mappings.KEEP and len(ins) <= Mappings.KEEP and len(outs) + len(ins) == len(held)


def test_large_arrays_skip_the_supervisor_and_come_back_mapped(faulty):
    big = np.random.default_rng(1).standard_normal(16 * MiB).astype(np.float32)  # 64 MiB
    tensor = torch.arange(MiB, dtype=torch.float32)
    with faulty.client() as c:
        c.infer({"warm": big[:10]})
        answers = []
        grew = peak_growth(faulty.pid, lambda: answers.append(c.infer({"a": big, "t": tensor, "small": big[:3]})))
        answer = answers.pop()
        assert np.array_equal(answer["echo"]["a"], big) and np.array_equal(answer["echo"]["small"], big[:3])
        assert isinstance(answer["echo"]["t"], torch.Tensor) and torch.equal(answer["echo"]["t"], tensor)
        assert grew < 8 * MiB, f"the supervisor's memory peaked {grew} bytes higher for a 68 MiB round trip"
        # the answer is a mapping of the out segment; the in segment waits in the pool
        held = segments_in(os.getpid())
        assert any(s.startswith("map:") and "rw-p" in s and shm.NAME_OUT in s for s in held), held
        del answer  # its segment back to the pool, our mapping of it kept for its next answer
        assert [shm.NAME_OUT in s for s in segments_in(os.getpid()) if "rw-p" in s] == [True]
        workers = [w["pid"] for w in faulty.workers()]
        assert segments_in(faulty.pid) == []  # the supervisor never opens one
        assert all(kept_by_a_worker(segments_in(pid)) for pid in workers)  # for this client's next answers
        with Client(faulty.endpoint, shm=False) as frames_only:  # the same call as frames: it holds them
            grew = peak_growth(faulty.pid, lambda: answers.append(frames_only.infer({"a": big})))
            assert np.array_equal(answers.pop()["echo"]["a"], big)
            assert grew >= big.nbytes
    assert segments_in(os.getpid()) == []  # the client closed: its idle segments went with it
    ours = {os.getpid(), faulty.pid, *workers}  # not another pool's on this host (a test beside this one)
    left = settle_segments({}, settled=lambda left: not set(left) & set(workers))
    assert {p: s for p, s in left.items() if p in ours} == {}  # and the workers' maps


def test_an_input_in_shared_memory_that_kills_workers_is_failed_but_refuses_no_other_input(start_pool):
    """The frames of a request in shared memory name its segment, not its data: alike for every
    array of one dtype and shape. A deadly one is failed as poison after its own deaths, but
    not remembered by those frames, or a harmless array of that shape, another client's
    included, would be refused as the same input (a hostile pass found that)."""
    pool = start_pool("--workers", "2", "--model", FAULTY, "--max-attempts", "3", "--poison-threshold", "2")
    deadly = np.zeros(MiB, dtype=np.float32)  # 4 MiB: in shared memory
    deadly[0] = 666
    harmless = np.arange(MiB, dtype=np.float32)
    with pool.client() as a, pool.client() as b:
        for _ in range(2):  # not remembered: tried again, and failed again after its own deaths
            with pytest.raises(PoisonRequest) as info:
                a.infer({"do": "exit_if", "a": deadly})
            assert len(info.value.attempts) == 2
        for c in (b, a):
            answer = c.infer({"do": "exit_if", "a": harmless})
            assert np.array_equal(answer["echo"]["a"], harmless)
        assert any(shm.NAME_OUT in s for s in segments_in(os.getpid()))  # it came back in shared memory
    status = pool.wait_until(lambda s: s["pool"]["workers_ready"] == 2, "ready", timeout=60)
    assert status["pool"]["outcomes"].get("poison") == 2


def test_a_model_that_writes_its_input_never_sees_its_write_in_the_next_request(start_pool):
    """A worker keeps a request's mapping for the client's next request on the segment; a
    model that wrote into its input (torch tensors are writable) made some pages its own, so
    that mapping must not be kept: the next request would read the old write, not the client's."""
    pool = start_pool("--workers", "1", "--model", "isopool.examples.faulty:Faulty", "--arrays", "torch")
    first, second = (np.full(4 * MiB, v, dtype=np.float32) for v in (1.0, 2.0))
    with pool.client() as c:
        for _ in range(3):  # the mapping kept from the last call: each answer is the client's bytes
            assert np.array_equal(c.infer({"a": first})["echo"]["a"], first)
        scribbled = c.infer({"do": "scribble", "a": first})["echo"]["a"]
        assert not scribbled.any() and first.all()  # the model saw its write; the client's array kept its bytes
        for _ in range(3):
            assert np.array_equal(c.infer({"a": second})["echo"]["a"], second)
        worker = pool.worker_pids()[0]
        assert kept_by_a_worker(segments_in(worker)) and any(shm.NAME_IN in s for s in segments_in(worker))


def test_the_asyncio_client_sends_and_receives_by_shared_memory_too(faulty):
    import asyncio

    from isopool.client import AsyncClient

    big = np.random.default_rng(2).standard_normal(MiB).astype(np.float32)

    async def calls():
        async with AsyncClient(faulty.endpoint) as c:
            await c.status()  # its hello is answered by now: it knows the server offers shared memory
            answers = await asyncio.gather(*(c.infer({"a": big + i}) for i in range(4)))
            assert all(np.array_equal(a["echo"]["a"], big + i) for i, a in enumerate(answers))
            assert c._session.shm_threshold and any(shm.NAME_OUT in s for s in segments_in(os.getpid()))

    asyncio.run(calls())
    assert segments_in(os.getpid()) == []


class Raw:
    """A hand-made client: any header and frames, on its own connection (its pid is ours)."""

    def __init__(self, endpoint: str):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.ids = iter(range(1, 1000))

    def call(self, value, spec, spill=None) -> Exception | object:
        rid = next(self.ids)
        payload = encode_payload(value, spill)
        self.sock.send_multipart([pack_header(ops.INFER, rid, timeout=20.0, shm=spec), *payload])
        assert self.sock.poll(30_000), "no answer in 30 s"
        header, *body = self.sock.recv_multipart()
        head = unpack_header(header)
        assert head["id"] in (rid, None)  # None: a header that fails its schema is answered without its id
        return decode_error(body) if head["op"] == ops.ERROR else head

    def close(self) -> None:
        self.sock.close(linger=0)


def test_hostile_segment_names_are_refused_and_no_worker_dies(faulty, tmp_path):
    raw = Raw(faulty.endpoint)
    big = np.ones(2 * MiB, dtype=np.uint8)
    spill = Spill(MiB)
    segs = Segments(spill, Pool()) if encode_payload({"a": big}, spill) else None
    unsealed = os.memfd_create(shm.NAME_IN, os.MFD_ALLOW_SEALING)
    os.pwrite(unsealed, big, 0)
    secret = tmp_path / "secret"
    secret.write_bytes(b"x" * (2 * MiB))
    plain = os.open(secret, os.O_RDONLY)
    os.mkfifo(tmp_path / "fifo")
    fifo = os.open(tmp_path / "fifo", os.O_RDONLY | os.O_NONBLOCK)  # a reader and no writer: an open() for
    # reading would wait for a writer for ever
    sealed_out = os.memfd_create(shm.NAME_OUT, os.MFD_ALLOW_SEALING)
    sparse_out = os.memfd_create(shm.NAME_OUT, os.MFD_ALLOW_SEALING)
    fcntl.fcntl(sealed_out, shm.F_ADD_SEALS, shm.SEAL_SHRINK | shm.SEAL_GROW | shm.SEAL_WRITE)
    me, size, fd_in, fd_out = os.getpid(), segs.used, segs.seg_in.fd, segs.seg_out.fd
    ino = lambda fd: os.fstat(fd).st_ino
    named = lambda fd_in, size, fd_out: [me, fd_in, size, fd_out, ino(fd_in), ino(fd_out)]
    attempts = {  # what -> (header shm, what the refusal says)
        "another process's memory": ([faulty.pid, *named(fd_in, size, fd_out)[1:]], "names the shared memory of process"),
        "an unsealed segment": (named(unsealed, size, fd_out), "not sealed"),
        "a file that is no segment": (named(plain, size, fd_out), "not an isopool shared-memory segment"),
        "a FIFO with no writer": (named(fifo, size, fd_out), "not an isopool shared-memory segment"),
        "a FIFO to answer into": (named(fd_in, size, fifo), "not an isopool shared-memory segment"),
        "more bytes than it holds": (named(fd_in, size + MiB, fd_out), "fewer than"),
        "an fd it does not have": ([me, 999, size, fd_out, 1, ino(fd_out)], "cannot open"),
        "an out segment sealed shut": (named(fd_in, size, sealed_out), "cannot write the answer"),
        "another segment than the one named": ([*named(fd_in, size, fd_out)[:4], ino(unsealed), ino(fd_out)],
                                               "no longer the segment the request named"),
        "four fields, as before inodes": (named(fd_in, size, fd_out)[:4], "in inode or 0, out inode"),
    }
    try:
        for what, (spec, says) in attempts.items():
            err = raw.call({"a": big}, spec, Spill(MiB))
            assert isinstance(err, BadRequest) and says in str(err), f"{what}: {err!r}"
        # an out segment made huge (8 GiB, sparse: it costs its client nothing): a worker maps and
        # allocates what the answer needs, never the whole file
        os.ftruncate(sparse_out, 8 << 30)
        fcntl.fcntl(sparse_out, shm.F_ADD_SEALS, shm.SEAL_SHRINK)
        assert raw.call({"a": big}, named(fd_in, size, sparse_out), Spill(MiB))["op"] == ops.RESULT
        mapped = [line.split()[0].split("-") for pid in faulty.worker_pids() for line in open(f"/proc/{pid}/maps")
                  if shm.NAME_OUT in line]
        assert mapped and max(int(b, 16) - int(a, 16) for a, b in mapped) <= 4 * MiB, mapped
        # offsets past the segment it names: refused by the supervisor, the worker never sees it
        err = raw.call({"a": big}, named(fd_in, MiB, fd_out), Spill(MiB))
        assert isinstance(err, BadRequest) and "inside the segment" in str(err)
        with faulty.client() as c:
            assert np.array_equal(c.infer({"a": big})["echo"]["a"], big)  # still serving, by shared memory
        pool = faulty.status()["pool"]
        assert pool["shm_bytes"] == 0
        assert_replaced(faulty.status(), {})
    finally:
        raw.close()
        segs.close()
        for fd in (unsealed, plain, fifo, sealed_out, sparse_out):
            os.close(fd)


def test_a_cancelled_calls_late_answer_never_lands_in_a_later_calls_segment(start_pool, tmp_path):
    # pins: a worker still running a cancelled call found its out fd reused by the next call's
    # segment and wrote its answer over that call's answer, which the client was holding
    # --prefetch 1: the worker still running the cancelled call has no room, so the next call
    # goes to the other worker (with room, dispatch could put it behind the cancelled one)
    pool = start_pool("--workers", "2", "--prefetch", "1", "--model", "isopool.examples.faulty:Faulty")
    pool.all_ready()  # both serving: one to run the cancelled call, the other free for the next
    done = tmp_path / "answer-now"  # the cancelled call runs until this exists: late by construction
    with pool.client(timeout=20) as c:
        c.infer({"do": "ok"})
        x, y = np.full(MiB, 111, np.float32), np.full(MiB, 222, np.float32)
        slow = c.submit({"do": "wait", "path": str(done), "s": 60, "x": x})
        # the worker running it: begun, by its board (only dispatched, a cancel withdraws it unrun)
        busy = pool.running(lambda w: w["current_request_age_s"] is not None)
        out_fd = next(iter(c._session.segments.values())).seg_out.fd
        assert slow.cancel()
        end = time.monotonic() + 20
        while c._session.segments:  # the client lets its segments go once the supervisor confirms
            assert time.monotonic() < end, "the cancelled call's segments were never let go"
            time.sleep(0.01)
        held = c.infer({"x": y})
        assert held["pid"] != busy, "the next call ran on the cancelled call's worker: the case did not arise"
        assert np.array_equal(held["echo"]["x"], y)
        reused = os.path.exists(f"/proc/self/fd/{out_fd}") and shm.NAME_OUT in os.readlink(f"/proc/self/fd/{out_fd}")
        done.touch()  # now the cancelled call answers, into what its out fd has become
        end = time.monotonic() + 20
        while next(w["in_flight"] for w in pool.workers() if w["pid"] == busy):  # held until it answers, late
            assert time.monotonic() < end, "the cancelled call's worker never finished it"
            time.sleep(0.05)
        assert np.array_equal(held["echo"]["x"], y)  # the answer held is still its own
        assert reused  # the case pinned did arise: the cancelled call's out fd was the new call's
        assert_replaced(pool.status(), {})


def test_shared_memory_past_the_cap_is_overloaded_and_freed_when_answered(start_pool, tmp_path):
    pool = start_pool("--workers", "1", "--model", "isopool.examples.faulty:Faulty", "--max-shm-bytes", "20MiB")
    big = np.zeros(16 * MiB, dtype=np.uint8)
    gate = tmp_path / "gate"
    with pool.client() as c:
        slow = c.submit({"do": "wait", "path": str(gate), "s": 30, "a": big})  # in flight until the gate opens
        with pytest.raises(Overloaded, match="max-shm-bytes"):
            # through the client's one queue, after the first (a blocking infer() could overtake it)
            c.submit({"a": big}).result(30)
        gate.touch()
        assert np.array_equal(slow.result(30)["echo"]["a"], big)
        assert np.array_equal(c.infer({"a": big})["echo"]["a"], big)
        assert pool.status()["pool"]["shm_bytes"] == 0


CLIENT = """
import sys, threading, numpy as np
from isopool.client import Client
c = Client(sys.argv[1], timeout=20)
big = np.ones(4 << 20, dtype=np.uint8)
def one(i):
    try:
        c.infer({"do": "sleep", "s": 0.05 * (i % 3), "a": big})
    except Exception:
        pass
threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
for t in threads:
    t.start()
print("sent", flush=True)
for t in threads:
    t.join()
"""


def settle_segments(before: dict[int, list[str]], timeout: float = 20.0,
                    settled: Callable[[dict], bool] = lambda left: not left) -> dict:
    """Segments held anywhere that were not held `before`, once the calls in flight have ended:
    when `settled(left)` (by default: none left), or after `timeout`. `before` excludes what
    this process held already (a failed test's answers, kept by pytest's report)."""
    end = time.monotonic() + timeout
    while True:
        left = {p: new for p, s in everywhere().items() if (new := sorted(set(s) - set(before.get(p, ()))))}
        if settled(left) or time.monotonic() > end:
            return left
        time.sleep(0.05)  # polling /proc: the kernel tells no one when a mapping goes


def test_no_segment_outlives_a_sigkilled_client_worker_or_supervisor(start_pool):
    rng = random.Random(22)
    big = np.ones(4 * MiB, dtype=np.uint8)
    peak = 0
    before = everywhere()
    pool = start_pool("--workers", "2", "--model", "isopool.examples.faulty:Faulty", "--kill-grace", "1",
                      "--poison-threshold", "100")
    for round_ in range(3):  # a client SIGKILLed at a random moment of its calls
        proc = subprocess.Popen([sys.executable, "-c", CLIENT, pool.endpoint], stdout=subprocess.PIPE, cwd=ROOT)
        assert proc.stdout.readline().strip() == b"sent"
        time.sleep(rng.uniform(0, 0.15))
        peak = max(peak, sum(len(s) for s in everywhere().values()))
        proc.kill()
        proc.wait(10)
        assert settle_segments(before) == {}, f"client round {round_}"
    with pool.client(timeout=20) as c:  # a worker SIGKILLed with calls in flight
        for round_ in range(3):
            # each input its own (a kill is no input's fault: none must become poison)
            futures = [c.submit({"do": "sleep", "s": 0.2, "a": big, "tag": [round_, i]}) for i in range(6)]
            time.sleep(rng.uniform(0, 0.1))
            os.kill(pool.running(), signal.SIGKILL)
            for f in futures:
                try:
                    assert np.array_equal(f.result(30)["echo"]["a"], big)  # retried elsewhere
                except WorkerCrashed:
                    pass
            peak = max(peak, sum(len(s) for s in everywhere().values()))
            del futures, f
            # this client's idle segments, kept for its next calls (an fd each, a shared map of
            # each in segment, a private one of each out segment), and the workers' maps of them
            def within(left: dict) -> bool:
                others = {p: held for p, held in left.items() if p != os.getpid()}
                return len(left.get(os.getpid(), [])) <= 4 * IDLE and set(others) <= set(pool.worker_pids()) \
                    and all(map(kept_by_a_worker, others.values()))
            left = settle_segments(before, settled=within)
            assert within(left), left
            pool.all_ready()
    assert settle_segments(before) == {}  # and the client closed: none at all
    for round_ in range(2):  # the supervisor SIGKILLed with calls in flight
        pool = start_pool("--workers", "2", "--model", "isopool.examples.faulty:Faulty")
        workers = pool.worker_pids()
        with pool.client(timeout=3) as c:
            futures = [c.submit({"do": "sleep", "s": 0.5, "a": big}) for _ in range(6)]
            time.sleep(rng.uniform(0, 0.2))
            peak = max(peak, sum(len(s) for s in everywhere().values()))
            pool.proc.kill()
            pool.proc.wait(10)
            assert wait_gone(workers, 10) == []
            for f in futures:
                with pytest.raises(Exception):
                    f.result(30)
            del futures, f
        assert settle_segments(before) == {}, f"supervisor round {round_}"
    print(f"segments held at the moments of the kills, at most: {peak}; after: 0")
    assert peak > 0  # the kills did land while segments were in use
