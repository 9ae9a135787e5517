"""After quick work the supervisor and workers stay awake for --spin-us, then sleep
(protocol/pacing.py: Spinner): checked on the CPU time of the real processes."""

from __future__ import annotations

import time

import psutil

FAULTY = "isopool.examples.faulty:Faulty"
SPIN_US = 100_000  # the longest allowed: long enough to show in CPU time
QUIET_S = 0.6  # the window watched after the last answer: six spins' worth
IDLE_S = 0.02  # an idle worker's CPU in that window: a heartbeat, nothing more
IDLE_SUPERVISOR_S = 0.05  # the supervisor also samples each worker's memory once a second


def cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def cpu_of(pool, worker: int) -> dict[str, float]:
    return {"supervisor": cpu_s(pool.pid), "worker": cpu_s(worker)}


def cpu_since(pool, worker: int, before: dict[str, float]) -> dict[str, float]:
    return {k: v - before[k] for k, v in cpu_of(pool, worker).items()}


def cpu_after_last_answer(pool, request: dict, calls: int = 20) -> dict[str, float]:
    """CPU seconds the supervisor and the worker spend in the QUIET_S after `calls` sequential
    requests. The window is the measurement itself, not a wait for something to happen."""
    with pool.client() as c:
        worker = c.status()["workers"][0]["pid"]
        for i in range(calls):
            assert c.infer({**request, "i": i})["echo"]["i"] == i
        before = cpu_of(pool, worker)
        time.sleep(QUIET_S)
        return cpu_since(pool, worker, before)


def test_quick_work_is_followed_by_a_bounded_spin(start_pool):
    pool = start_pool("--workers", "1", "--model", FAULTY, "--spin-us", str(SPIN_US))
    # the worker looked for more work after its last run (a 0.1 s spin, yielding to any other
    # thread); neither it nor the supervisor kept looking (that would be ~QUIET_S). Whether
    # the supervisor spun depends on how soon the answer came, which a busy machine decides;
    # so does whether the worker's last run was quick (2 ms) at all: up to 3 tries, every one
    # bounded, one of them showing the worker's spin.
    tries = []
    for _ in range(3):
        used = cpu_after_last_answer(pool, {"do": "ok"})
        tries.append(used)
        assert used["worker"] < QUIET_S / 2 and used["supervisor"] < QUIET_S / 2, tries
        if used["worker"] > IDLE_S:
            break
    assert any(IDLE_S < t["worker"] for t in tries), tries


def test_spin_us_0_sleeps_at_once(start_pool):
    pool = start_pool("--workers", "1", "--model", FAULTY, "--spin-us", "0")
    used = cpu_after_last_answer(pool, {"do": "ok"})
    assert used["worker"] < IDLE_S and used["supervisor"] < IDLE_SUPERVISOR_S, used


def test_a_slow_model_is_never_spun_for(start_pool):
    # each run (5 ms) is longer than a worker holds results: a wake-up is cheap beside it
    pool = start_pool("--workers", "1", "--model", FAULTY, "--spin-us", str(SPIN_US))
    used = cpu_after_last_answer(pool, {"do": "sleep", "s": 0.005})
    assert used["worker"] < IDLE_S and used["supervisor"] < IDLE_SUPERVISOR_S, used


def test_sporadic_requests_stop_paying_for_spins(start_pool):
    """Requests further apart than --spin-us: each gap halves the window, so the spins of a
    sporadic client cost a fraction of one full spin per request (protocol/pacing.py: Spinner)."""
    spin_us, requests, gap_s = 50_000, 8, 0.2
    pool = start_pool("--workers", "1", "--model", FAULTY, "--spin-us", str(spin_us))
    with pool.client() as c:
        worker = c.status()["workers"][0]["pid"]
        before = cpu_of(pool, worker)
        for i in range(requests):
            assert c.infer({"do": "ok", "i": i})["echo"]["i"] == i
            time.sleep(gap_s)  # the traffic's shape, not a wait for anything
        used = cpu_since(pool, worker, before)
    full_spins = requests * spin_us / 1e6  # what spinning every time would cost each process
    assert used["worker"] < full_spins / 2 and used["supervisor"] < full_spins / 2, used
