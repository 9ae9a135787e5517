"""Client connections against the file-descriptor limit: the newest are shed before it is reached.

libzmq accepts every connection its listener is offered, and when the process has no
descriptor left its ipc listener aborts the process (an assertion) and its tcp listener
spins; a worker restart then fails for want of a pipe. So the supervisor keeps a reserve:

    frontend ── socket monitor (ACCEPTED fd / DISCONNECTED fd) ──► the guard thread
                  fewer than `reserve` descriptors free? shut the newest accepted down

The guard is a thread of its own, not a step of the loop: clients that were shed connect
again every 100 ms (ZeroMQ's default), and a loop pass busy with a restart would let them
eat the reserve meanwhile. It touches no pool state: it reads its monitor socket (its
alone), counts, shuts connections down, and wakes the loop (the wake-up fd) when there is
something to say. A shed connection is shut down with shutdown(2); the descriptor stays
libzmq's, which sees the end, closes it and frees it. The client sees a disconnect and,
being ZeroMQ, connects again later. While it sheds, and for DEGRADED_S after, status says
the pool is degraded and why. Unauthenticated handshakes are bounded by time instead
(HANDSHAKE_S, sockets.py): one that does not finish is dropped.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Callable

import zmq
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger("isopool.supervisor")

POLL_MS = 200  # the guard's longest wait; close() wakes it at once (stop_fd)
MAX_EVENTS = 4096  # monitor events read before the reserve is looked at
EVENT_EVERY_S = 1.0  # connections_shed events: at most one this often
DEGRADED_S = 10.0  # after the last shed connection, status says degraded this long
RESERVE_MIN = 128  # descriptors kept free for restarts (pipes, pidfds, boards) and libzmq itself


def reserve_for(fd_limit: int) -> int:
    return max(RESERVE_MIN, fd_limit // 8)


def free_descriptors(fd_limit: int) -> int:
    """Descriptors this process may still open (0 when it cannot even look)."""
    try:
        return fd_limit - len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


class Connections:
    def __init__(self, ctx: zmq.Context, frontend: zmq.Socket, fd_limit: int, address: str | int,
                 wake: Callable[[], None]):
        self.fd_limit = fd_limit
        self.reserve = reserve_for(fd_limit)
        self.address = address  # the frontend's ipc path, or its tcp port
        self.wake = wake  # tells the loop there is an event to emit
        self.open: set[int] = set()  # written by the guard only; the loop reads len()
        self.shed = 0
        self.shed_at: float | None = None
        self.said_at = -EVENT_EVERY_S  # when the last connections_shed event was asked for
        self.due: dict | None = None  # an event for the loop to emit
        addr = f"inproc://isopool-frontend-monitor-{id(self)}"
        frontend.monitor(addr, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self.frontend = frontend
        self.monitor = ctx.socket(zmq.PAIR)
        self.monitor.setsockopt(zmq.RCVHWM, 0)  # an event lost would leave a count wrong
        self.monitor.setsockopt(zmq.LINGER, 0)
        self.monitor.connect(addr)
        self.stopping = threading.Event()
        self.stop_fd = os.eventfd(0, os.EFD_NONBLOCK)  # close() wakes the guard at once with it
        self.thread = threading.Thread(target=self._guard, name="isopool-connections", daemon=True)
        self.thread.start()  # from here on the monitor socket is the guard's alone

    # ---- the guard thread

    def _guard(self) -> None:
        poller = zmq.Poller()
        poller.register(self.monitor, zmq.POLLIN)
        poller.register(self.stop_fd, zmq.POLLIN)
        try:
            while not self.stopping.is_set():
                try:
                    if self.monitor in dict(poller.poll(POLL_MS)):
                        self.read(time.monotonic())
                except zmq.ZMQError:
                    return  # the context is ending
                except Exception:  # a bug of ours: said; the guard goes on
                    log.exception("the connection guard failed a round; it goes on")
        finally:
            self.monitor.close(linger=0)

    def read(self, now: float) -> int:
        """Take the monitor's events; shed the newest accepted connections if descriptors run
        low. Returns how many were shed."""
        accepted: list[int] = []
        for _ in range(MAX_EVENTS):
            try:
                event = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
            fd = event["value"]
            if event["event"] == zmq.EVENT_ACCEPTED:
                self.open.add(fd)
                accepted.append(fd)
            else:
                self.open.discard(fd)
                if fd in accepted:
                    accepted.remove(fd)
        if not accepted:
            return 0
        free, shed = free_descriptors(self.fd_limit), 0
        while free < self.reserve and accepted:
            if self._shut(accepted.pop()):
                shed += 1
                free += 1  # libzmq closes it as soon as it sees the end
        if shed:
            self.shed += shed
            self.shed_at = now
            if now - self.said_at >= EVENT_EVERY_S:
                self.said_at = now
                self.due = {"shed": self.shed, "open": len(self.open), "fd_limit": self.fd_limit,
                            "fd_reserve": self.reserve}
                self.wake()
        return shed

    def _shut(self, fd: int) -> bool:
        """Shut down accepted connection `fd`, if it still is one of the frontend's."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            return False  # closed meanwhile, or not a socket
        try:
            name = sock.getsockname()
            if (name[1] if isinstance(name, tuple) else name) != self.address:
                return False  # the number was reused by another descriptor
            sock.shutdown(socket.SHUT_RDWR)
            return True
        except OSError:
            return False
        finally:
            sock.detach()  # the descriptor stays libzmq's to close

    # ---- read by the loop

    def event(self) -> dict | None:
        """The fields of a connections_shed event the guard asked for, once."""
        fields, self.due = self.due, None
        return fields

    def degraded(self, now: float) -> str | None:
        shed_at = self.shed_at
        if shed_at is None or now - shed_at > DEGRADED_S:
            return None
        return (f"shedding connections: {self.shed} shed so far, {len(self.open)} open, "
                f"{self.reserve} of {self.fd_limit} descriptors kept free for restarts; raise the "
                "open-files limit (LimitNOFILE=, ulimit -n) or use fewer connections")

    def facts(self, now: float) -> dict:
        return {"connections": len(self.open), "connections_shed": self.shed, "fd_limit": self.fd_limit,
                "fd_reserve": self.reserve, "connections_degraded": self.degraded(now)}

    def close(self) -> None:
        """Stop the frontend's monitor, then the guard (it closes its end); before the frontend
        closes. In that order: libzmq's I/O thread sends each event while holding the lock that
        disable_monitor() takes, and an event sent once the guard's end is closed blocks it for
        good (a client that disconnected at the moment the pool stopped hung the daemon)."""
        try:
            self.frontend.disable_monitor()
        except zmq.ZMQError:
            pass
        self.stopping.set()
        os.eventfd_write(self.stop_fd, 1)
        self.thread.join(timeout=5 * POLL_MS / 1000)
        os.close(self.stop_fd)
