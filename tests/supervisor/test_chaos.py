"""Chaos: a random worker SIGKILLed about every 100 ms under load; nothing lost, nothing crossed."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import random
import signal
import threading
import time

import psutil

from isopool.errors import IsopoolError
from tests.helpers import assert_replaced

REQUESTS = 10_000  # at least this many requests...
MIN_KILLS = 30  # ...and on until this many kills have happened, however fast the pool is
MAX_REQUESTS = 200_000  # the bound on the run
IN_FLIGHT = 32


def test_chaos_sigkill_every_100ms(start_pool):
    pool = start_pool("--workers", "3", "--model", "isopool.examples.faulty:Faulty")
    sup = psutil.Process(pool.pid)
    rng = random.Random(1234)
    outcomes: dict[int, object] = {}
    kills: list[int] = []
    stop = threading.Event()

    def killer() -> None:
        while not stop.wait(0.1) and len(kills) < 500:
            # a pid already killed may still show as serving until its exit is read: kill each once
            pids = [w["pid"] for w in pool.workers() if w["state"] in ("idle", "busy") and w["pid"]
                    and w["pid"] not in kills]
            if pids:
                victim = rng.choice(pids)
                try:
                    os.kill(victim, signal.SIGKILL)
                    kills.append(victim)
                except ProcessLookupError:
                    pass

    with pool.client() as c:
        c.infer({"do": "ok"})  # connected: the baseline includes this client's socket
        fds_before = sup.num_fds()
        chaos = threading.Thread(target=killer)
        chaos.start()
        t0 = time.monotonic()
        pending: dict[cf.Future, int] = {}
        sent = 0
        try:
            def more() -> bool:
                return (sent < REQUESTS or len(kills) < MIN_KILLS) and sent < MAX_REQUESTS

            while more() or pending:
                while more() and len(pending) < IN_FLIGHT:
                    pending[c.submit({"do": "ok", "n": sent, "pad": "x" * (sent % 50)}, timeout=60)] = sent
                    sent += 1
                done, _ = cf.wait(list(pending), timeout=90, return_when=cf.FIRST_COMPLETED)
                assert done, "no request finished within 90s"
                for f in done:
                    n = pending.pop(f)
                    try:
                        outcomes[n] = f.result()
                    except IsopoolError as exc:
                        outcomes[n] = exc
        finally:
            stop.set()
            chaos.join(10)
        elapsed = time.monotonic() - t0
        # every kill seen and its worker replaced (the last kill may land just before the stop)
        status = pool.wait_until(lambda s: s["pool"]["restarts_total"] >= len(kills)
                                 and s["pool"]["workers_ready"] == 3
                                 and all(w["state"] == "idle" for w in s["workers"]), "ready")
        fds_after = sup.num_fds()

    assert len(outcomes) == sent >= REQUESTS  # every request resolved
    ok = {n: r for n, r in outcomes.items() if not isinstance(r, Exception)}
    for n, reply in ok.items():  # every success is the answer to its own input
        assert reply["echo"] == {"do": "ok", "n": n, "pad": "x" * (n % 50)}
    failures: dict[str, int] = {}
    for r in outcomes.values():
        if isinstance(r, Exception):
            failures[type(r).__name__] = failures.get(type(r).__name__, 0) + 1
    print(json.dumps({"requests": sent, "kills": len(kills), "ok": len(ok), "failures": failures,
                      "seconds": round(elapsed, 2), "restarts": status["pool"]["restarts_total"]}))
    assert len(kills) >= MIN_KILLS
    assert len(ok) >= 0.99 * sent, failures
    assert set(failures) <= {"WorkerCrashed"}, failures
    assert_replaced(status, {"crash": len(kills)})
    # no worker here starts a process: nothing is left behind, and no spare is taken for a stray
    assert "was left behind by a worker" not in pool.output()
    zombies = [p.pid for p in sup.children() if p.status() == psutil.STATUS_ZOMBIE]
    assert zombies == []
    assert fds_after == fds_before
