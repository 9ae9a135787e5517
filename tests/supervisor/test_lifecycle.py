"""What status and events say matches what really happens: a client's Ctrl-C reaches the
worker, a request runs (and is shown running) until its worker is free, and the
supervisor's own kills are reported as its own, with the setting behind them."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from tests.helpers import ROOT

FAULTY = "isopool.examples.faulty:Faulty"


def test_ctrl_c_on_a_client_is_a_cancel_and_status_shows_the_run_until_the_worker_is_free(start_pool):
    pool = start_pool("--workers", "1", "--model", FAULTY, "--kill-grace", "0.5")
    cli = subprocess.Popen([sys.executable, "-m", "isopool.cli", "infer", "--endpoint", pool.endpoint,
                            "--timeout", "8", json.dumps({"do": "hang"})], cwd=ROOT,
                           # a shell that ran the suite in the background left SIGINT ignored, and
                           # the CLI would inherit that: give it Ctrl-C as a terminal would
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        hung = pool.running()  # the worker runs it (the CLI takes a moment to start)
        cli.send_signal(signal.SIGINT)
        assert cli.wait(30) != 0
    finally:
        cli.kill()
        _, err = cli.communicate(timeout=30)
    # the CANCEL arrives on the CLI's connection, status on ours: polling bounded in count and
    # time (a loaded machine takes longer than a few hundred round trips to read the other)
    end = time.monotonic() + 20
    for _ in range(20_000):
        status = pool.status()
        if status["pool"]["outcomes"].get("cancelled") or time.monotonic() > end:
            break
    pool_now = status["pool"]
    assert pool_now["outcomes"].get("cancelled") == 1, (pool_now["outcomes"], err.decode()[-2000:])
    if hung in {w["pid"] for w in status["workers"]}:  # still running it: shown as running
        assert pool_now["in_flight"] == 1 and pool_now["in_flight_answered"] == 1
        assert status["workers"][0]["in_flight"] == 1
    # past its deadline the worker, still running it, is replaced; the kill is said to be ours
    exited = pool.wait_event("exited", pid=hung, timeout=60)
    assert "sent by the supervisor" in exited["reason"] and "deadline" in exited["reason"]
    assert "OOM" not in exited["reason"]
    free = pool.all_ready()
    assert free["pool"]["in_flight"] == 0 and free["pool"]["in_flight_answered"] == 0


def test_the_supervisors_own_sigkill_at_stop_is_reported_as_its_own(start_pool):
    pool = start_pool("--workers", "1", "--model", FAULTY, "--kill-grace", "0.3", "--drain-timeout", "0.5")
    with pool.client() as c:
        c.submit({"do": "hang"})
        pid = pool.running(lambda w: w["current_request_age_s"] is not None)  # begun: the drain must kill it
        pool.proc.send_signal(signal.SIGTERM)
        gone = pool.wait_event("exited", pid=pid, timeout=60)
    assert gone["signal"] in ("SIGTERM", "SIGKILL") and "sent by the supervisor" in gone["reason"]
    assert "OOM" not in gone["reason"]
