"""The crash-case table and the recovery policy, against live pools with real faulty handlers.

Each case: what the client sees, that the other workers served throughout, and that the
pool is back to full strength afterwards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from isopool.errors import (
    BadRequest,
    Overloaded,
    PoisonRequest,
    RemoteError,
    RequestTimeout,
    ShuttingDown,
    Unavailable,
    WorkerCrashed,
)
from tests.helpers import ROOT, Background, assert_replaced, wait_gone

FAULTY = "isopool.examples.faulty:Faulty"


def back_to_full_strength(pool) -> dict:
    status = pool.all_ready()
    assert status["pool"]["workers_ready"] == status["pool"]["workers_target"]
    assert status["pool"]["queue_depth"] == 0 and status["pool"]["in_flight"] == 0
    return status


def fault_exception(pool, c):
    with pytest.raises(RemoteError, match="ValueError"):
        c.infer({"do": "raise"})
    return {}  # no worker replaced


def fault_os_exit(pool, c):
    with pytest.raises(WorkerCrashed) as info:
        c.infer({"do": "exit", "code": 7}, retry=False)
    assert info.value.exit_code == 7
    return {"crash": 1}


def fault_segv(pool, c):
    with pytest.raises(WorkerCrashed) as info:
        c.infer({"do": "segv"}, retry=False)
    assert info.value.signal == "SIGSEGV" and "segmentation fault" in str(info.value)
    return {"crash": 1}


def fault_sigkill_from_outside(pool, c):
    future = c.submit({"do": "sleep", "s": 2.0, "tag": "killed"})
    victim = pool.running(lambda w: w["current_request_age_s"] is not None)
    os.kill(victim, signal.SIGKILL)
    reply = future.result(timeout=30)  # retried on another worker: the client sees success
    assert reply["echo"]["tag"] == "killed" and reply["pid"] != victim
    return {"crash": 1}


def fault_hang(pool, c):
    with pytest.raises(RequestTimeout) as info:
        c.infer({"do": "hang"}, timeout=1.0)
    assert info.value.setting == "timeout" and info.value.started
    return {"timeout": 1}


@pytest.mark.parametrize("fault", [fault_exception, fault_os_exit, fault_segv, fault_sigkill_from_outside, fault_hang],
                         ids=["exception", "os_exit", "sigsegv", "sigkill", "hang"])
def test_crash_case(start_pool, fault):
    pool = start_pool("--workers", "3", "--model", FAULTY, "--kill-grace", "1")
    with pool.client() as c, pool.client() as bg_client, Background(bg_client) as bg:
        replaced = fault(pool, c)
    status = back_to_full_strength(pool)
    assert bg.failed == [] and bg.ok > 0
    assert_replaced(status, replaced)


def test_memory_growth_past_max_rss_recycles_without_losing_capacity(start_pool):
    pool = start_pool("--workers", "2", "--model", FAULTY, "--max-rss", "600MiB", "--stats-interval", "0.1")
    with pool.client() as c, pool.client() as bg_client, Background(bg_client) as bg:
        # past the limit for good (a worker starts at ~160 MiB), not only at the moment the model
        # builds its hoard (twice its size): a sample every 0.1 s may miss that
        grown = c.infer({"do": "grow", "mib": 550})["pid"]
        event = pool.wait_event("recycling", reason="max_rss", pid=grown)
        pool.wait_event("recycled", pid=grown, stopped_for="max_rss")
    status = back_to_full_strength(pool)
    assert bg.failed == [] and bg.ok > 0
    assert grown not in [w["pid"] for w in status["workers"]]
    assert_replaced(status, {})  # a recycle is not a crash
    # its replacement took its id (what the model sees stays 0..N-1), as a later generation
    assert any(w["id"] == event["worker"] and w["generation"] > event["generation"] for w in status["workers"])


def test_exception_in_model_construction_fails_serve_plainly(start_pool):
    pool = start_pool("--workers", "2", "--model", "isopool.examples.faulty:FailsToLoad", wait=False)
    code = pool.proc.wait(60)
    out = pool.output()
    assert code == 78, out
    assert "weights file /models/missing.pt not found" in out
    assert "RuntimeError" in out and out.count("isopool serve:") == 1


def test_unimportable_model_fails_serve_plainly(start_pool):
    pool = start_pool("--workers", "1", "--model", "no_such_module:Model", wait=False)
    assert pool.proc.wait(60) == 78
    assert "No module named 'no_such_module'" in pool.output()


def test_slow_model_construction_queues_requests_until_ready(start_pool):
    pool = start_pool("--workers", "2", "--model", "isopool.examples.faulty:SlowToLoad", wait=False)
    pool.wait_answering()  # the supervisor, not its workers: they take 2 s to load
    with pool.client() as c:
        futures = [c.submit(i, timeout=60) for i in range(10)]  # sent before any worker is ready
        assert [f.result(timeout=60)["echo"] for f in futures] == list(range(10))
    pool.wait_ready()
    back_to_full_strength(pool)


def test_poison_input_kills_at_most_threshold_workers_then_is_refused(start_pool):
    pool = start_pool("--workers", "3", "--model", FAULTY, "--max-attempts", "5", "--poison-threshold", "2")
    poison = {"do": "exit", "code": 9, "id": "poison-1"}
    with pool.client() as c, pool.client() as bg_client, Background(bg_client) as bg:
        with pytest.raises(PoisonRequest) as info:
            c.infer(poison)
        assert len(info.value.attempts) == 2
        for _ in range(3):  # the same input again: refused at once, no worker dies
            with pytest.raises(PoisonRequest):
                c.infer(poison)
        assert c.infer({"do": "ok"})["echo"] == {"do": "ok"}
    status = back_to_full_strength(pool)
    assert bg.failed == []
    assert_replaced(status, {"crash": 2})  # the poison killed exactly two workers


def test_retries_stop_at_max_attempts_with_each_death_reported(faulty):
    with faulty.client() as c:
        with pytest.raises(WorkerCrashed) as info:
            c.infer({"do": "exit", "code": 5})
    attempts = info.value.attempts
    assert [a["exit_code"] for a in attempts] == [5, 5]
    assert len({a["pid"] for a in attempts}) == 2
    back_to_full_strength(faulty)


@pytest.mark.parametrize("fault", [{"do": "exit", "code": 7}, {"do": "segv"}])
def test_a_death_is_blamed_only_on_the_request_it_was_running(start_pool, fault):
    """One worker holds a burst (prefetch 16) and sends its results in groups; it dies on the
    sixth request. The finished requests whose results it had not yet sent, and those it had
    not begun, are rerun without penalty; only the sixth is blamed (--max-attempts 1)."""
    pool = start_pool("--workers", "1", "--model", FAULTY, "--max-attempts", "1", "--prefetch", "16")
    with pool.client() as c:
        for r in range(3):  # three rounds: each a fresh worker, each blamed right
            burst = [{"do": "ok", "n": i} for i in range(5)] + [{**fault, "n": 5, "round": r}] + \
                [{"do": "ok", "n": i} for i in range(6, 12)]
            futures = [c.submit(x) for x in burst]
            outcomes = []
            for f in futures:
                try:
                    outcomes.append(f.result(30)["echo"]["n"])
                except WorkerCrashed as exc:
                    outcomes.append(("crashed", len(exc.attempts)))
            assert outcomes == [0, 1, 2, 3, 4, ("crashed", 1), *range(6, 12)]
    status = back_to_full_strength(pool)
    assert_replaced(status, {"crash": 3})
    assert status["pool"]["outcomes"].get("crashed", 0) == 3


def test_a_finished_answer_held_behind_a_slow_request_times_out_without_a_kill(start_pool):
    """A worker holds a quick request's answer while it runs the next one (answers leave in
    groups). When the quick one's deadline passes, its worker is not killed for it: the board
    says it finished, and the slow one it is running keeps its own deadline."""
    pool = start_pool("--workers", "1", "--model", FAULTY, "--prefetch", "16")
    with pool.client() as c:
        first = c.submit({"do": "sleep", "s": 0.3})  # the next two arrive while this runs
        quick = c.submit({"do": "ok"}, timeout=1.0)
        slow = c.submit({"do": "sleep", "s": 3.0})
        assert first.result(timeout=30)["echo"]["do"] == "sleep"
        with pytest.raises(RequestTimeout) as info:
            quick.result(timeout=30)
        assert info.value.started is True and "its answer had not left worker" in str(info.value)
        assert slow.result(timeout=30)["echo"]["do"] == "sleep"
    assert [w["restarts"] for w in pool.workers()] == [0]


def test_an_answer_over_the_message_limit_is_a_typed_error_and_its_worker_serves_on(start_pool):
    """A model's answer past --max-message-bytes: sent, ZeroMQ in the supervisor dropped the
    worker's connection (MAXMSGSIZE) without a word, its reconnection was refused (one per
    worker), and every request it held waited out its deadline (300 s by default), another
    client's among them. The worker now refuses to send it and answers BadRequest naming the
    limit; what it holds besides is answered."""
    pool = start_pool("--workers", "1", "--model", FAULTY, "--max-message-bytes", "8MiB", "--prefetch", "4")
    with pool.client() as c, pool.client() as other:
        big = c.submit({"do": "big", "n": 40 << 20})
        small = other.submit({"do": "ok", "tag": "innocent"})  # held by the same worker meanwhile
        with pytest.raises(BadRequest) as info:
            big.result(timeout=60)
        assert info.value.setting == "max_message_bytes" and "over max_message_bytes=8388608" in str(info.value)
        assert small.result(timeout=60)["echo"]["tag"] == "innocent"
        assert len(c.infer({"do": "big", "n": 1 << 20})) == 1 << 20  # under the limit: served as ever
    assert_replaced(pool.status(), {})


def test_a_clients_own_short_deadlines_do_not_make_the_pool_unhealthy(start_pool):
    """A client whose timeout= is shorter than its requests take: each such request's worker
    is killed and replaced, as documented. Each kill used to count toward --max-restarts, so
    12 of them in a minute marked a healthy pool degraded and `isopool health` failed (a
    probe would restart it). They are replacements still (status counts them), but not the
    pool's trouble; --request-timeout's kills, crashes and the like still are."""
    pool = start_pool("--workers", "2", "--model", FAULTY, "--max-restarts", "3")
    with pool.client() as c:
        for _ in range(6):
            pool.all_ready()  # a worker free for it: its deadline passes while it runs, not queued
            with pytest.raises(RequestTimeout) as info:
                c.infer({"do": "sleep", "s": 30}, timeout=1.0)
            assert info.value.started is True
        status = pool.all_ready()
    assert status["pool"]["healthy"] is True, status["pool"]["health_reason"]
    assert sum(w["restarts"] for w in status["workers"]) == 6
    with pool.client() as c:  # and a crash still counts: past --max-restarts 3 in a row of them
        for i in range(4):
            with pytest.raises(WorkerCrashed):
                c.infer({"do": "exit", "i": i}, retry=False)  # each its own input: no poison
        assert c.status()["pool"]["healthy"] is False


def test_the_bytes_of_the_requests_held_are_bounded(start_pool, tmp_path):
    """Only the count of requests was bounded: one client's 200 requests of 16 MiB (as frames:
    a tcp client, or shm off) grew the supervisor by 2 GiB, and a 256 MiB request times its
    share of the queue would be 900 GiB. The bytes held for a model, queued or running, are
    bounded by --max-queue-bytes; past it a request is refused with Overloaded at once."""
    import numpy as np

    pool = start_pool("--workers", "1", "--model", FAULTY, "--prefetch", "1", "--max-queue-bytes", "64MiB")
    gate = tmp_path / "gate"
    big = np.ones(1 << 22, np.float32)  # 16 MiB, and a few bytes of payload around it
    with pool.client(shm=False) as c, pool.client(shm=False) as other:
        first = c.submit({"do": "wait", "path": str(gate), "s": 30, "a": big})
        rest = [c.submit({"do": "ok", "i": i, "a": big}) for i in range(8)]
        # a refusal is answered at once, before the status asked after it on the same connection
        held = c.status()["pool"]["held_bytes"]
        refused = [f.exception(timeout=0) for f in rest if f.done()]
        assert all(isinstance(e, Overloaded) for e in refused), refused
        kept = other.submit({"do": "ok", "other": 1, "a": big[:1 << 20]})  # the eighth kept for others
        gate.touch()
        assert kept.result(timeout=60)["echo"]["other"] == 1
        assert first.result(timeout=60)["echo"]["do"] == "wait"
        answered = [f.result(timeout=60)["echo"]["i"] for f in rest if f.exception(timeout=60) is None]
        assert c.status()["pool"]["held_bytes"] == 0
    assert len(answered) == 2 and len(refused) == 6  # 3 of 16 MiB fit in 64 MiB, a fourth does not
    assert 3 * big.nbytes < held <= 64 << 20
    assert "--max-queue-bytes" in str(refused[0]) and refused[0].max_queue_bytes == 64 << 20
    assert "its share" in str(refused[0])  # one client may hold 7/8 of it (56 MiB: 3 of 16 MiB)


def test_expired_request_is_never_started(start_pool):
    pool = start_pool("--workers", "1", "--model", FAULTY)
    with pool.client() as c:
        # both through the client's one queue, so the blocker surely arrives first (a blocking
        # infer() has a socket of its own and could overtake it)
        blocker = c.submit({"do": "sleep", "s": 1.5})
        doomed = c.submit({"do": "exit", "code": 4}, timeout=0.5)  # would kill the worker if started
        with pytest.raises(RequestTimeout) as info:
            doomed.result(timeout=10)
        assert info.value.started is False
        assert blocker.result(timeout=10)["echo"]["do"] == "sleep"
    assert_replaced(pool.status(), {})


def test_silent_idle_worker_is_replaced(start_pool):
    pool = start_pool("--workers", "1", "--model", FAULTY, "--heartbeat-interval", "0.2",
                      "--heartbeat-timeout", "1", "--kill-grace", "1")
    pid = pool.worker_pids()[0]
    os.kill(pid, signal.SIGSTOP)  # alive but silent
    pool.wait_event("killed", pid=pid, reason="heartbeat")
    pool.wait_event("ready", generation=2)
    with pool.client() as c:
        assert c.infer({"do": "ok"})["pid"] != pid
    assert wait_gone([pid], 10) == []


def test_restart_budget_marks_the_pool_degraded_instead_of_spinning(start_pool):
    pool = start_pool("--workers", "2", "--model", FAULTY, "--max-restarts", "2", "--restart-window", "60",
                      "--stats-interval", "0.1")
    with pool.client() as c:
        for code in (11, 12, 13):
            with pytest.raises(WorkerCrashed):
                c.infer({"do": "exit", "code": code}, retry=False)
    pool.wait_event("degraded")
    status = pool.status()["pool"]
    assert status["healthy"] is False and "degraded" in status["health_reason"]
    health = subprocess.run([sys.executable, "-m", "isopool.cli", "health", "--endpoint", pool.endpoint],
                            capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert health.returncode == 1 and "degraded" in health.stdout


def test_backoff_grows_for_a_slot_that_keeps_dying(start_pool):
    pool = start_pool("--workers", "1", "--model", FAULTY, "--backoff-base", "0.2")
    with pool.client() as c:
        with pytest.raises(WorkerCrashed):
            c.infer({"do": "exit", "code": 21}, retry=False)
        first = pool.wait_event("ready")  # the first restart is immediate: no backoff event before it
        with pytest.raises(WorkerCrashed):
            c.infer({"do": "exit", "code": 22}, retry=False)
        backoff = pool.wait_event("backoff")
        pool.wait_event("ready", generation=first["generation"] + 1)
    assert 0.1 <= backoff["delay_s"] <= 0.3
    assert pool.workers()[0]["restarts"] == 2


def test_rolling_reload_under_steady_load_fails_nothing(start_pool):
    pool = start_pool("--workers", "2", "--model", FAULTY)
    before = set(pool.worker_pids())
    with pool.client() as c, pool.client() as bg_client, Background(bg_client) as bg:
        assert c.reload()["reloading"] == 2
        pool.wait_until(lambda s: not (before & {w["pid"] for w in s["workers"]})
                        and s["pool"]["workers_ready"] == 2, "recycled", timeout=60)
    assert bg.failed == [] and bg.ok > 0
    assert wait_gone(list(before), 10) == []


def test_sighup_reloads(start_pool):
    pool = start_pool("--workers", "1", "--model", FAULTY)
    (old,) = pool.worker_pids()
    pool.proc.send_signal(signal.SIGHUP)
    pool.wait_event("recycled", pid=old, stopped_for="reload")
    with pool.client() as c:
        assert c.infer({"do": "ok"})["pid"] != old


def test_scale_up_and_down_at_runtime(start_pool):
    pool = start_pool("--workers", "1", "--model", FAULTY)
    with pool.client() as c:
        c.scale(3)
        pool.wait_until(lambda s: s["pool"]["workers_ready"] == 3, "ready")
        c.scale(1)
        status = pool.wait_until(lambda s: len(s["workers"]) == 1, "exited")
    assert status["pool"]["workers_target"] == 1 and status["workers"][0]["state"] == "idle"


def test_sigterm_answers_every_queued_request_and_exits_zero(start_pool, tmp_path):
    pool = start_pool("--workers", "1", "--model", FAULTY, "--drain-timeout", "2")
    pids = pool.worker_pids()
    gate = tmp_path / "gate"
    with pool.client() as c:
        # the first runs until the gate opens: none can finish before status counts them
        futures = [c.submit({"do": "wait", "path": str(gate), "s": 30, "i": 0}, timeout=30)]
        futures += [c.submit({"do": "sleep", "s": 0.3, "i": i}, timeout=30) for i in range(1, 12)]
        pool_now = c.status()["pool"]  # same connection: answered after all 12 were accepted
        assert pool_now["queue_depth"] + pool_now["in_flight"] == 12
        gate.touch()
        pool.proc.send_signal(signal.SIGTERM)
        outcomes = []
        for f in futures:
            try:
                outcomes.append(f.result(timeout=30)["echo"]["i"])
            except ShuttingDown:
                outcomes.append("shutdown")
        with pytest.raises((ShuttingDown, Unavailable, RequestTimeout)):
            c.infer({"do": "ok"}, timeout=2)
    assert pool.proc.wait(30) == 0
    finished = [o for o in outcomes if o != "shutdown"]
    assert finished == list(range(len(finished))) and len(finished) >= 1
    assert len(outcomes) == 12
    assert wait_gone(pids, 10) == []


def test_supervisor_sigkill_takes_every_worker_down_and_clients_get_an_error(faulty):
    pids = faulty.worker_pids()
    with faulty.client() as c:
        pending = c.submit({"do": "sleep", "s": 10}, timeout=5)
        faulty.running()
        faulty.proc.kill()
        t0 = time.monotonic()
        with pytest.raises((Unavailable, RequestTimeout)):
            pending.result(timeout=10)
        assert time.monotonic() - t0 < 5.5
    assert wait_gone(pids, 2.0) == []
    faulty.proc.wait(5)


def test_a_model_that_does_not_load_in_time_fails_serve_naming_the_setting(start_pool):
    """A constructor that hangs once made an endless start/kill loop."""
    pool = start_pool("--workers", "1", "--model", "isopool.examples.faulty:SlowToLoad", "--start-timeout", "0.5",
                      "--kill-grace", "0.5", wait=False)
    assert pool.proc.wait(60) == 78
    out = pool.output()
    assert "--start-timeout 0.5s" in out and out.count("isopool serve:") == 1


def test_max_rss_applies_while_the_model_loads(start_pool):
    pool = start_pool("--workers", "1", "--model", "isopool.examples.faulty:SlowToLoad", "--max-rss", "10MiB",
                      "--stats-interval", "0.1", "--kill-grace", "0.5", wait=False)
    assert pool.proc.wait(60) == 78
    assert "passed --max-rss while its model loaded" in pool.output()
