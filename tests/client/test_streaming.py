"""Streaming: parts in order, early close stops the generator, a mid-stream crash is never silent."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading

import pytest

from isopool import AsyncClient
from isopool.errors import BadRequest, WorkerCrashed
from tests.helpers import ROOT, assert_replaced

STREAMING = "isopool.examples.streaming:Countdown"


def test_parts_arrive_in_order_and_complete(start_pool):
    pool = start_pool("--workers", "1", "--model", STREAMING)
    with pool.client() as c:
        parts = list(c.stream({"n": 20, "tag": "a"}))
        assert parts == [{"tag": "a", "i": i} for i in range(20)]
        assert c.infer({"stats": True}) == {"parts": 20, "closed_early": 0, "finished": 1}


def test_early_close_stops_the_generator_in_the_worker(start_pool):
    pool = start_pool("--workers", "1", "--model", STREAMING)
    with pool.client() as c:
        stream = c.stream({"n": 1000, "delay": 0.01})
        got = [next(stream) for _ in range(3)]
        stream.close()  # the consumer stops: the worker is told and closes the generator
        assert [p["i"] for p in got] == [0, 1, 2]
        stats = c.infer({"stats": True})  # served after the stream ended: one worker, in order
    assert stats["closed_early"] == 1 and stats["finished"] == 0
    assert stats["parts"] < 1000


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_reader_that_falls_far_behind_gets_overloaded_and_the_worker_is_freed(start_pool, kind):
    """Parts a reader has not taken wait in its client's memory: a reader that stops while the
    model goes on (10**8 parts, as fast as they come) would hold them without end. Past
    MAX_STREAM_BEHIND the stream is cancelled, in the worker too, and the reader gets the
    parts that came, then Overloaded."""
    from isopool.client.core import MAX_STREAM_BEHIND
    from isopool.errors import Overloaded

    pool = start_pool("--workers", "1", "--model", STREAMING)
    with pool.client() as other:
        if kind == "sync":
            with pool.client() as c:
                parts = c.stream({"n": 10**8})
                assert next(parts) == {"tag": None, "i": 0}
                # the only worker is free again only once the stream is cancelled
                assert other.infer({"stats": True}, timeout=60)["closed_early"] == 1
                got, err = 1, None
                try:
                    for _ in parts:
                        got += 1
                except Overloaded as e:
                    err = e
        else:
            async def run():
                async with AsyncClient(pool.endpoint) as c:
                    parts = c.stream({"n": 10**8})
                    assert await parts.__anext__() == {"tag": None, "i": 0}
                    stats = await asyncio.to_thread(other.infer, {"stats": True}, timeout=60)
                    assert stats["closed_early"] == 1
                    got = 1
                    try:
                        async for _ in parts:
                            got += 1
                    except Overloaded as e:
                        return got, e
                    return got, None
            got, err = asyncio.run(run())
    assert isinstance(err, Overloaded) and "behind" in str(err)
    assert got <= MAX_STREAM_BEHIND + 2


def test_crash_mid_stream_gives_the_parts_then_worker_crashed(start_pool):
    pool = start_pool("--workers", "2", "--model", STREAMING)
    got = []
    with pool.client() as c:
        with pytest.raises(WorkerCrashed) as info:
            for part in c.stream({"n": 10, "crash_after": 4, "tag": "x", "delay": 0.5}):
                got.append(part["i"])
    assert got == [0, 1, 2, 3]  # never a silent truncation, never retried after the first part
    assert info.value.exit_code == 3 and "streamed parts cannot be retried" in str(info.value)
    assert info.value.parts_delivered == 4 and "after 4 streamed part(s)" in str(info.value)
    assert_replaced(pool.status(), {"crash": 1})


def test_eight_concurrent_streams_on_two_workers_do_not_mix(start_pool):
    pool = start_pool("--workers", "2", "--model", STREAMING)
    results: dict[int, list] = {}
    with pool.client() as c:
        def consume(k: int) -> None:
            results[k] = list(c.stream({"n": 25, "tag": k, "delay": 0.001}))

        threads = [threading.Thread(target=consume, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert sorted(results) == list(range(8))
    for k, parts in results.items():
        assert parts == [{"tag": k, "i": i} for i in range(25)]


def test_async_stream_is_an_async_iterator(start_pool):
    pool = start_pool("--workers", "1", "--model", STREAMING)

    async def main() -> list:
        async with AsyncClient(pool.endpoint) as c:
            return [part["i"] async for part in c.stream({"n": 6})]

    assert asyncio.run(main()) == list(range(6))


def test_cli_infer_stream_prints_parts_as_lines(start_pool):
    pool = start_pool("--workers", "1", "--model", STREAMING)
    out = subprocess.run([sys.executable, "-m", "isopool.cli", "infer", "--endpoint", pool.endpoint, "--stream",
                          json.dumps({"n": 3, "tag": "t"})], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert [json.loads(line) for line in out.stdout.splitlines()] == [{"tag": "t", "i": i} for i in range(3)]


def test_infer_on_a_streaming_model_is_refused_before_any_part_runs(start_pool):
    pool = start_pool("--workers", "1", "--model", STREAMING)
    with pool.client() as c:
        with pytest.raises(BadRequest, match=r"streams its answers.*stream\(\)") as info:
            c.infer({"n": 5})
        assert info.value.setting == "stream"
        assert c.infer({"stats": True}) == {"parts": 0, "closed_early": 0, "finished": 0}  # nothing ran
    out = subprocess.run([sys.executable, "-m", "isopool.cli", "infer", "--endpoint", pool.endpoint, '{"n": 2}'],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "--stream" in out.stderr


def test_stream_on_a_plain_model_yields_its_answer_as_one_part(start_pool):
    pool = start_pool("--workers", "1", "--model", "isopool.examples.faulty:make_echo")
    with pool.client() as c:
        assert list(c.stream({"a": 1})) == [{"a": 1}]
        assert list(c.stream(None)) == [None]  # even an answer of None is a part

        async def main() -> list:
            async with AsyncClient(pool.endpoint) as a:
                return [p async for p in a.stream([1, 2])]

        assert asyncio.run(main()) == [[1, 2]]
    out = subprocess.run([sys.executable, "-m", "isopool.cli", "infer", "--endpoint", pool.endpoint, "--stream",
                          '{"b": 2}'], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0 and [json.loads(line) for line in out.stdout.splitlines()] == [{"b": 2}]
