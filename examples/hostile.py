"""Hostile models, for the tests of what a compromised model cannot do (tests/supervisor/test_hostile.py).

Hostile answers like faulty.Echo ({"echo": x, "pid": ...}) until a request asks it to attack:

    {"attack": NAME, "pid": PID | "pids": [...] | "path": PATH}    one of ATTACKS: signal, trace or read the memory
        of a process, signal every process it may, mount, connect to a unix socket, write into a
        directory, leave a process behind;
        answers {"refused": the error that stopped it, or None, "done": what it did}

    {"attack": "flood", "n": N}
        send the supervisor N legal-looking results for a request it never gave, on this
        worker's own socket, as fast as it can; answers N

    {"attack": "dodge"}
        mark this worker's board as if its request were finished, then die: a death nobody is to
        blame for, again and again

    {"attack": "impersonate", "backend": "ipc://...", "slot": S, "generation": G, "victim": PID, "seconds": 2}
        kill the worker PID, then connect to the backend as slot S's next process (the identity
        an older isopool would have given it: "S.G", and "S.G.<a guessed token>"), say READY every
        50 ms and answer whatever arrives with forged results; answers how many messages it got
        and sent

GarblesTemplate, FloodsTemplate and ChattersTemplate attack as they are built: preloaded
(--preload model), that is in the template, on every socket the process holds (the
template's command socket to the supervisor among them): a line that is not the template
protocol, a megabyte with no end of line, or a megabyte of lines that are.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import time
from typing import Any

import msgpack
import zmq

from isopool.protocol import ops, pack_header


class Hostile:
    def __call__(self, x: Any) -> Any:
        if isinstance(x, dict) and x.get("attack") == "impersonate":
            return impersonate(x)
        if isinstance(x, dict) and x.get("attack") == "dodge":
            dodge()
        if isinstance(x, dict) and x.get("attack") == "flood":
            return flood(int(x["n"]))
        if isinstance(x, dict) and x.get("attack") in ATTACKS:
            return attempt(x)
        return {"echo": x, "pid": os.getpid()}


def attempt(x: dict) -> dict:
    """One attack of ATTACKS: {"refused": the error that stopped it} or {"refused": None, ...}."""
    try:
        done = ATTACKS[x["attack"]](x)
    except OSError as exc:
        return {"refused": f"{type(exc).__name__}: {exc}", "errno": exc.errno}
    return {"refused": None, "done": done}


def _ptrace(pid: int) -> str:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.ptrace(16, pid, 0, 0) != 0:  # PTRACE_ATTACH
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return "attached"


def _mount(x: dict) -> str:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"none", b"/tmp", b"tmpfs", 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return "mounted"


def _read_mem(pid: int) -> str:
    with open(f"/proc/{pid}/mem", "rb"):  # opening it is what the kernel checks (ptrace access)
        return "opened"


def _connect(path: str) -> str:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    finally:
        s.close()
    return "connected"


def _write(directory: str) -> str:
    path = os.path.join(directory, "planted")
    with open(path, "w") as f:
        f.write("x")
    return f"wrote {path}"


def _another(x: dict) -> int:
    """Another worker's pid, of those the request lists (never this one's)."""
    return next(int(p) for p in x["pids"] if int(p) != os.getpid())


def _leave_behind(x: dict) -> str:
    child = subprocess.Popen(["sleep", "1000"], start_new_session=True, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return str(child.pid)


ATTACKS = {
    "signal_supervisor": lambda x: os.kill(int(x["pid"]), signal.SIGKILL) or "signalled",
    "signal_worker": lambda x: os.kill(_another(x), signal.SIGKILL) or "signalled",
    "signal_everyone": lambda x: os.kill(-1, signal.SIGKILL) or "signalled",  # all the uid may signal
    "mount": _mount,
    "ptrace_supervisor": lambda x: _ptrace(int(x["pid"])),
    "read_supervisor_memory": lambda x: _read_mem(int(x["pid"])),
    "read_worker_memory": lambda x: _read_mem(_another(x)),
    "connect": lambda x: _connect(x["path"]),
    "write_runtime_dir": lambda x: _write(x["path"]),
    "leave_a_process": _leave_behind,
    "connect_tcp": lambda x: socket.create_connection(("127.0.0.1", int(x["port"])), timeout=5).close() or "connected",
}


def _own_worker() -> Any:
    """The isopool Worker this model runs in, found as a compromised model would find it."""
    import gc

    from isopool.worker.process import Worker

    return next(o for o in gc.get_objects() if isinstance(o, Worker))


def flood(n: int) -> int:
    """Send the supervisor n results for a request it never gave, on this worker's own socket,
    as fast as it can; returns n."""
    sock = _own_worker().sock
    forged = [pack_header(ops.RESULT, [b"nobody", 1], attempt=0), msgpack.packb(None)]
    for _ in range(n):
        sock.send_multipart(forged)
    return n


def dodge() -> None:
    """Write "finished" over "started" on this worker's board, then die: no request is to blame."""
    import struct

    board = _own_worker().board
    started = struct.unpack_from("<Q", board.map, 0)[0]
    struct.pack_into("<Q", board.map, 8, started)
    os._exit(3)


def impersonate(x: dict) -> dict:
    try:
        os.kill(int(x["victim"]), signal.SIGKILL)  # same user, no sandbox: this works
    except ProcessLookupError:
        pass
    ctx = zmq.Context()
    socks = []
    for ident in (b"%d.%d" % (x["slot"], x["generation"]), b"%d.%d.%s" % (x["slot"], x["generation"], b"0" * 32)):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.IDENTITY, ident)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(x["backend"])
        socks.append(s)
    ready = pack_header(ops.READY, None, capacity=16, pid=os.getpid())
    sent = received = 0
    end = time.monotonic() + float(x.get("seconds", 2.0))
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    while time.monotonic() < end:
        for s in socks:  # again and again: whenever the real replacement is up, claim to be it
            try:
                s.send_multipart([ready], zmq.NOBLOCK)  # no peer while the supervisor refuses us
                sent += 1
            except zmq.Again:
                pass
        for s, _ in poller.poll(50):
            frames = s.recv_multipart()
            received += 1
            header = msgpack.unpackb(frames[0])
            forged = pack_header(ops.RESULT, header.get("id"), attempt=header.get("attempt", 0))
            s.send_multipart([forged, msgpack.packb({"forged": True})])
            sent += 1
    for s in socks:
        s.close()
    ctx.term()
    return {"received": received, "sent": sent}


def _write_everywhere(data: bytes) -> None:
    """Write `data` on every socket this process holds (a write that blocks waits for a reader,
    or for the supervisor to kill us)."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                os.write(int(name), data)
        except OSError:  # the directory's own descriptor, closed by now; or a socket that takes nothing
            pass


class GarblesTemplate:
    def __init__(self) -> None:
        _write_everywhere(b'{"pid": "not a pid"}\n')

    def __call__(self, x: Any) -> Any:
        return x


class FloodsTemplate(GarblesTemplate):
    def __init__(self) -> None:
        _write_everywhere(b"x" * (1 << 20))


class ChattersTemplate(GarblesTemplate):
    def __init__(self) -> None:
        _write_everywhere(b'{"spare": 1}\n' * (1 << 16))
