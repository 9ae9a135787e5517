"""ZeroMQ's I/O threads stop preempting their senders while a process is busy, and only
then (protocol/iothread.py): checked on the real threads of a client, a supervisor and a worker."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import zmq

from isopool.protocol.iothread import CALM

BURST = 1000  # quick requests, within --max-queue: a quarter of a second of work for one worker
LOOKS = 4  # at most, during one burst


def io_policies(pid: int) -> list[int]:
    """The scheduling policy of each libzmq I/O thread of process `pid`."""
    policies = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "comm").read_bytes().startswith(b"ZMQbg/IO/"):
                policies.append(os.sched_getscheduler(int(task.name)))
        except OSError:  # the thread ended meanwhile
            pass
    return policies


def test_io_threads_yield_to_busy_senders_and_preempt_for_a_lone_request(start_pool):
    pool = start_pool("--workers", "1", "--model", "isopool.examples.faulty:Faulty")
    bystander = zmq.Context(1)  # another context in this process: never ours to change
    bystander_sock = bystander.socket(zmq.DEALER)
    try:
        with pool.client() as c:
            worker = c.status()["workers"][0]["pid"]
            futures = [c.submit({"do": "ok", "i": i}) for i in range(BURST)]
            ours: list[int] = []
            looks = []
            # a look holds the pool still (SIGSTOP) while it reads the policies. On a busy host
            # the answer just before it may have been slowed past QUICK_S (protocol/pacing.py),
            # and the supervisor or the worker then rightly treats the work as slow until the
            # next quick answer, which the SIGSTOP holds back: so the pool is let go on and
            # looked at again, a bounded number of times
            for k in range(1, LOOKS + 1):
                futures[k * BURST // (LOOKS + 2)].result(timeout=30)
                os.kill(worker, signal.SIGSTOP)  # hold the pool busy with quick requests while we look
                try:
                    ours = c._io.io_threads.tids or []
                    look = ([os.sched_getscheduler(t) for t in ours], io_policies(pool.pid),
                            io_policies(worker), io_policies(os.getpid()).count(os.SCHED_BATCH))
                finally:
                    os.kill(worker, signal.SIGCONT)
                looks.append(look)
                # client, supervisor and worker all yield; the bystander's thread is untouched
                busy = ([os.SCHED_BATCH] * len(ours), [os.SCHED_BATCH], [os.SCHED_BATCH], len(ours))
                if look == busy:
                    break
            assert ours, "the client's I/O thread was not found"
            assert looks[-1] == busy, looks
            assert [f.result(timeout=30)["echo"]["i"] for f in futures] == list(range(BURST))
            for i in range(CALM + 2):  # one at a time: every hop is on the critical path again
                assert c.infer({"do": "ok", "i": i})["echo"]["i"] == i
            assert [os.sched_getscheduler(t) for t in ours] == [os.SCHED_OTHER] * len(ours)
            assert io_policies(pool.pid) == [os.SCHED_OTHER]
            assert io_policies(worker) == [os.SCHED_OTHER]
    finally:
        bystander_sock.close(linger=0)
        bystander.term()


def test_a_slow_model_keeps_every_io_thread_preempting(start_pool):
    pool = start_pool("--workers", "1", "--model", "isopool.examples.faulty:Faulty")
    with pool.client() as c:
        worker = c.status()["workers"][0]["pid"]
        # each run (20 ms) is longer than a worker holds results and than a quick answer
        futures = [c.submit({"do": "sleep", "s": 0.02, "i": i}) for i in range(CALM + 4)]
        futures[2].result(timeout=30)
        assert io_policies(pool.pid) == [os.SCHED_OTHER]
        assert io_policies(worker) == [os.SCHED_OTHER]
        assert [f.result(timeout=30)["echo"]["i"] for f in futures] == list(range(CALM + 4))
