"""Dynamic batching: concurrent requests meet in one batch() call; a failing batch fails only its culprit."""

from __future__ import annotations

import concurrent.futures as cf

import pytest

from isopool.errors import RemoteError

BATCHED = "isopool.examples.batched:Doubler"


def test_concurrent_requests_are_batched_and_split_back(start_pool):
    pool = start_pool("--workers", "1", "--model", BATCHED, "--max-batch-size", "8", "--max-batch-wait-ms", "20")
    with pool.client() as c, cf.ThreadPoolExecutor(32) as ex:
        replies = list(ex.map(c.infer, range(200)))
        sizes = c.infer({"sizes": True})
    assert [r["x"] for r in replies] == [2 * i for i in range(200)]  # each its own result
    assert max(sizes) > 1 and max(sizes) <= 8  # batches formed, never above the limit
    assert sizes[-1] == 1 and sum(sizes[:-1]) == 200  # each ran exactly once (the last batch is the query)


def test_a_failing_batch_fails_only_its_culprit(start_pool):
    pool = start_pool("--workers", "1", "--model", BATCHED, "--max-batch-size", "8", "--max-batch-wait-ms", "50")
    with pool.client() as c:
        futures = [c.submit(x) for x in (1, 2, "bad", 3, 4)]
        results = []
        for f in futures:
            try:
                results.append(f.result(timeout=30)["x"])
            except RemoteError as err:
                results.append(err.remote_type)
    assert results == [2, 4, "ValueError", 6, 8]


def test_single_requests_still_work_without_concurrency(start_pool):
    pool = start_pool("--workers", "1", "--model", BATCHED, "--max-batch-wait-ms", "1")
    with pool.client() as c:
        assert c.infer(21) == {"x": 42, "batch": 1}
        with pytest.raises(RemoteError, match="cannot double"):
            c.infer("bad")
