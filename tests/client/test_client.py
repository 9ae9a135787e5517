"""Clients against a live pool: right answers, no crossed replies, typed errors."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest
import torch

from isopool import AsyncClient, Client, Limits
from isopool.client.iothread import DIRECT_SOCKETS
from isopool.errors import BadRequest, RemoteError, Unavailable
from isopool.models.default import DefaultModel


def test_results_equal_the_model_in_process(pool):
    model = DefaultModel()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 16)).astype(np.float32)
    with pool.client() as c:
        np.testing.assert_allclose(c.infer(x), model(x), rtol=1e-6)
        t = torch.from_numpy(x.copy())
        out = c.infer(t)
        np.testing.assert_allclose(out, model(t), rtol=1e-6)
        assert c.infer(x[0].tolist()).shape == (4,)


def test_sixteen_threads_share_one_client_without_crossed_replies(start_pool):
    pool = start_pool("--workers", "2", "--model", "isopool.examples.faulty:make_echo")
    errors: list[str] = []
    done = [0] * 16
    with pool.client() as c:
        def worker(t: int) -> None:
            for i in range(500):
                key = f"{t}:{i}"
                reply = c.infer({"k": key, "v": t * 1000 + i})
                if reply != {"k": key, "v": t * 1000 + i}:
                    errors.append(f"{key} got {reply}")
                done[t] += 1

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        assert not any(th.is_alive() for th in threads)
    assert errors == []
    assert done == [500] * 16
    assert pool.status()["pool"]["outcomes"]["ok"] == 8000


def test_futures_resolve_each_to_its_own_input(pool):
    with pool.client() as c:
        xs = [np.full(16, i, dtype=np.float32) for i in range(200)]
        futures = [c.submit(x) for x in xs]
        assert all(isinstance(f, Future) for f in futures)
        model = DefaultModel()
        for x, f in zip(xs, futures):
            np.testing.assert_allclose(f.result(timeout=30), model(x), rtol=1e-6)


def test_async_client_thousand_concurrent(start_pool):
    pool = start_pool("--workers", "2", "--model", "isopool.examples.faulty:make_echo")

    async def main() -> list:
        async with AsyncClient(pool.endpoint) as c:
            replies = await asyncio.gather(*(c.infer({"i": i, "a": np.arange(i % 7)}) for i in range(1000)))
            status = await c.status()
            return replies, status

    replies, status = asyncio.run(main())
    for i, r in enumerate(replies):
        assert r["i"] == i and r["a"].tolist() == list(range(i % 7))
    assert status["pool"]["workers_ready"] == 2


def test_handler_exception_is_a_remote_error_and_the_worker_keeps_serving(faulty):
    with faulty.client() as c:
        pid = c.infer({"do": "ok"})["pid"]
        # pin the next requests to that worker: with one worker left busy the other serves
        with pytest.raises(RemoteError) as info:
            c.infer({"do": "raise", "tag": "t1"})
        err = info.value
        assert err.remote_type == "ValueError" and "bad input 't1'" in str(err)
        assert "Traceback" in err.traceback and "faulty.py" in err.traceback
        assert "faulty.py" in str(err.__cause__)
        pids_after = {c.infer({"do": "ok"})["pid"] for _ in range(20)}
    workers = faulty.workers()
    assert {w["pid"] for w in workers} >= pids_after and pid in {w["pid"] for w in workers}
    assert sum(w["errors"] for w in workers) == 1
    assert all(w["restarts"] == 0 for w in workers)


def test_a_failed_call_lets_go_of_its_request_at_once(faulty):
    """An error's traceback holds the frames it passed through; none of them may hold the error
    again, or the cycle keeps the request (its array, or a gateway's whole HTTP body) until a
    full collection, which large bytes alone never set off (a hostile pass saw a gateway grow
    by 163 MiB a refused request). With the collector off, each request is gone once its
    error is handled: sync (one thread's own socket, and a queued call) and asyncio."""
    def sent(call) -> weakref.ref:
        x = np.ones(1 << 18, dtype=np.float32)  # 1 MiB: as frames, below --shm-threshold
        with pytest.raises(RemoteError):
            call({"do": "raise", "a": x})
        return weakref.ref(x)

    async def through_async() -> list[weakref.ref]:
        async with AsyncClient(faulty.endpoint) as ac:
            return [await one(ac) for _ in range(3)]

    async def one(ac) -> weakref.ref:
        x = np.ones(1 << 18, dtype=np.float32)
        with pytest.raises(RemoteError):
            await ac.infer({"do": "raise", "a": x})
        return weakref.ref(x)

    gc.collect()
    gc.disable()
    try:
        with faulty.client() as c:
            refs = [sent(c.infer) for _ in range(3)]
            refs += [sent(lambda x: c.submit(x).result(timeout=30)) for _ in range(3)]
            with ThreadPoolExecutor(DIRECT_SOCKETS + 2) as many:  # past the direct sockets: queued calls
                refs += list(many.map(lambda _: sent(c.infer), range(2 * DIRECT_SOCKETS)))
        refs += asyncio.run(through_async())
        assert [r() for r in refs if r() is not None] == []
    finally:
        gc.enable()


def test_no_supervisor_is_unavailable_at_once_naming_the_endpoint_and_the_causes(short_tmp):
    endpoint = f"ipc://{short_tmp}/nobody.sock"
    with Client(endpoint) as c:
        for call in (lambda: c.infer([0.0] * 16), lambda: c.submit([0.0]).result(10), c.status):
            with pytest.raises(Unavailable, match="no isopool supervisor answered at") as info:
                call()
            assert endpoint in str(info.value) and "isopool serve" in str(info.value)


def test_the_async_client_finds_no_supervisor_at_once_too(short_tmp):
    async def main() -> None:
        async with AsyncClient(f"ipc://{short_tmp}/nobody.sock") as c:
            with pytest.raises(Unavailable, match="no isopool supervisor answered"):
                await asyncio.wait_for(c.infer([0.0]), 10)

    asyncio.run(main())


def test_a_stopped_supervisor_is_unavailable_at_once(start_pool):
    pool = start_pool("--workers", "1", "--model", "isopool.examples.faulty:make_echo")
    with Client(pool.endpoint, timeout=30) as c:
        assert c.infer(1) == 1
        pool.terminate()
        for _ in range(2):  # whether the drop was seen yet or not, never the 30 s timeout
            with pytest.raises(Unavailable):
                c.infer(2)


def test_closed_client_refuses_work(pool):
    c = pool.client(timeout=5)
    c.close()
    with pytest.raises(Unavailable):
        c.infer([0.0] * 16)


def test_cancelling_a_queued_future_withdraws_the_request(start_pool, tmp_path):
    pool = start_pool("--workers", "1", "--model", "isopool.examples.faulty:Faulty", "--prefetch", "1")
    gate = tmp_path / "gate"
    with pool.client() as c:
        running = c.submit({"do": "wait", "path": str(gate), "s": 30})  # holds the worker until the gate opens
        queued = c.submit({"do": "ok"})  # prefetch 1: it waits in the supervisor's queue
        assert queued.cancel() and queued.cancelled()
        status = c.status()  # after the CANCEL on this connection, so it is counted
        gate.touch()
        assert running.result(timeout=30)["echo"]["do"] == "wait"
    assert status["pool"]["outcomes"].get("cancelled") == 1
    assert sum(w["requests"] for w in pool.workers()) == 1  # the cancelled one never ran


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_async_client_that_fails_to_start_leaves_nothing_open(short_tmp):
    """A constructor that fails half-way (a bad key file) releases its context and sockets."""
    bad = short_tmp / "bad.key_secret"
    bad.write_text("not a key")
    asyncio.run(AsyncClient(f"ipc://{short_tmp}/x.sock").close())  # first use opens what imports keep
    before = _open_fds()
    for _ in range(5):
        with pytest.raises((ValueError, OSError)):
            AsyncClient(f"ipc://{short_tmp}/x.sock", curve_secret_key=str(bad), curve_server_key=str(bad))
    assert _open_fds() <= before


def test_async_client_has_the_control_ops_of_the_sync_client(start_pool):
    pool = start_pool("--workers", "1")

    async def main() -> tuple:
        async with AsyncClient(pool.endpoint) as c:
            return await c.scale(2), await c.reload()

    scaled, reloaded = asyncio.run(main())
    assert {"workers_target": 2, "previous": 1}.items() <= scaled.items() and reloaded["reloading"] >= 1
    assert pool.status()["pool"]["workers_target"] == 2


def test_a_client_decodes_within_its_own_limits_and_names_its_own_setting(start_pool):
    """What a client decodes is bounded by its own limits (Client(limits=...)), not the
    server's: a reply past them fails that call alone, and the hint names the client option."""
    pool = start_pool("--workers", "1", "--model", "isopool.examples.faulty:make_echo")
    with Client(pool.endpoint, limits=Limits(max_elements=100), timeout=30) as c:
        with pytest.raises(BadRequest, match=r"max_elements=100 .*Client\(limits=Limits\(max_elements") as info:
            c.infer(list(range(500)))
        assert info.value.setting == "max_elements"
        assert c.infer(list(range(50))) == list(range(50))  # the same connection serves on
    with pool.client() as default:
        assert default.infer(list(range(500))) == list(range(500))


def test_the_hello_answer_gives_the_servers_limits(start_pool):
    pool = start_pool("--workers", "1", "--model", "isopool.examples.faulty:make_echo", "--max-message-bytes", "3MiB")
    with pool.client() as c:
        assert c.infer(1) == 1
        assert c._session.limits_known.wait(10)
        assert c._session.limits.max_message_bytes == 3 << 20 and c._session.limits.holder == "server"
        assert c._session.decode_limits.holder == "client"


def test_answer_types_and_writability_are_as_documented(start_pool):
    """numpy in, numpy out (a read-only view, or a writable copy with writable=True); a
    torch answer stays torch (always writable) unless arrays="numpy"."""
    pool = start_pool("--workers", "1", "--model", "isopool.examples.faulty:Faulty")
    x = np.arange(6.0).reshape(2, 3)
    with pool.client() as c:
        y = c.infer({"a": x})["echo"]["a"]
        assert type(y) is np.ndarray and not y.flags.writeable
        t = c.infer({"do": "tensor", "n": 3})
        assert isinstance(t, torch.Tensor)
        t += 1  # torch answers are writable
        assert t.tolist() == [1.0, 2.0, 3.0]
    with pool.client(writable=True) as c:
        y = c.infer({"a": x})["echo"]["a"]
        y += 1
        assert y.tolist() == (x + 1).tolist()
    with pool.client(arrays="numpy") as c:
        assert type(c.infer({"do": "tensor", "n": 2})) is np.ndarray

    async def main() -> bool:
        async with AsyncClient(pool.endpoint, writable=True) as a:
            z = (await a.infer({"a": x}))["echo"]["a"]
            return z.flags.writeable

    assert asyncio.run(main())


def test_a_model_gets_read_only_numpy_or_with_arrays_torch_writable_tensors(start_pool):
    x = np.arange(4.0)
    plain = start_pool("--workers", "1", "--model", "isopool.examples.faulty:Faulty")
    with plain.client() as c:
        assert c.infer({"do": "kind", "a": x}) == {"type": "numpy.ndarray", "writable": False}
    as_torch = start_pool("--workers", "1", "--model", "isopool.examples.faulty:Faulty", "--arrays", "torch")
    with as_torch.client() as c:
        assert c.infer({"do": "kind", "a": x}) == {"type": "torch.Tensor", "writable": True}
    assert "not writable" not in as_torch.output()  # torch's warning about read-only arrays
