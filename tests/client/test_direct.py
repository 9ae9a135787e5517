"""A blocking infer() waits on a socket of its own (client/direct.py): the same
answers, errors and endings as the I/O thread's path, on the caller's thread."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from isopool.client import iothread
from isopool.errors import RemoteError, RequestTimeout, Unavailable


def _in_thread(fn) -> tuple[threading.Thread, list]:
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(fn())
        except BaseException as exc:  # noqa: BLE001 - the test inspects what it raised
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_infer_answers_on_a_reused_socket_of_its_own(faulty):
    with faulty.client() as c:
        replies = [c.infer({"do": "ok", "i": i}) for i in range(50)]
        with pytest.raises(RemoteError):
            c.infer({"do": "raise", "tag": "t"})
        assert c.infer({"do": "ok", "i": 50})["echo"]["i"] == 50
        assert c._io.direct == 1 and len(c._io.idle) == 1  # one socket, back in the pool each time
        assert not c._session.pending  # the I/O thread's table never saw these calls
    assert [r["echo"]["i"] for r in replies] == list(range(50))


def test_a_late_answer_to_a_timed_out_call_is_not_taken_for_the_next_one(faulty):
    with faulty.client() as c:
        assert c.infer({"do": "ok"})["echo"] == {"do": "ok"}
        os.kill(faulty.pid, signal.SIGSTOP)  # the supervisor cannot answer before our own deadline
        try:
            with pytest.raises(RequestTimeout, match="no reply from the supervisor"):
                c.infer({"do": "ok", "call": "first"}, timeout=0.3)
        finally:
            os.kill(faulty.pid, signal.SIGCONT)
        # the supervisor now reads the first call and its cancel, and answers it (Cancelled, or
        # its result if it ran first); that answer reaches the same socket before ours
        assert c.infer({"do": "ok", "call": "second"})["echo"]["call"] == "second"
        assert c._io.direct == 1
    outcomes = faulty.status()["pool"]["outcomes"]
    assert outcomes["ok"] + outcomes.get("cancelled", 0) == 3


def test_closing_the_client_ends_an_infer_waiting_in_another_thread(faulty):
    c = faulty.client()
    # the pool's drain at teardown waits for this sleep: short, but far longer than the test
    thread, outcome = _in_thread(lambda: c.infer({"do": "sleep", "s": 3}, timeout=60))
    faulty.running()
    c.close()
    thread.join(10)
    assert not thread.is_alive()
    assert isinstance(outcome[0], Unavailable) and "closed" in str(outcome[0])
    assert not c._io.thread.is_alive()  # the context terminated: no socket was left open


def test_supervisor_death_ends_a_waiting_infer_with_unavailable(faulty):
    with faulty.client() as c:
        thread, outcome = _in_thread(lambda: c.infer({"do": "sleep", "s": 30}, timeout=60))
        faulty.running()
        faulty.proc.kill()
        thread.join(10)
        assert not thread.is_alive()
    assert isinstance(outcome[0], Unavailable) and "lost the connection" in str(outcome[0])


def test_callers_beyond_the_direct_sockets_queue_through_the_io_thread(faulty):
    with faulty.client() as c:
        waiting = [_in_thread(lambda: c.infer({"do": "sleep", "s": 1}, timeout=30))
                   for _ in range(iothread.DIRECT_SOCKETS)]
        for _ in range(500):  # bounded round trips: until the pool holds every one of them
            pool = faulty.status()["pool"]
            if pool["queue_depth"] + pool["in_flight"] == iothread.DIRECT_SOCKETS:
                break
        else:
            raise AssertionError("the pool never held all the direct calls")
        assert c._io.direct == iothread.DIRECT_SOCKETS and not c._io.idle  # each was sent from a socket lent out
        assert c.infer({"do": "ok", "via": "queue"})["echo"]["via"] == "queue"
        for thread, _ in waiting:
            thread.join(30)
        assert all(out and out[0]["echo"]["do"] == "sleep" for _, out in waiting)
        assert c._io.direct == iothread.DIRECT_SOCKETS


class _Interrupted(Exception):
    pass


def test_an_interrupted_infer_withdraws_its_request(faulty):
    def interrupt(signum, frame):
        raise _Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with faulty.client() as c:
            signal.setitimer(signal.ITIMER_REAL, 1.0)  # like Ctrl-C while the call waits (its request sent by then)
            with pytest.raises(_Interrupted):
                c.infer({"do": "sleep", "s": 2.0})
            # the CANCEL left on the same socket before this call's request
            assert c.infer({"do": "ok"})["echo"] == {"do": "ok"}
            outcomes = c.status()["pool"]["outcomes"]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert outcomes.get("cancelled") == 1 and outcomes["ok"] == 1


def test_infer_from_a_done_callback_is_answered(faulty):
    """Done-callbacks run on the client's I/O thread; an infer() there must not wait on it."""
    got: list = []
    answered = threading.Event()
    with faulty.client() as c:
        def chained(f) -> None:
            assert threading.current_thread() is c._io.thread
            got.append(c.infer({"do": "ok", "after": f.result()["echo"]["i"]}, timeout=10))
            answered.set()

        c.submit({"do": "sleep", "s": 0.2, "i": 1}).add_done_callback(chained)  # answered later, on the I/O thread
        assert answered.wait(30)
    assert got[0]["echo"]["after"] == 1
