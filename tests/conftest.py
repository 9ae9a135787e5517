"""Fixtures: real supervisors, real workers, real sockets. A test that leaks a process fails."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import psutil
import pytest

from tests.helpers import PoolProc


@pytest.fixture
def short_tmp():
    """ipc:// paths must stay under ~107 bytes, so not pytest's long tmp_path."""
    path = Path(tempfile.mkdtemp(prefix="iso-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_pool(short_tmp):
    pools: list[PoolProc] = []

    def start(*args: str, wait: bool = True, env: dict | None = None, **kw) -> PoolProc:
        sub = short_tmp / str(len(pools))
        sub.mkdir(mode=0o700)
        pool = PoolProc(sub, list(args), env, **kw)
        pools.append(pool)
        if wait:
            pool.wait_ready()
        return pool

    yield start
    for pool in pools:
        pool.close()


@pytest.fixture
def pool(start_pool):
    """Two workers of the built-in default model."""
    return start_pool("--workers", "2")


@pytest.fixture
def faulty(start_pool):
    """Two workers of the faulty handler, quick to time out and quick to kill."""
    return start_pool("--workers", "2", "--model", "isopool.examples.faulty:Faulty", "--kill-grace", "1")


@pytest.fixture(autouse=True)
def no_leaked_processes():
    """Fail a test that leaves a child process (supervisor or worker) behind."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    leftover = [p for p in me.children(recursive=True) if p.pid not in before and not _under(p, before)]
    gone, alive = psutil.wait_procs(leftover, timeout=10)
    for p in alive:
        p.kill()
    assert not alive, f"processes left behind: {[(p.pid, p.name()) for p in alive]}"


def _under(proc: psutil.Process, pids: set[int]) -> bool:
    """Whether `proc` descends from one of `pids`: a module-scoped pool's, started before the test
    (its template forks a new spare whenever it likes)."""
    try:
        return any(p.pid in pids for p in proc.parents())
    except psutil.NoSuchProcess:
        return False
