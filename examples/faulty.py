"""Real faulty handlers, for tests and for seeing what isopool does when a model misbehaves.

    isopool serve --model isopool.examples.faulty:Faulty

A request is a map {"do": ACTION, ...}; the reply echoes the input with the worker's pid:
    ok                      {"pid", "echo"}
    raise                   ValueError from the handler
    exit   code=N           os._exit(N)
    exit_if a=ARRAY         os._exit(3) if the array's first element is 666, else echo: an input
                            that kills by its data alone (in shared memory, the frames are alike)
    segv                    a real SIGSEGV (ctypes null-pointer read)
    hang                    an infinite Python loop
    sleep  s=SECONDS        time.sleep
    wait   path=P s=SECONDS  until the file P exists (looked for every 10 ms), at most SECONDS
                            (default 30): a call that runs exactly as long as a test wants
    grow   mib=N            keep N more MiB alive in this worker, touched so RSS grows
    big    n=N              answer N bytes (bytes, not an array: it never travels in shared memory)
    scribble a=ARRAY        write into the input array (it arrives read-only, so this raises)
    flood  mib=N lines=B    write N MiB to stdout (in lines of 80 bytes, or none at all if lines
                            is false), then answer
    leave  pidfile=P then=T start a grandchild that calls setsid() and ignores SIGTERM, write its pid
                            to P, then T: "stay" (answer), "exit" (os._exit(3)) or "hang"
    forge                   send the supervisor, on this worker's own socket, a reply it cannot
                            use (an id that is a nested list), as a compromised handler could
Any other input is echoed back as {"pid", "echo"}.
"""

from __future__ import annotations

import ctypes
import os
import time
from typing import Any

import numpy as np

_HOARD: list[bytearray] = []


class Faulty:
    def __call__(self, x: Any) -> Any:
        action = _plain(x.get("do")) if isinstance(x, dict) else None
        if action == "raise":
            raise ValueError(f"bad input {x.get('tag')!r}")
        if action == "exit":
            os._exit(int(x.get("code", 3)))
        if action == "exit_if" and x["a"].ravel()[0] == 666:
            os._exit(3)
        if action == "segv":
            ctypes.string_at(0)
        if action == "hang":
            while True:
                pass
        if action == "sleep":
            time.sleep(float(_plain(x.get("s", 1.0))))
        if action == "wait":
            _wait_for(str(_plain(x["path"])), float(_plain(x.get("s", 30.0))))
        if action == "scribble":
            x["a"][...] = 0
        if action == "flood":
            _flood(int(x.get("mib", 100)), bool(x.get("lines", True)))
        if action == "leave":
            _leave(x["pidfile"])
            then = x.get("then", "stay")
            if then == "exit":
                os._exit(3)
            if then == "hang":
                while True:
                    pass
        if action == "forge":
            _forge()
        if action == "kind":  # what the model was handed: its type, and whether it may write to it
            a = x["a"]
            writable = a.flags.writeable if hasattr(a, "flags") else True  # torch has no read-only tensors
            return {"type": f"{type(a).__module__}.{type(a).__name__}", "writable": writable}
        if action == "tensor":  # a torch answer: a client without torch gets it as numpy
            import torch

            return torch.arange(int(x.get("n", 3)), dtype=torch.float32)
        if action == "big":  # an answer of n bytes
            return b"z" * int(x["n"])
        if action == "grow":
            _HOARD.append(bytearray(b"\x01" * (int(x.get("mib", 64)) << 20)))
        return {"pid": os.getpid(), "echo": x}


def _plain(value: Any) -> Any:
    """An argument as sent over HTTP too, where it is a tensor: bytes as str, one element as itself."""
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(-1)[0].item()
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    return value.decode() if isinstance(value, bytes) else value


def _wait_for(path: str, seconds: float) -> None:
    end = time.monotonic() + seconds
    while not os.path.exists(path) and time.monotonic() < end:
        time.sleep(0.01)


def _flood(mib: int, lines: bool) -> None:
    import sys

    block = (b"x" * 79 + b"\n") * 13107 if lines else b"y" * (1 << 20)  # about 1 MiB
    out = sys.stdout.buffer
    for _ in range(mib):
        out.write(block)
    out.flush()


def _leave(pidfile: str) -> None:
    import subprocess
    import sys

    code = ("import os, signal, time; os.setsid(); signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            f"open({pidfile!r} + '.tmp', 'w').write(str(os.getpid())); os.rename({pidfile!r} + '.tmp', {pidfile!r}); "
            "time.sleep(600)")
    subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
    for _ in range(500):  # until the grandchild has said who it is
        if os.path.exists(pidfile):
            return
        time.sleep(0.01)


def _forge() -> None:
    import gc

    from isopool.protocol import ops, pack_header
    from isopool.worker.process import Worker

    worker = next(o for o in gc.get_objects() if isinstance(o, Worker))
    worker.sock.send_multipart([pack_header(ops.RESULT, [[1, [2]], 3], attempt=1), b"\xc0"])
    time.sleep(30)  # the supervisor replaces us long before


def echo(x: Any) -> Any:
    """A plain function model would be called per request; this factory returns an echo."""
    return x


def make_echo():
    return echo


def where_mapped(x: Any) -> Any:
    """Echoes a map of arrays, and says where each array's memory lies: "FILE@OFFSET" of the
    mapping it is in (the client's shared-memory segment, and where in it), or "@" for
    memory of no file: {name: array, "mapped:NAME": [b"where"]}; a lone array is named x."""
    out = {}
    for name, arr in (x if isinstance(x, dict) else {"x": x}).items():
        out[name] = arr
        out[f"mapped:{name}"] = [_mapping_of(np.asarray(arr).ctypes.data).encode()]
    return out


def _mapping_of(address: int) -> str:
    with open("/proc/self/maps") as f:
        for line in f:  # ADDRESS-RANGE PERMS OFFSET DEVICE INODE [PATH]
            fields = line.split(maxsplit=5)
            start, end = (int(v, 16) for v in fields[0].split("-"))
            if start <= address < end:
                path = fields[5].strip() if len(fields) > 5 else ""
                return f"{path}@{address - start + int(fields[2], 16)}" if path else "@"
    return "@"


def make_where_mapped():
    return where_mapped


SEEN: list = []  # module state that outlives a request: what tenant isolation must contain


def hoarder(x: Any) -> Any:
    """A careless model: remembers every input in a module-level list and returns them all."""
    SEEN.append(x)
    return list(SEEN)


def make_hoarder():
    return hoarder


class SelfModifying:
    """A model that, on the input "corrupt", adds to its own weights: a silent-corruption bug."""

    def __init__(self) -> None:
        import torch

        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 2)

    def __call__(self, x: Any) -> Any:
        import torch

        if x == "corrupt":
            with torch.no_grad():
                self.layer.weight.add_(1.0)
            return "done"
        with torch.no_grad():
            return self.layer(torch.tensor(x, dtype=torch.float32)).numpy()


class WhereAmI:
    """Answers with what its context says: the worker's id, generation, device and config,
    and the thread pools it was given: torch's, and what Rayon-based libraries (Hugging Face
    tokenizers) will start (after sleeping x seconds when x is a number, so that concurrent
    requests occupy different workers)."""

    def __init__(self, context) -> None:
        import torch

        self.where = {"worker": context.worker_id, "generation": context.generation, "device": context.device,
                      "threads": context.threads, "config": context.config, "pid": os.getpid(),
                      "pools": {"torch": torch.get_num_threads(), "rayon": os.environ.get("RAYON_NUM_THREADS"),
                                "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM")}}

    def __call__(self, x: Any) -> Any:
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            time.sleep(x)
        return self.where


class BuiltWhere:
    """Answers with the pid of the process that built it and the pid that serves: the same,
    unless the template built it (--preload model) and the worker was forked from there."""

    def __init__(self) -> None:
        self.built_in = os.getpid()

    def __call__(self, x: Any) -> Any:
        return {"built_in": self.built_in, "pid": os.getpid()}


class BuiltWhereFor(BuiltWhere):
    """BuiltWhere that takes its worker's context: --preload auto builds it after the fork."""

    def __init__(self, context) -> None:
        super().__init__()
        self.worker = context.worker_id


class BuiltWhereNotForkSafe(BuiltWhere):
    """BuiltWhere that says it may not be built before the fork."""

    fork_safe = False


class FailsToLoad:
    def __init__(self) -> None:
        raise RuntimeError("weights file /models/missing.pt not found")


class Echo:
    """Answers with its input and the pid that served it: who answered what, across hosts."""

    def __call__(self, x: Any) -> Any:
        return {"echo": x, "pid": os.getpid()}


class BadSignature:
    """Declares a signature that is not one (a datatype the protocol does not have)."""

    signature = {"inputs": [{"name": "x", "datatype": "float32", "shape": [4]}]}

    def __call__(self, x: Any) -> Any:
        return x


class SlowToLoad:
    """Takes context.config['load_s'] seconds (default 2) to build, like a large model."""

    def __init__(self, context) -> None:
        time.sleep(float(context.config.get("load_s", 2.0)))
        self.worker = context.worker_id

    def __call__(self, x: Any) -> Any:
        return {"pid": os.getpid(), "worker": self.worker, "echo": x}
