"""Connections against the file-descriptor limit: the doors close before it is reached.

libzmq accepts every connection its listener is offered, and when the process has no
descriptor left its ipc listener aborts the process (an assertion on accept's EMFILE, where
its tcp listener only spins); a worker restart then fails for want of a pipe. Shedding the
newest connections after they were accepted was not enough: a crowd that connects again
every 100 ms is accepted faster than a Python thread can shut it down (3,000 idle clients at
1,024 descriptors aborted the daemon every time). So the supervisor keeps a reserve in two
steps, both taken by a thread of its own, the guard:

    fewer than 2 × reserve free   close the doors: each ipc listener's path is renamed aside
                                  (closed_path), so a connect() finds no file and ZeroMQ
                                  retries it later; the socket still listens and every
                                  connection already made is served. At most its backlog is
                                  still accepted. Open again at 2.5 × reserve.
    fewer than reserve free       shed: the newest accepted client connections (frontend and
                                  event socket) are shut down with shutdown(2)
    fewer than reserve / 2 free   the backend's door closes too (workers connect there; a
                                  model that opens connections to it cannot eat the reserve).
                                  Open again at reserve.

    listeners ── socket monitors (ACCEPTED fd / DISCONNECTED fd) ──► the guard ── rename(2)

The guard is a thread, not a step of the loop: a loop pass busy with a restart would let a
crowd eat the reserve meanwhile. It touches no pool state: it reads its monitor sockets (its
alone), counts, renames paths, shuts connections down, and wakes the loop (the wake-up fd)
when there is something to say. A shed connection's descriptor stays libzmq's, which sees
the end, closes it and frees it. While the doors are closed or it sheds, and for DEGRADED_S
after, status says the pool is degraded and why. A tcp:// frontend has no path to close: it
is guarded by shedding alone (libzmq's tcp listener survives EMFILE). Unauthenticated
handshakes are bounded by time instead (HANDSHAKE_S, sockets.py).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import zmq
from zmq.utils.monitor import parse_monitor_message

from isopool.protocol.endpoints import closed_path

log = logging.getLogger("isopool.supervisor")

POLL_MS = 200  # the guard's longest wait (it looks at the doors at least this often); close() wakes it at once
MAX_EVENTS = 4096  # monitor events read before the reserve is looked at
EVENT_EVERY_S = 1.0  # connections_shed events: at most one this often
DEGRADED_S = 10.0  # after the last shed connection, status says degraded this long
LISTEN_BACKLOG = 64  # connections the kernel queues for each listener: what a closed door still lets in
MAX_DUE = 64  # events kept for the loop (a door that opens and closes faster than the loop reads)
RESERVE_MIN = 128  # descriptors kept free for restarts (pipes, pidfds, boards) and libzmq itself


def reserve_for(fd_limit: int) -> int:
    return max(RESERVE_MIN, fd_limit // 8)


def free_descriptors(fd_limit: int) -> int:
    """Descriptors this process may still open (0 when it cannot even look)."""
    try:
        return fd_limit - len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


@dataclass
class Listener:
    """One of our listening sockets, as the guard sees it."""

    name: str  # "frontend", "event socket", "backend": as logs and events name it
    sock: zmq.Socket
    address: str | int  # what getsockname() says on a connection it accepted: its path, or its port
    path: Path | None  # its ipc path (the door), None for tcp
    shed: bool  # its connections may be shut down (clients); the backend's are workers'
    close_below: int  # free descriptors under which its door closes
    open_at: int  # free descriptors from which it opens again
    closed: bool = False
    open_fds: set[int] = field(default_factory=set)  # written by the guard only

    def door(self, free: int) -> bool:
        """Close or open the door for `free` descriptors; True if it changed."""
        shut = free < (self.open_at if self.closed else self.close_below)
        if self.path is None or shut == self.closed:
            return False
        src, dst = (self.path, closed_path(self.path)) if not self.closed else (closed_path(self.path), self.path)
        try:
            os.rename(src, dst)
        except OSError as exc:  # removed by someone: nothing to close, nothing to open
            log.warning("cannot %s the %s's door (%s): %s", "open" if self.closed else "close", self.name, src, exc)
            return False
        self.closed = not self.closed
        return True


class Connections:
    def __init__(self, ctx: zmq.Context, listeners: list[Listener], fd_limit: int, wake: Callable[[], None]):
        self.fd_limit = fd_limit
        self.reserve = reserve_for(fd_limit)
        self.listeners = listeners
        self.wake = wake  # tells the loop there is an event to emit
        self.shed = 0
        self.shed_at: float | None = None
        self.closed_at: float | None = None  # when a door last closed
        self.said_at = -EVENT_EVERY_S  # when the last connections_shed event was asked for
        self.due: deque[tuple[str, dict]] = deque(maxlen=MAX_DUE)  # events for the loop to emit
        self.monitors: list[tuple[zmq.Socket, Listener]] = []
        for lst in listeners:
            if not lst.shed:
                continue
            addr = f"inproc://isopool-{lst.name.replace(' ', '-')}-monitor-{id(self)}"
            lst.sock.monitor(addr, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
            mon = ctx.socket(zmq.PAIR)
            mon.setsockopt(zmq.RCVHWM, 0)  # an event lost would leave a count wrong
            mon.setsockopt(zmq.LINGER, 0)
            mon.connect(addr)
            self.monitors.append((mon, lst))
        self.frontend = listeners[0]
        self.stopping = threading.Event()
        self.stop_fd = os.eventfd(0, os.EFD_NONBLOCK)  # close() wakes the guard at once with it
        self.thread = threading.Thread(target=self._guard, name="isopool-connections", daemon=True)
        self.thread.start()  # from here on the monitor sockets are the guard's alone

    @property
    def open(self) -> set[int]:
        """The client connections open on the frontend."""
        return self.frontend.open_fds

    # ---- the guard thread

    def _guard(self) -> None:
        poller = zmq.Poller()
        for mon, _ in self.monitors:
            poller.register(mon, zmq.POLLIN)
        poller.register(self.stop_fd, zmq.POLLIN)
        try:
            while not self.stopping.is_set():
                try:
                    ready = dict(poller.poll(POLL_MS))
                    self.read(time.monotonic(), [lst for mon, lst in self.monitors if mon in ready])
                except zmq.ZMQError:
                    return  # the context is ending
                except Exception:  # a bug of ours: said; the guard goes on
                    log.exception("the connection guard failed a round; it goes on")
        finally:
            for mon, _ in self.monitors:
                mon.close(linger=0)

    def read(self, now: float, ready: list[Listener]) -> int:
        """Take the monitors' events (of the listeners `ready`); close or open the doors; shed
        the newest accepted connections if descriptors run low. Returns how many were shed."""
        free = free_descriptors(self.fd_limit)
        self._doors(free, now)
        accepted: list[tuple[int, Listener]] = []  # oldest first
        for mon, lst in self.monitors:
            if lst in ready:
                free = self._take(mon, lst, accepted, free, now)
        if not accepted:
            return 0
        free, shed = free_descriptors(self.fd_limit), 0  # the truth again: the count ran on events
        self._doors(free, now)
        while free < self.reserve and accepted:
            fd, lst = accepted.pop()
            if self._shut(fd, lst):
                shed += 1
                free += 1  # libzmq closes it as soon as it sees the end
        if shed:
            self.shed += shed
            self.shed_at = now
            if now - self.said_at >= EVENT_EVERY_S:
                self.said_at = now
                self.due.append(("connections_shed", {"shed": self.shed, "open": len(self.open),
                                                      "fd_limit": self.fd_limit, "fd_reserve": self.reserve,
                                                      "refused_at": self._closed_names()}))
                self.wake()
        return shed

    def _take(self, mon: zmq.Socket, lst: Listener, accepted: list[tuple[int, Listener]], free: int,
              now: float) -> int:
        """Read `lst`'s monitor; returns `free` counted on by its events. The doors are looked at
        after every event, not after the batch: a crowd is accepted faster than it is read."""
        for _ in range(MAX_EVENTS):
            try:
                event = parse_monitor_message(mon.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
            fd = event["value"]
            if event["event"] == zmq.EVENT_ACCEPTED:
                lst.open_fds.add(fd)
                accepted.append((fd, lst))
                free -= 1
                self._doors(free, now)
            else:
                lst.open_fds.discard(fd)
                free += 1
                if (fd, lst) in accepted:
                    accepted.remove((fd, lst))
        return free

    def _doors(self, free: int, now: float) -> None:
        for lst in self.listeners:
            if lst.door(free):
                if lst.closed:
                    self.closed_at = now
                    log.warning("%d of %d descriptors free: the %s takes no new connections until %d are "
                                "(its socket is at %s meanwhile)", free, self.fd_limit, lst.name, lst.open_at,
                                closed_path(lst.path))
                else:
                    log.info("%d of %d descriptors free: the %s takes connections again", free, self.fd_limit,
                             lst.name)
                self.due.append(("connections_paused" if lst.closed else "connections_resumed",
                                 {"listener": lst.name, "free": free, "fd_limit": self.fd_limit,
                                  "fd_reserve": self.reserve, "open": len(self.open)}))
                self.wake()

    def _closed_names(self) -> list[str]:
        return [lst.name for lst in self.listeners if lst.closed]

    def _shut(self, fd: int, lst: Listener) -> bool:
        """Shut down accepted connection `fd`, if it still is one of `lst`'s."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            return False  # closed meanwhile, or not a socket
        try:
            name = sock.getsockname()
            if (name[1] if isinstance(name, tuple) else name) != lst.address:
                return False  # the number was reused by another descriptor
            sock.shutdown(socket.SHUT_RDWR)
            return True
        except OSError:
            return False
        finally:
            sock.detach()  # the descriptor stays libzmq's to close

    # ---- read by the loop

    def events(self) -> list[tuple[str, dict]]:
        """The events the guard asked for (kind, fields), each once."""
        out = []
        while self.due:
            out.append(self.due.popleft())  # deque: the guard appends while the loop takes
        return out

    def degraded(self, now: float) -> str | None:
        closed = self._closed_names()
        recent = [t for t in (self.shed_at, self.closed_at) if t is not None and now - t <= DEGRADED_S]
        if not closed and not recent:
            return None
        doors = f"new connections refused at the {' and '.join(closed)}" if closed else "taking connections again"
        return (f"descriptors run low: {doors}; {self.shed} connection(s) shed so far, {len(self.open)} open, "
                f"{self.reserve} of {self.fd_limit} descriptors kept free for restarts; raise the open-files "
                "limit (LimitNOFILE=, ulimit -n) or use fewer connections")

    def facts(self, now: float) -> dict:
        return {"connections": len(self.open), "connections_shed": self.shed, "fd_limit": self.fd_limit,
                "fd_reserve": self.reserve, "connections_degraded": self.degraded(now),
                "connections_refused_at": self._closed_names()}

    def close(self) -> None:
        """Stop the monitors, then the guard (it closes its ends), then open the doors again
        (the paths are removed where they should be); before the listeners close. In that
        order: libzmq's I/O thread sends each event while holding the lock that
        disable_monitor() takes, and an event sent once the guard's end is closed blocks it for
        good (a client that disconnected at the moment the pool stopped hung the daemon)."""
        for _, lst in self.monitors:
            try:
                lst.sock.disable_monitor()
            except zmq.ZMQError:
                pass
        self.stopping.set()
        os.eventfd_write(self.stop_fd, 1)
        self.thread.join(timeout=5 * POLL_MS / 1000)
        os.close(self.stop_fd)
        for lst in self.listeners:
            if lst.closed and lst.path is not None:
                try:
                    os.rename(closed_path(lst.path), lst.path)
                except OSError:
                    pass
