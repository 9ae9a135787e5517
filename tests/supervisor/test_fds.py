"""File descriptors at their limit: the supervisor sheds connections, never its own life.

The pool runs with RLIMIT_NOFILE 1,024 soft and hard (the common default, which it cannot
raise), 3,000 idle ZeroMQ clients connect (before the doors, libzmq's ipc listener aborted
the daemon on accept's EMFILE under that crowd on every run), and a worker is made to crash: the connections
past the reserve are shed (connections.py), the restart finds its descriptors, the clients
already connected are served throughout, and once the crowd leaves a new client connects.
"""

from __future__ import annotations

import socket
import signal
import subprocess
import sys
import time

from isopool.errors import WorkerCrashed
from isopool.supervisor.connections import reserve_for

FD_LIMIT = 1024
IDLE = 3000


def test_three_thousand_idle_connections_at_1024_descriptors_and_a_worker_restart(start_pool):
    pool = start_pool("--workers", "2", "--model", "isopool.examples.faulty:Faulty", fd_limit=FD_LIMIT)
    with pool.client(timeout=60) as early:  # connected before the crowd: must be served throughout
        assert early.infer({"do": "ok"})["echo"] == {"do": "ok"}
        crowd = subprocess.Popen([sys.executable, "-m", "isopool.bench.idle_peers", str(IDLE), pool.endpoint],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert crowd.stdout.readline() == b"up\n"
            paused = pool.wait_event("connections_paused", timeout=60, listener="frontend")
            assert paused["fd_limit"] == FD_LIMIT and paused["fd_reserve"] == reserve_for(FD_LIMIT)
            status = pool.status()["pool"]
            assert not status["healthy"] and "descriptors run low" in status["health_reason"]
            # the door closed at 2 x reserve free: what it still let in stays below the reserve
            assert status["connections"] < FD_LIMIT - reserve_for(FD_LIMIT)
            # closed now, or opened again already (at 2.5 x reserve free, once the guard shed
            # enough of the crowd): then it said so
            assert ("frontend" in status["connections_refused_at"]
                    or pool.wait_event("connections_resumed", timeout=10, listener="frontend"))

            try:
                early.infer({"do": "exit"}, retry=False)
            except WorkerCrashed:
                pass
            pool.wait_event("ready", timeout=60, generation=2)  # a restart found its pipes, board and pidfd
            for i in range(20):
                assert early.infer({"do": "ok", "i": i})["echo"]["i"] == i
            assert pool.proc.poll() is None
        finally:
            crowd.stdin.close()
            crowd.wait(60)
    with pool.client(timeout=30) as late:  # the crowd gone, a newcomer connects
        assert late.infer({"do": "ok"})["echo"] == {"do": "ok"}
    after = pool.status()["pool"]
    assert after["restarts_total"] >= 1 and after["connections_refused_at"] == []


def test_a_connection_that_never_handshakes_is_dropped(start_pool):
    """A peer that connects and sends nothing holds a descriptor only until HANDSHAKE_S."""
    pool = start_pool("--workers", "1", "--model", "isopool.examples.faulty:make_echo")
    path = pool.endpoint.removeprefix("ipc://")
    silent = []
    try:
        for _ in range(50):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            silent.append(s)
        with pool.client() as c:  # served meanwhile
            assert c.infer({"n": 1}) == {"n": 1}
        for s in silent:
            s.settimeout(30)  # HANDSHAKE_S is 5 s; a generous bound, not a speed check
            greeting = b""
            while True:  # the supervisor's ZMTP greeting, then the end
                got = s.recv(4096)
                if not got:
                    break
                greeting += got
            assert greeting[:1] == b"\xff"
    finally:
        for s in silent:
            s.close()
    assert pool.status()["pool"]["healthy"]


CHURN = """
import sys, zmq
ctx = zmq.Context()
print("up", flush=True)
for _ in range(20000):  # bounded: the test stops the pool within a second or two of "up"
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(sys.argv[1])
    s.close()
"""


def test_a_pool_stops_while_clients_connect_and_disconnect(start_pool):
    """Each connection and disconnection is a monitor event (connections.py); the pool stops
    between two of them, and must still exit (it once hung in libzmq's monitor lock)."""
    for round_ in range(6):  # the hang came in about one round in ten
        pool = start_pool("--workers", "1", "--model", "isopool.examples.faulty:make_echo")
        churn = subprocess.Popen([sys.executable, "-c", CHURN, pool.endpoint], stdout=subprocess.PIPE)
        try:
            assert churn.stdout.readline() == b"up\n"
            with pool.client() as c:  # the churn is on: connections come and go as the pool stops
                assert c.infer(round_) == round_
            pool.proc.send_signal(signal.SIGTERM)
            assert pool.proc.wait(20) == 0, f"round {round_}: the pool did not exit"
        finally:
            churn.kill()
            churn.wait(10)
