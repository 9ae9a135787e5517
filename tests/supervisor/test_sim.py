"""The deterministic simulation of the supervisor's core (supervisor/sim.py): many seeds,
each checked after every step, and proof that the checks bite when a rule is broken."""

from __future__ import annotations

import pytest

from isopool.protocol.contract import parse_ident
from isopool.supervisor import admission, answers, sim
from isopool.supervisor.ledger import Ledger
from isopool.supervisor.policy import RestartPolicy

SEEDS = 2000  # 12 s on a quiet day of the 2-core guest, 30 s on a busy one; CI runs them all


def test_every_seed_keeps_every_guarantee():
    failures = []
    for seed in range(SEEDS):
        try:
            sim.run_seed(seed)
        except sim.Violation as exc:
            failures.append(str(exc))
    assert not failures, f"{len(failures)} of {SEEDS} seeds failed; the first:\n{failures[0]}"


def test_a_seed_replays_exactly():
    a, b = sim.run_seed(7), sim.run_seed(7)
    assert a.summary() == b.summary() and a.now == b.now
    assert a.summary()["accepted"] > 0


def test_the_replay_command_runs_one_seed(capsys):
    assert sim.main(["--seed", "3", "--steps", "50"]) == 0
    assert "1 passed, 0 failed" in capsys.readouterr().out


def _lose_requeued(self, req):  # a crash's innocent bystanders are dropped, not requeued
    req.worker = None


def _any_generation(core, ident):  # a message from a slot's dead process counts as its current one's
    parsed = parse_ident(ident)
    return core.workers.get(parsed[0]) if parsed else None


def _any_attempt(core, w, op, header, body, now, _real=answers.on_reply):
    rid = header.get("id")
    req = core.ledger.get((rid[0], rid[1])) if isinstance(rid, list) and len(rid) == 2 else None
    if req is not None and req.worker == w.slot:
        header = {**header, "attempt": req.attempt}  # as if the attempt were not checked
    return _real(core, w, op, header, body, now)


def _no_backoff(self, crashes_in_row):
    return 0.0


def _accept_while_draining(core, ident, header, body, now, _real=admission.accept):
    phase = core.phase
    try:
        core.phase = sim.Phase.SERVING
        _real(core, ident, header, body, now)
    finally:
        core.phase = phase


BROKEN_RULES = {
    "requeue drops the request": (Ledger, "requeue", _lose_requeued),
    "answers from a dead process or an old attempt are relayed": [(answers, "worker_of", _any_generation),
                                                                  (answers, "on_reply", _any_attempt)],
    "a crash never waits for a backoff": (RestartPolicy, "delay", _no_backoff),
    "a draining pool still accepts": (admission, "accept", _accept_while_draining),
}


@pytest.mark.parametrize("rule", sorted(BROKEN_RULES))
def test_a_broken_rule_is_caught(rule, monkeypatch):
    patches = BROKEN_RULES[rule]
    for owner, name, replacement in patches if isinstance(patches, list) else [patches]:
        monkeypatch.setattr(owner, name, replacement)
    for seed in range(400):
        try:
            sim.run_seed(seed)
        except sim.Violation as exc:
            assert "replay: python -m isopool.supervisor.sim --seed" in str(exc)
            return
    pytest.fail(f"no seed of 400 noticed that {rule}")
