"""What a compromised model cannot do, tried by a real hostile model (examples/hostile.py)."""

from __future__ import annotations

import glob

from tests.helpers import Background

HOSTILE = "isopool.examples.hostile:Hostile"


def test_a_model_that_impersonates_another_worker_is_refused_and_forges_nothing(start_pool, short_tmp):
    """Without the sandbox: a worker kills another and connects to the backend as its next
    process (the identity an older isopool gave it, and with a guessed token). The real
    replacement takes the slot, no request is answered by the impostor, the attempt is counted."""
    pool = start_pool("--workers", "2", "--model", HOSTILE)
    backend = "ipc://" + glob.glob(f"{pool.tmp}/isopool-*/backend.sock")[0]
    workers = pool.all_ready()["workers"]
    with pool.client() as attacker, pool.client() as victim_client, Background(victim_client) as bg:
        by = attacker.infer({"n": -1})["pid"]  # which worker the attack request lands on, most likely
        target = next(w for w in workers if w["pid"] != by)
        result = attacker.infer({"attack": "impersonate", "backend": backend, "slot": target["slot"],
                                 "generation": target["generation"] + 1, "victim": target["pid"], "seconds": 2},
                                timeout=60)
        pool.wait_event("ready", worker=target["id"], timeout=60)
        answers = [victim_client.infer({"n": i}) for i in range(200)]
    assert result["received"] == 0  # the supervisor sent the impostor nothing to answer
    assert all(a["echo"] == {"n": i} and "forged" not in a for i, a in enumerate(answers))
    assert bg.failed == [] and bg.ok > 0
    status = pool.status()
    pids = {w["pid"] for w in status["workers"]}
    assert all(a["pid"] in pids for a in answers)  # every answer came from a worker the supervisor started
    assert status["pool"]["intruders"] >= 1 and status["pool"]["backend_strangers"] >= 1
    assert "claimed worker" in pool.output() and "no worker of ours" in pool.output()
