"""Everything a worker starts dies with it, on every exit path: even a grandchild that calls
setsid() (leaving the worker's process group) and ignores SIGTERM."""

from __future__ import annotations

import time

import psutil
import pytest

FAULTY = "isopool.examples.faulty:Faulty"


def _gone(pid: int, within: float) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                time.sleep(0.05)
                continue
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def _read_pid(path) -> int:
    for _ in range(200):
        if path.exists():
            return int(path.read_text())
        time.sleep(0.05)
    raise AssertionError("the grandchild never said who it is")


@pytest.mark.parametrize("path", ["crash", "timeout", "recycle", "stop"])
def test_a_setsid_grandchild_that_ignores_sigterm_dies_with_its_worker(start_pool, short_tmp, path):
    extra = ("--max-requests", "1") if path == "recycle" else ()
    pool = start_pool("--workers", "1", "--model", FAULTY, "--kill-grace", "0.5", "--stats-interval", "0.2", *extra)
    pidfile = short_tmp / f"grandchild.{path}"
    then = {"crash": "exit", "timeout": "hang"}.get(path, "stay")
    with pool.client() as c:
        try:
            c.infer({"do": "leave", "pidfile": str(pidfile), "then": then}, timeout=6 if path == "timeout" else 30,
                    retry=False)
        except Exception:  # noqa: BLE001 - the crash and the timeout are the point
            pass
        grandchild = _read_pid(pidfile)
        assert psutil.pid_exists(grandchild)
        if path == "stop":
            c.stop()
    # TERM is ignored; the KILL comes after --kill-grace, at the next look (every --stats-interval)
    assert _gone(grandchild, within=20), f"the grandchild of a worker outlived it ({path})"
    if path != "stop":
        with pool.client() as c:
            assert c.infer({"do": "ok"})["echo"] == {"do": "ok"}
