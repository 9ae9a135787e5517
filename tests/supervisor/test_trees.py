"""Everything a worker starts dies with it, on every exit path: even a grandchild that calls
setsid() (leaving the worker's process group) and ignores SIGTERM."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from isopool.supervisor import spawner

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


def test_the_process_tree_read_from_proc_children_is_psutils(tmp_path):
    """spawner.children() reads /proc/PID/task/TID/children instead of every process on the
    host; on a real tree (children of the main thread and of another that lives on,
    grandchildren, one child that came and went) it finds what psutil finds."""
    script = tmp_path / "tree.py"
    script.write_text(
        "import subprocess, sys, threading\n"
        "grand = ('import subprocess; kids = [subprocess.Popen([\"sleep\", \"30\"]) for _ in range(2)]; '\n"
        "         'print(\"up\", flush=True); kids[0].wait()')\n"
        "parent = subprocess.Popen([sys.executable, '-c', grand], stdout=subprocess.PIPE, text=True)\n"
        "parent.stdout.readline()\n"  # its two children exist
        "forked = threading.Event()\n"  # a child of a thread that lives on is listed under that thread
        "threading.Thread(target=lambda: (subprocess.Popen(['sleep', '30']), forked.set(),\n"
        "                                 threading.Event().wait()), daemon=True).start()\n"
        "forked.wait()\n"
        "subprocess.run(['true'])\n"
        "print('up', flush=True)\n"
        "sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        root = psutil.Process(proc.pid)
        for recursive, size in ((False, 2), (True, 4)):
            expected = sorted(p.pid for p in root.children(recursive=recursive))
            assert len(expected) == size
            assert sorted(p.pid for p in spawner.children(root, recursive=recursive)) == expected
    finally:
        for p in psutil.Process(proc.pid).children(recursive=True):
            p.kill()
        proc.kill()
        proc.wait(10)
