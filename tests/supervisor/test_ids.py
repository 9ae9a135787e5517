"""Worker ids: 0..N-1 as a model author expects (to pick a GPU or a shard), the same across
restarts, recycling, reload and scaling; the generation tells replacements apart."""

from __future__ import annotations

import os
import signal

from tests.helpers import wait_gone

WHERE = "isopool.examples.faulty:WhereAmI"


def ids(status: dict) -> list[int]:
    return sorted(w["id"] for w in status["workers"])


def seen_by_models(pool, status: dict) -> None:
    """Each worker's own context.worker_id and generation equal what status says of it."""
    by_pid = {w["pid"]: w for w in status["workers"]}
    with pool.client() as c:
        for _ in range(20):
            where = c.infer("where")
            w = by_pid[where["pid"]]
            assert (where["worker"], where["generation"]) == (w["id"], w["generation"])


def test_ids_stay_0_to_n_minus_1_across_reload_restart_and_scale(start_pool):
    pool = start_pool("--workers", "3", "--model", WHERE)
    first = pool.all_ready()
    assert ids(first) == [0, 1, 2] and all(w["generation"] == 1 for w in first["workers"])
    seen_by_models(pool, first)

    before = {w["pid"] for w in first["workers"]}
    with pool.client() as c:
        c.reload()
    reloaded = pool.wait_until(lambda s: not (before & {w["pid"] for w in s["workers"]})
                               and s["pool"]["workers_ready"] == 3 and len(s["workers"]) == 3, "recycled", timeout=60)
    # each was replaced: a later generation, not necessarily the second (on a loaded host a
    # replacement may crash, miss its heartbeat or fail to start, and its id takes the next
    # one); a failure says which, by each worker's restarts, last exit and last error
    assert ids(reloaded) == [0, 1, 2] and all(w["generation"] >= 2 for w in reloaded["workers"]), \
        [(w["id"], w["generation"], w.get("restarts"), w.get("last_exit"), w.get("last_error")) for w in reloaded["workers"]]
    assert wait_gone(list(before), 10) == []
    seen_by_models(pool, reloaded)

    victim = next(w for w in reloaded["workers"] if w["id"] == 1)
    os.kill(victim["pid"], signal.SIGKILL)
    restarted = pool.wait_until(lambda s: victim["pid"] not in {w["pid"] for w in s["workers"]}
                                and s["pool"]["workers_ready"] == 3, "ready", timeout=60)
    again = next(w for w in restarted["workers"] if w["id"] == 1)
    assert ids(restarted) == [0, 1, 2] and again["generation"] == victim["generation"] + 1
    assert again["restarts"] == victim["restarts"] + 1

    with pool.client() as c:
        c.scale(5)
        grown = pool.wait_until(lambda s: s["pool"]["workers_ready"] == 5, "ready", timeout=60)
        assert ids(grown) == [0, 1, 2, 3, 4]
        c.scale(2)
        shrunk = pool.wait_until(lambda s: len(s["workers"]) == 2, "exited", timeout=60)
    assert ids(shrunk) == [0, 1]
    seen_by_models(pool, shrunk)
