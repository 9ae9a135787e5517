"""The sync Client's resources: context, socket, wake-up fd and the I/O thread that owns them.

ZeroMQ sockets are not thread-safe, so one background thread owns the DEALER socket.
Callers encode on their own thread, hand the frames over through a deque and wake the
thread with an eventfd; it sends them as bundles, reads replies and hands them to the
Session. close() releases everything; the Client's weakref.finalize calls it too.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque

import zmq
from zmq.utils.monitor import recv_monitor_message

from isopool.protocol import Unavailable, ops
from isopool.protocol.iothread import io_context
from isopool.protocol.pacing import Pacing
from isopool.protocol.transport import NOBLOCK, drain, send_frames

from .connection import (CONNECT_S, close_watched, closed_early, configure_socket, connect, not_running,
                         on_monitor_event, watch_disconnects)
from .core import Call, Session, send_bundled
from .direct import Direct

log = logging.getLogger("isopool.client")
DIRECT_SOCKETS = 4  # blocking infer() calls that may each use a socket of their own at once


class IOThread:
    """The resources of one Client: context, socket, wake-up fd, I/O thread. close() releases all."""

    def __init__(self, endpoint: str, session: Session, curve: dict | None):
        self.endpoint = endpoint
        self.session = session
        self.curve = curve
        self.outbox: deque = deque()
        # calls sent while no connection was up: (when to give up on it, id). ZeroMQ queues
        # them for a reconnection that may never come (a host that died), so each is failed
        # after CONNECT_S unless a connection comes up first (as AsyncClient._check_up does)
        self.unconfirmed: deque = deque()
        self.ctx, self.io_threads = io_context()
        self.pacing = Pacing(self.io_threads, work_s=0.0)  # a client relays no work of its own: always quick
        self.wake = self.closed = -1
        self.lock = threading.Lock()  # guards idle, direct, closing and the eventfds (close, _release)
        self.idle: list[Direct] = []  # direct sockets no caller is using
        self.direct = 0  # direct sockets open
        try:
            self.sock = self.ctx.socket(zmq.DEALER)
            configure_socket(self.sock, curve)
            self.monitor = watch_disconnects(self.sock)
            connect(self.sock, endpoint)
            self.wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.closed = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # readable once closing
        except BaseException:
            self._release()
            raise
        self.closing = False
        self.signalled = False  # the wake-up fd has been written since the outbox was last drained
        self.thread = threading.Thread(target=self._run, name="isopool-client-io", daemon=True)
        self.thread.start()

    def send(self, frames: list, call: Call | None) -> None:
        if self.closing:
            raise Unavailable("the client is closed")
        self.outbox.append((frames, call))
        if not self.signalled:  # one wake-up per turn of the I/O thread, however many calls
            self.signalled = True
            self._wake()

    def _wake(self) -> None:
        with self.lock:  # _release closes it under the lock: never written once closed (its number may be reused)
            if self.wake >= 0:
                os.eventfd_write(self.wake, 1)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        poller.register(self.wake, zmq.POLLIN)
        session = self.session
        self._send_now(session.hello())  # the server's limits, before any large request needs them
        while not self.closing:
            due = session.next_deadline()
            if self.unconfirmed:
                due = self.unconfirmed[0][0] if due is None else min(due, self.unconfirmed[0][0])
            timeout = None if due is None else max(0, int((due - time.monotonic()) * 1000) + 1)
            events = dict(poller.poll(timeout if timeout is not None else 1000))
            if self.wake in events:
                try:
                    os.eventfd_read(self.wake)
                except BlockingIOError:
                    pass
            if self.monitor in events:  # first: a refused handshake explains a failed send
                self._on_monitor()
            self.signalled = False  # before draining: a call queued after this wakes us again
            self._flush()
            if self.sock in events:
                self._read()
            for cid in session.expire(time.monotonic()):
                self._send_now(session.op_frames(ops.CANCEL, cid))
            if self.unconfirmed:
                self._unconfirmed(time.monotonic())
        session.close(closed_early())
        self._release()

    def _flush(self) -> None:
        """Send what the callers queued: a burst leaves as bundles, one wake-up per hop."""
        self.pacing.observe(len(self.session.pending) + len(self.outbox))
        if self.outbox and not self.session.up.is_set():
            due = time.monotonic() + CONNECT_S
            self.unconfirmed.extend((due, call.cid) for _, call in self.outbox if call is not None)
        send_bundled(self.session, self.endpoint, self.outbox, self._send_now, add=True)

    def _unconfirmed(self, now: float) -> None:
        """Fail the calls sent while down whose connection did not come up in time."""
        if self.session.up.is_set():
            self.unconfirmed.clear()
            return
        while self.unconfirmed and self.unconfirmed[0][0] <= now:
            call = self.session.end(self.unconfirmed.popleft()[1])
            if call is not None:
                call.reject(self.session.refused or not_running(self.endpoint))

    def _send_now(self, frames: list) -> zmq.ZMQError | None:
        try:
            send_frames(self.sock, frames, NOBLOCK)
        except zmq.ZMQError as exc:
            return exc
        return None

    def _read(self) -> None:
        for frames in drain(self.sock, 4096):
            self.session.on_reply(frames)

    def _on_monitor(self) -> None:
        try:
            while True:
                on_monitor_event(self.session, recv_monitor_message(self.monitor, zmq.NOBLOCK), self.endpoint)
        except zmq.Again:
            pass

    def checkout(self) -> "Direct | None":
        """A socket for the caller's thread alone, or None (closing, or all DIRECT_SOCKETS busy)."""
        with self.lock:  # creating under the lock: close() never misses a socket
            if self.closing:
                return None
            if self.idle:
                direct = self.idle.pop()
            elif self.direct >= DIRECT_SOCKETS:
                return None
            else:
                try:
                    direct = Direct(self)
                except zmq.ZMQError as exc:  # out of sockets or file descriptors: the I/O thread's way still works
                    log.debug("no socket of its own for this call (%s); queueing it through the I/O thread", exc)
                    return None
                self.direct += 1
            self.pacing.observe(self.direct - len(self.idle) + len(self.session.pending))
            return direct

    def checkin(self, direct: Direct) -> None:
        with self.lock:
            if not self.closing:
                self.idle.append(direct)
                return
        direct.close()

    def close(self) -> None:
        with self.lock:
            if self.closing:
                return
            self.closing = True
            idle, self.idle = self.idle, []
            if self.closed >= 0:  # under the lock: the I/O thread, seeing `closing`, may be releasing it
                os.eventfd_write(self.closed, 1)  # callers waiting on their own sockets give up
        for direct in idle:
            direct.close()
        if self.wake >= 0 and self.thread.is_alive() and threading.current_thread() is not self.thread:
            self._wake()
            self.thread.join(5)
        elif not self.thread.is_alive():
            self._release()

    def _release(self) -> None:
        sock = getattr(self, "sock", None)  # absent if the constructor failed before making it
        if sock is not None and not sock.closed:
            close_watched(sock, getattr(self, "monitor", None))
        self.ctx.term()  # waits for direct sockets still in use: the closed fd sends them back
        with self.lock:  # the fds are written under the lock too
            for fd in (self.wake, self.closed):
                if fd >= 0:
                    os.close(fd)
            self.wake = self.closed = -1
