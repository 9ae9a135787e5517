"""After quick work the supervisor and workers stay awake for --spin-us, then sleep
(protocol/transport.py: spin_until): checked on the CPU time of the real processes."""

from __future__ import annotations

import time

import psutil

SPIN_US = 100_000  # the longest allowed: long enough to show in CPU time
QUIET_S = 0.6  # the window watched after the last answer: six spins' worth


def cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def cpu_after_last_answer(pool, request: dict, calls: int = 20) -> dict[str, float]:
    """CPU seconds the supervisor and the worker spend in the QUIET_S after `calls` sequential
    requests. The window is the measurement itself, not a wait for something to happen."""
    with pool.client() as c:
        worker = c.status()["workers"][0]["pid"]
        for i in range(calls):
            assert c.infer({**request, "i": i})["echo"]["i"] == i
        before = {"supervisor": cpu_s(pool.pid), "worker": cpu_s(worker)}
        time.sleep(QUIET_S)
        return {"supervisor": cpu_s(pool.pid) - before["supervisor"], "worker": cpu_s(worker) - before["worker"]}


def test_quick_work_is_followed_by_a_bounded_spin(start_pool):
    pool = start_pool("--workers", "1", "--model", "isopool.examples.faulty:Faulty", "--spin-us", str(SPIN_US))
    used = cpu_after_last_answer(pool, {"do": "ok"})
    # both looked for more work after the last answer; neither kept looking (that would be ~QUIET_S)
    assert 0.03 < used["worker"] < QUIET_S / 2, used
    assert 0.03 < used["supervisor"] < QUIET_S / 2, used


def test_spin_us_0_sleeps_at_once(start_pool):
    pool = start_pool("--workers", "1", "--model", "isopool.examples.faulty:Faulty", "--spin-us", "0")
    used = cpu_after_last_answer(pool, {"do": "ok"})
    assert used["worker"] < 0.03 and used["supervisor"] < 0.03, used


def test_a_slow_model_is_never_spun_for(start_pool):
    # each run (5 ms) is longer than a worker holds results: a wake-up is cheap beside it
    pool = start_pool("--workers", "1", "--model", "isopool.examples.faulty:Faulty", "--spin-us", str(SPIN_US))
    used = cpu_after_last_answer(pool, {"do": "sleep", "s": 0.005})
    assert used["worker"] < 0.03 and used["supervisor"] < 0.03, used
