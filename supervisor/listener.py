"""The supervisor's end of the sandboxed workers' seccomp filters (seccomp user notification).

A sandboxed worker's filter (worker/sandbox.py) holds back the calls that could reach
another process (a signal, pidfd_open, another process's limits or scheduling) and the
calls a model never needs (mount, bpf, ...) and asks the supervisor, through the filter's
listener fd, which the worker sends over its channel (a socketpair made at spawn) and
keeps no copy of:

    worker ──channel──► listener fd ──► Listeners.ready()
              (once)                     a call on a process of the worker's own tree: go ahead
                                         anything else: EPERM, and a SandboxRefused event for
                                         the core, which counts, logs and reports it

The calling thread waits in the kernel until the answer, so every notification is answered
in the pass that reads it. Reading one never blocks: the fd polls readable only while a
notification is pending, and one whose caller died meanwhile reads as ENOENT.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct

import psutil
import zmq

from isopool.protocol.contract import AT_A_PROCESS, SIGNALS as FILTERED_SIGNALS

from .actions import SandboxRefused

log = logging.getLogger("isopool.supervisor")

# linux/seccomp.h: _IOWR('!', 0, struct seccomp_notif) and _IOWR('!', 1, struct seccomp_notif_resp)
NOTIF_RECV = 0xC0502100
NOTIF_SEND = 0xC0182101
NOTIF_SIZE = 80  # u64 id, u32 pid, u32 flags, seccomp_data {i32 nr, u32 arch, u64 ip, u64 args[6]}
FLAG_CONTINUE = 1  # SECCOMP_USER_NOTIF_FLAG_CONTINUE: let the call run as the caller made it
SIGNALS = frozenset(FILTERED_SIGNALS)  # the calls the worker's filter holds back (protocol/contract.py)
WHO = AT_A_PROCESS  # call -> the argument that names the process


class Listener:
    """One worker's: its channel until the listener fd arrives, then that fd."""

    def __init__(self, slot: int, pid: int, channel: socket.socket):
        self.slot = slot
        self.pid = pid  # the worker's: its tree is what it may act on
        self.channel: socket.socket | None = channel
        self.fd = -1

    def fileno(self) -> int:
        return self.fd if self.fd >= 0 else self.channel.fileno()

    def take_fd(self) -> bool:
        """Read the listener fd off the channel. False if the worker closed it without one."""
        try:
            _, fds, _, _ = socket.recv_fds(self.channel, 16, 1)
        except OSError:
            fds = []
        self.channel.close()
        self.channel = None
        if not fds:
            return False
        self.fd = fds[0]
        return True

    def answer(self, supervisor: int) -> SandboxRefused | None:
        """Read one notification and answer it; what to report if it was refused."""
        buf = bytearray(NOTIF_SIZE)
        try:
            fcntl.ioctl(self.fd, NOTIF_RECV, buf)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EINTR):
                return None  # its caller is gone, or try again next pass
            raise
        nid, caller, _flags, nr, arch = struct.unpack_from("=QIIiI", buf)
        args = struct.unpack_from("=6Q", buf, 32)
        call = syscall_name(arch, nr)
        target = None
        if call in SIGNALS or call in WHO:
            target = struct.unpack("=i", struct.pack("=I", args[WHO.get(call, 0)] & 0xFFFFFFFF))[0]
            if target != supervisor and self.within(target, call):
                self.respond(nid, FLAG_CONTINUE, 0)
                return None
        self.respond(nid, 0, -errno.EPERM)
        return SandboxRefused(self.slot, call, target, caller)

    def within(self, target: int, call: str) -> bool:
        """Does `target` (as `call` reads its pid argument) name the worker's own tree?"""
        if target == 0 and call in ("kill", "setpriority", "ioprio_set"):
            return True  # its own process group: the worker leads one (setsid)
        if call == "kill" and target < -1:
            return -target == self.pid  # a process group: only the worker's
        if target <= 0:
            return call not in SIGNALS and target == 0  # 0: the caller itself
        try:
            tgid = _tgid(target)  # a thread's id counts as its process
            p = psutil.Process(tgid)
            return tgid == self.pid or any(a.pid == self.pid for a in p.parents())
        except (psutil.Error, OSError, ValueError):
            return False

    def respond(self, nid: int, flags: int, error: int) -> None:
        try:
            fcntl.ioctl(self.fd, NOTIF_SEND, struct.pack("=QqiI", nid, 0, error, flags))
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: its caller died meanwhile
                raise

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Listeners:
    """Every sandboxed worker's listener, in the loop's poller."""

    def __init__(self, poller: zmq.Poller):
        self.poller = poller
        self.by_slot: dict[int, Listener] = {}

    def add(self, slot: int, pid: int, channel: socket.socket) -> None:
        self.drop(slot)
        channel.setblocking(False)
        self.by_slot[slot] = listener = Listener(slot, pid, channel)
        self.poller.register(listener.fileno(), zmq.POLLIN)

    def ready(self, ready: dict) -> list[SandboxRefused]:
        refused = []
        for slot, listener in list(self.by_slot.items()):
            fd = listener.fileno()
            if fd not in ready:
                continue
            if listener.channel is not None:
                self.poller.unregister(fd)
                if listener.take_fd():
                    self.poller.register(listener.fd, zmq.POLLIN)
                else:
                    del self.by_slot[slot]
                continue
            try:
                if (r := listener.answer(os.getpid())) is not None:
                    refused.append(r)
            except OSError as exc:  # the filter is gone (POLLHUP/POLLERR: every process under it exited)
                log.debug("worker in slot %d: its seccomp listener closed (%s)", slot, exc)
                self.drop(slot)
        return refused

    def drop(self, slot: int) -> None:
        listener = self.by_slot.pop(slot, None)
        if listener is not None:
            self.poller.unregister(listener.fileno())
            listener.close()

    def close(self) -> None:
        for slot in list(self.by_slot):
            self.drop(slot)


def syscall_name(arch: int, nr: int) -> str:
    try:
        import pyseccomp

        return pyseccomp.resolve_syscall(arch, nr).decode()
    except (ImportError, OSError, ValueError, RuntimeError):
        return f"syscall {nr}"


def _tgid(tid: int) -> int:
    with open(f"/proc/{tid}/status") as f:
        for line in f:
            if line.startswith("Tgid:"):
                return int(line.split()[1])
    raise ValueError(f"no Tgid for {tid}")
