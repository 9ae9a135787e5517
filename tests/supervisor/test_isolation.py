"""Tenant and request isolation against a model that keeps every input in a module global."""

from __future__ import annotations

import concurrent.futures as cf
import random
from pathlib import Path

HOARDER = "isopool.examples.faulty:make_hoarder"


def run_mixed(pool, tenants: list[str], n: int, seed: int = 3) -> list[tuple[str, list]]:
    """n requests, tenants in random order, 16 in flight; returns (tenant, reply) pairs."""
    rng = random.Random(seed)
    order = [rng.choice(tenants) for _ in range(n)]
    with pool.client() as c, cf.ThreadPoolExecutor(16) as ex:
        futures = [(t, ex.submit(c.infer, {"tenant": t, "i": i}, tenant=t)) for i, t in enumerate(order)]
        return [(t, f.result(timeout=120)) for t, f in futures]


def leaks(results: list[tuple[str, list]]) -> int:
    return sum(1 for t, reply in results for seen in reply if seen["tenant"] != t)


def test_tenant_isolation_never_shows_one_tenant_another_tenants_inputs(start_pool):
    pool = start_pool("--workers", "2", "--model", HOARDER, "--isolation", "tenant")
    results = run_mixed(pool, ["alice", "bob"], 3000)
    assert len(results) == 3000 and leaks(results) == 0
    # and with three tenants on two workers, workers must be recycled to keep them apart
    results = run_mixed(pool, ["alice", "bob", "carol"], 150, seed=4)
    assert leaks(results) == 0
    assert pool.status()["pool"]["restarts_by_reason"].get("tenant", 0) >= 1


def test_without_isolation_the_same_run_leaks(start_pool):
    pool = start_pool("--workers", "2", "--model", HOARDER, "--isolation", "none")
    results = run_mixed(pool, ["alice", "bob"], 300)
    assert leaks(results) > 0  # what tenant isolation prevents: this test can fail


def test_request_isolation_gives_every_request_a_fresh_worker(start_pool):
    pool = start_pool("--workers", "2", "--model", HOARDER, "--isolation", "request")
    results = run_mixed(pool, ["alice", "bob"], 60)
    assert [len(reply) for _, reply in results] == [1] * 60  # each worker saw exactly one input
    # every worker that served is recycled; its recycle is counted once its exit is seen
    pool.wait_until(lambda s: s["pool"]["restarts_by_reason"].get("isolation", 0) >= 60, "recycled")
    # each exited worker's board is removed: no file per request piles up
    boards = list(Path(pool.endpoint.removeprefix("ipc://")).parent.glob("isopool-*/board.*"))
    assert 2 <= len(boards) <= 4, boards  # the live workers' (and a replacement starting)
