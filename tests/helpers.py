"""Driving a real `isopool serve` from tests.

A pool is started as `python -m isopool.cli serve` and is ready when it says READY=1 on
a NOTIFY_SOCKET (the sd_notify protocol), never after a sleep. Tests wait for pool changes
on its event stream (PoolProc.wait_event), again never on a sleep.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import psutil
import zmq

from isopool import Client
from isopool.errors import Unavailable

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 60.0
SUBSCRIBE_TIMEOUT_S = 15.0


class PoolProc:
    """One `isopool serve` process under test."""

    def __init__(self, tmp: Path, args: list[str], env: dict | None = None, endpoint: str | None = None,
                 client_kw: dict | None = None, fd_limit: int | None = None, prefix: list[str] | None = None):
        self.tmp = tmp
        self.endpoint = endpoint or f"ipc://{tmp}/pool.sock"
        self.client_kw = client_kw or {}
        self.log_path = tmp / "serve.log"
        notify_path = str(tmp / "notify.sock")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(notify_path)
        full_env = {**os.environ, "NOTIFY_SOCKET": notify_path, "PYTHONUNBUFFERED": "1", **(env or {})}
        full_env.pop("ISOPOOL_ENDPOINT", None)
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "isopool.cli", "serve", "--endpoint", self.endpoint, *args],
            stdout=self.log, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT, stdin=subprocess.DEVNULL,
            preexec_fn=None if fd_limit is None else lambda: _limit_files(fd_limit),
        )
        self.ctx = zmq.Context.instance()
        self.sub: zmq.Socket | None = None
        self._client: Client | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"isopool serve exited with {self.proc.returncode}:\n{self.output()}")
            r, _, _ = select.select([self.notify], [], [], 0.2)
            if r and b"READY=1" in self.notify.recv(4096):
                if self.endpoint.startswith("ipc://"):
                    self.subscribe()
                return
        raise AssertionError(f"pool not ready within {timeout}s:\n{self.output()}")

    def subscribe(self) -> None:
        """Follow the event stream from now on (connect before acting, read after). Subscribed
        already, what came before is dropped: a second subscription could not be told apart from
        the first in event_subscribers, and events published before it connected would be lost."""
        if getattr(self, "sub", None) is not None:
            for _ in range(100_000):  # bounded: what is queued now
                if not self.sub.poll(0):
                    break
                self.sub.recv_multipart()
            return
        ev = self.endpoint + ".events"
        self.sub = self.ctx.socket(zmq.SUB)
        self.read_events: list[dict] = []
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(ev)
        # Events published before the subscription reaches the supervisor are lost; its
        # XPUB sees the subscription arrive, and status reports it. Bounded in round trips and
        # in time: on a loaded host 200 quick round trips could pass before the connection's
        # handshake (CI saw it once, beside a gateway starting).
        end = time.monotonic() + SUBSCRIBE_TIMEOUT_S
        for _ in range(100_000):
            if self.status()["pool"]["event_subscribers"] > 0:
                return
            if time.monotonic() > end:
                break
        raise AssertionError(f"the event subscription did not reach the supervisor within {SUBSCRIBE_TIMEOUT_S} s")

    def wait_answering(self, timeout: float = START_TIMEOUT) -> dict:
        """The first status the supervisor answers, once it listens; its workers may still be
        loading (a pool started with wait=False). A client gives a supervisor that is not
        there yet a second (CONNECT_S) before it says Unavailable: on a loaded host the
        daemon's start can take longer, so each try waits on the connection again."""
        end = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"isopool serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with self.client() as c:
                    return c.status()
            except Unavailable:
                if time.monotonic() > end:
                    raise

    def client(self, **kw: Any) -> Client:
        """A new client; use it in a `with` block."""
        return Client(self.endpoint, **{"timeout": 30.0, **self.client_kw, **kw})

    def status(self) -> dict:
        if self._client is None:
            self._client = Client(self.endpoint, timeout=30, **self.client_kw)
        return self._client.status()

    def workers(self) -> list[dict]:
        return self.status()["workers"]

    def running(self, pred: Callable[[dict], bool] = lambda w: True, tries: int = 20_000,
                timeout: float = 30.0) -> int:
        """The pid of a worker that holds a request (status polled, bounded in count and in
        time: on a loaded host 500 round trips could pass before a request began)."""
        end = time.monotonic() + timeout
        workers: list[dict] = []
        for _ in range(tries):
            workers = self.workers()
            for w in workers:
                if w["in_flight"] and w["pid"] and pred(w):
                    return w["pid"]
            if time.monotonic() > end:
                break
        raise AssertionError(f"no worker picked up the request; last seen: {workers}")

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.workers() if w["pid"]]

    def wait_event(self, kind: str, timeout: float = 30.0, **match: Any) -> dict:
        """Block until an event of `kind` whose fields include `match` arrives."""
        assert self.sub is not None, "call subscribe() first"
        end = time.monotonic() + timeout
        seen = []
        while time.monotonic() < end:
            if self.sub.poll(int(max(0.0, end - time.monotonic()) * 1000) + 1):
                _, data = self.sub.recv_multipart()
                event = json.loads(data)
                seen.append(event)
                self.read_events = [*self.read_events[-999:], event]
                if event["kind"] == kind and all(event.get(k) == v for k, v in match.items()):
                    return event
        raise AssertionError(f"no {kind} event {match} within {timeout}s; saw {seen}\n{self.output()[-3000:]}")

    def saw(self, kind: str) -> list[dict]:
        """The events of `kind` that wait_event has read (and passed over) so far."""
        return [e for e in self.read_events if e["kind"] == kind]

    def wait_until(self, predicate: Callable[[dict], bool], kind: str, timeout: float = 30.0) -> dict:
        """Wait on events of `kind` until predicate(status) holds."""
        end = time.monotonic() + timeout
        while True:
            status = self.status()
            if predicate(status):
                return status
            self.wait_event(kind, timeout=max(0.1, end - time.monotonic()))

    def all_ready(self, n: int | None = None) -> dict:
        return self.wait_until(lambda s: s["pool"]["workers_ready"] >= (n or s["pool"]["workers_target"])
                               and all(w["state"] in ("idle", "busy") for w in s["workers"]), "ready")

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"isopool serve ignored SIGTERM for {timeout}s:\n{self.output()[-3000:]}")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.sub is not None:
            self.sub.close(linger=0)
            self.sub = None
        try:
            if self.proc.poll() is None:
                self.terminate()
        finally:
            self.notify.close()
            self.log.close()


# Replacements that count as restarts (supervisor/blame.py FAILURES). Counted by reason, a
# test says exactly which it caused; a failure prints each worker's last exit, so an extra
# one names itself (that is how the spare taken for a stray was found: supervisor/processes.py)
FAILURE_REASONS = frozenset({"crash", "timeout", "protocol", "load_max_rss", "heartbeat", "start_timeout"})


def assert_replaced(status: dict, expected: dict[str, int], model: str | None = None) -> None:
    """The workers replaced for failing, by reason, are exactly `expected` (of the whole pool,
    or of `model`)."""
    of = status["pool"] if model is None else status["models"][model]
    by_reason = of["restarts_by_reason"]
    caused = {k: n for k, n in by_reason.items() if n and k in FAILURE_REASONS}
    exits = [(w["id"], w.get("model"), w["generation"], w["last_exit"]) for w in status["workers"]]
    assert caused == expected, (by_reason, exits)


def _limit_files(n: int) -> None:
    """In the child before exec: soft and hard RLIMIT_NOFILE both n, as on a host that allows no more."""
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))


def pid_exists(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait (on the processes, via psutil) until none of pids exists; return those still alive."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return [p.pid for p in alive if pid_exists(p.pid)]


class Background:
    """Honest requests (to the faulty example model) from another thread while something happens;
    all must succeed."""

    def __init__(self, client, limit: int = 5000, model: str | None = None):
        self.client, self.limit, self.model = client, limit, model
        self.ok, self.failed = 0, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run)

    def run(self) -> None:
        while not self.stop.is_set() and self.ok + len(self.failed) < self.limit:
            try:
                reply = self.client.infer({"do": "ok", "n": self.ok}, timeout=30, model=self.model)
                assert reply["echo"]["n"] == self.ok
                self.ok += 1
            except Exception as exc:  # noqa: BLE001 - recorded and asserted on
                self.failed.append(repr(exc))

    def __enter__(self) -> "Background":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive()


def need(tool: str, package: str | None = None) -> str:
    """The path of command `tool`, installed with apt-get (Debian's `package`) if it is missing."""
    import shutil

    found = shutil.which(tool)
    if found is None and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "-qq", package or tool], capture_output=True, timeout=300,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        found = shutil.which(tool)
    assert found is not None, f"{tool} is needed and could not be installed (apt-get install {package or tool})"
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_to_end(sock, limit: int = 10_000) -> bytes:
    """All a connection sends until the server closes it (EOF or reset): bounded in reads,
    each read by the socket's own timeout."""
    got = b""
    for _ in range(limit):
        try:
            chunk = sock.recv(1 << 16)
        except ConnectionResetError:
            break
        if not chunk:
            break
        got += chunk
    return got


def http_pool(start_pool, *args: str, workers: int = 2, **kw) -> PoolProc:
    """A pool serving HTTP on a loopback port, its gateways running; pool.address is HOST:PORT."""
    pool = start_pool("--http", "127.0.0.1:0", "--http-workers", str(workers), *args, **kw)
    pool.address = pool.status()["pool"]["http"]
    for _ in range(200):  # the gateways start beside the pool: bounded, each a round trip
        if all(g["pid"] for g in pool.status()["pool"]["gateways"]):
            break
    return pool


def need_library(name: str, package: str) -> None:
    """Make sure the shared library lib`name` can be loaded, installing Debian's `package` if
    it is missing; pytest.skip naming it where it cannot be had."""
    import ctypes.util

    import pytest

    if ctypes.util.find_library(name) is None and os.geteuid() == 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "-qq", package], capture_output=True, timeout=300,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if ctypes.util.find_library(name) is None:
        pytest.skip(f"lib{name} is missing and could not be installed (apt-get install {package})")
