"""Workers forked from the template (worker/template.py) serve, and so do their replacements;
the model is built after the fork unless --preload model (or auto, for a model that is safe
to build before it), which CUDA never gets."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
import pytest

from tests.helpers import ROOT, wait_gone

BUILT_WHERE = "isopool.examples.faulty:BuiltWhere"
TEMPLATE_MODULE = "isopool.worker.template"


def answers(pool, n: int) -> list[dict]:
    """One answer from each of the pool's n workers: rounds of 4n requests at once, which
    least-loaded dispatch spreads over them."""
    with pool.client() as c:
        pids = {w["pid"] for w in c.status()["workers"]}
        seen: dict[int, dict] = {}
        for _ in range(50):  # bounded
            for r in [f.result(timeout=30) for f in [c.submit(None) for _ in range(4 * n)]]:
                seen[r["pid"]] = r
            if set(seen) >= pids:
                return [seen[p] for p in sorted(pids)]
    raise AssertionError(f"not every worker answered: {sorted(seen)} of {sorted(pids)}")


def template_of(pool) -> psutil.Process:
    """The template: of the supervisor's children that are not workers, the first started
    (the other is its spare, a worker forked ahead of need)."""
    supervisor = psutil.Process(pool.pid)
    workers = set(pool.worker_pids())
    others = sorted((p for p in supervisor.children() if p.pid not in workers), key=lambda p: p.create_time())
    assert 1 <= len(others) <= 2, others
    template = others[0]
    assert TEMPLATE_MODULE in " ".join(template.cmdline())
    return template


def test_workers_are_forked_from_the_template_and_build_the_model_after_the_fork(start_pool):
    pool = start_pool("--workers", "2", "--model", BUILT_WHERE, "--preload", "imports")
    template = template_of(pool)
    for w in pool.worker_pids():
        proc = psutil.Process(w)
        assert proc.ppid() == pool.pid  # reparented to the supervisor, which reaps and watches it
        assert TEMPLATE_MODULE in " ".join(proc.cmdline()) and proc.pid != template.pid  # a fork, not an exec
    assert all(r["built_in"] == r["pid"] for r in answers(pool, 2))  # each built its own, after the fork


def test_a_replacement_is_forked_from_the_template_too_and_serves(start_pool):
    pool = start_pool("--workers", "1", "--model", BUILT_WHERE, "--preload", "imports")
    template = template_of(pool)
    [old] = pool.worker_pids()
    os.kill(old, signal.SIGKILL)
    pool.wait_event("ready", generation=2)
    [new] = pool.worker_pids()
    assert new != old and psutil.Process(new).ppid() == pool.pid
    assert TEMPLATE_MODULE in " ".join(psutil.Process(new).cmdline())
    assert template_of(pool).pid == template.pid  # the same template: nothing was imported again
    assert answers(pool, 1) == [{"built_in": new, "pid": new}]


def spare_of(pool) -> psutil.Process:
    supervisor = psutil.Process(pool.pid)
    workers = set(pool.worker_pids())
    template = template_of(pool)
    for _ in range(500):  # bounded: the template forks the next spare right after a spawn
        spares = [p for p in supervisor.children() if p.pid not in workers and p.pid != template.pid]
        if spares:
            return spares[0]
        pool.status()
    raise AssertionError("no spare")


def test_a_replacement_is_the_spare_forked_ahead_and_a_new_spare_follows(start_pool):
    """The template keeps one worker forked ahead of need: a replacement is that process,
    already our child, and the next spare is forked after it; neither is taken for a stray."""
    pool = start_pool("--workers", "1", "--model", BUILT_WHERE)
    spare = spare_of(pool)
    assert spare.ppid() == pool.pid and TEMPLATE_MODULE in " ".join(spare.cmdline())
    [old] = pool.worker_pids()
    os.kill(old, signal.SIGKILL)
    pool.wait_event("ready", generation=2)
    assert pool.worker_pids() == [spare.pid]
    following = spare_of(pool)
    assert following.pid not in (spare.pid, old)
    assert answers(pool, 1)[0]["pid"] == spare.pid
    assert "left behind" not in pool.output()
    assert pool.terminate() == 0  # and at the stop, the stopped template's spare is ended, as ours
    assert "left behind" not in pool.output()
    assert wait_gone([following.pid], 15) == []


def test_preload_model_builds_the_model_once_in_the_template(start_pool):
    pool = start_pool("--workers", "2", "--model", BUILT_WHERE, "--preload", "model")
    template = template_of(pool)
    replies = answers(pool, 2)
    assert {r["built_in"] for r in replies} == {template.pid}  # built before the fork, shared by both
    assert len({r["pid"] for r in replies}) == 2


@pytest.mark.parametrize("model, preloaded", [(BUILT_WHERE, True), ("isopool.examples.faulty:BuiltWhereFor", False),
                                             ("isopool.examples.faulty:BuiltWhereNotForkSafe", False)])
def test_preload_auto_builds_before_the_fork_only_a_model_that_is_safe_to(start_pool, model, preloaded):
    """The default: a model that takes no context (or says fork_safe = True) is built once in
    the template; one that takes its worker's context, or says fork_safe = False, after the fork."""
    pool = start_pool("--workers", "2", "--model", model)
    template = template_of(pool)
    replies = answers(pool, 2)
    if preloaded:
        assert {r["built_in"] for r in replies} == {template.pid}
    else:
        assert all(r["built_in"] == r["pid"] for r in replies)
    assert pool.status()["pool"]["template_preload"] == ("model" if preloaded else "imports")


def test_preload_none_starts_each_worker_as_a_fresh_interpreter(start_pool):
    pool = start_pool("--workers", "1", "--model", BUILT_WHERE, "--preload", "none")
    [w] = pool.worker_pids()
    assert TEMPLATE_MODULE not in " ".join(psutil.Process(w).cmdline())
    assert answers(pool, 1) == [{"built_in": w, "pid": w}]


@pytest.mark.parametrize("devices", ["auto", "cuda:0", "cpu,cuda"])
def test_a_cuda_device_never_gets_a_model_built_before_the_fork(devices):
    # the one mode that builds the model in the template is refused for any device list
    # that may hold a GPU, before any process starts; --preload imports builds after the fork
    out = subprocess.run([sys.executable, "-m", "isopool.cli", "serve", "--devices", devices, "--preload", "model",
                          "--print-config"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2 and "CUDA cannot survive fork" in out.stderr, out.stderr
