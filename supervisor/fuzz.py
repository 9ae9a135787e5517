"""A coverage-guided fuzz target for the supervisor's message intake (atheris).

    bytes ──frames()──► ZeroMQ frames ──protocol messages() + schemas──► core.client_message
                                                                  └────► core.worker_message

What a client or a worker may send reaches the core only through transport.messages() with
its side's schema; whatever it is, handling it must not raise (the core refuses, answers or
replaces the sender). The target feeds each input to a core with two ready workers:

    python -m isopool.supervisor.fuzz -runs=100000        # atheris's (libFuzzer's) flags
    python -m isopool.supervisor.fuzz -max_total_time=60
"""

from __future__ import annotations

import sys

import msgpack

from isopool.protocol import DEFAULT_LIMITS, ops, pack_header, schemas
from isopool.protocol.transport import messages

from . import actions as ev
from .config import PoolConfig
from .core import Core


class Intake:
    """A core whose workers come up at once, fed raw messages as the shell would."""

    def __init__(self, **settings):
        self.core = Core(PoolConfig(**{"workers": 2, "preload": "none", "spin_us": 0, "max_queue": 64, **settings}),
                         ["cpu"], lambda slot: (0, 0), now=1.0)
        self.now = 1.0
        self.idents: list[bytes] = []  # every worker identity, in the order they started
        self.kills: list[int] = []  # slots the core asked to kill
        self.tick()

    def tick(self, dt: float = 0.001) -> None:
        self.now += dt
        self.core.handle(ev.Tick(), self.now)
        self.drain()

    def drain(self) -> list:
        """Carry out the core's actions the simplest way; the replies to clients, returned."""
        replies = []
        core = self.core
        for _ in range(100):
            to_clients, to_workers, actions = core.take()
            if not (to_clients or to_workers or actions):
                break
            replies += to_clients
            for a in actions:
                if isinstance(a, ev.AnswerStatus):
                    replies.append((a.ident, [pack_header(ops.RESULT, a.rid)], False))
                elif isinstance(a, ev.Spawn):
                    ident = b"%d.%d" % (a.slot, a.generation)
                    self.idents.append(ident)
                    core.handle(ev.Spawned(a.slot, 1000 + a.slot), self.now)
                    core.handle(ev.WorkerMessage(ident, {"op": ops.READY, "capacity": 4}, []), self.now)
                elif isinstance(a, ev.Kill):
                    self.kills.append(a.slot)
                    core.handle(ev.WorkerExited(a.slot, {"exit_code": None, "signal": "SIGKILL", "reason": "k"}),
                                self.now)
        return replies

    def client(self, frames: list) -> list:
        """One client message (routing id first); the replies it caused."""
        for header, body, err in messages(frames, DEFAULT_LIMITS, at=1, side=schemas.CLIENT):
            if err is None:
                self.core.client_message(frames[0], header, body, True, self.now)
            else:
                self.core.handle(ev.ClientGarbage(frames[0], header, err), self.now)
        return self.drain()

    def worker(self, frames: list) -> None:
        for header, body, err in messages(frames, DEFAULT_LIMITS, at=1, side=schemas.WORKER):
            if err is None:
                self.core.worker_message(frames[0], header, body, self.now)
            else:
                self.core.handle(ev.WorkerGarbage(frames[0], str(err)), self.now)
        self.drain()


def frames(data: bytes) -> tuple[bool, list]:
    """(to the backend?, frames) from fuzz input: a byte of flags, then frames split at 0xff 0x00."""
    if not data:
        return False, [b"c"]
    flags, rest = data[0], data[1:]
    parts = rest.split(b"\xff\x00")[:8]
    if flags & 2 and parts:  # a well-formed header with fuzzed fields: reach past the decoder
        try:
            fields = msgpack.unpackb(parts[0], strict_map_key=False)
            if isinstance(fields, dict):
                op = ["infer", "cancel", "status", "control", "result", "chunk", "error", "ready"][flags >> 5]
                parts[0] = pack_header(op, fields.pop("id", None), **{str(k): v for k, v in fields.items()})
        except Exception:  # noqa: BLE001 - not msgpack: the raw bytes go as they are
            pass
    if flags & 1:
        return True, [b"0.1", *parts]
    return False, [b"c%d" % (flags >> 2 & 3), *parts]


_intake: Intake | None = None


def one(data: bytes) -> None:
    global _intake
    if _intake is None or len(_intake.core.ledger) > 500:
        _intake = Intake()
    backend, msg = frames(data)
    if backend:
        _intake.worker(msg)
    else:
        _intake.client(msg)
    _intake.tick()


def seeds() -> list[bytes]:
    """Well-formed messages of every op, for the fuzzer to start from."""
    body = msgpack.packb({"x": [1, 2.5, "s"]})
    client = [pack_header(ops.INFER, 1, timeout=1.0, stream=True, tenant="t"), pack_header(ops.CANCEL, 1),
              pack_header(ops.STATUS, 2), pack_header(ops.CONTROL, 3, action="scale", args={"workers": 3}),
              pack_header(ops.CONTROL, 4, action="reload")]
    worker = [pack_header(ops.READY, None, capacity=4), pack_header(ops.HEARTBEAT, None),
              pack_header(ops.RESULT, [b"c0", 1], attempt=1), pack_header(ops.CHUNK, [b"c0", 1], attempt=1),
              pack_header(ops.ERROR, [b"c0", 1], attempt=1), pack_header(ops.LOAD_FAILED, None)]
    return [b"\x00" + h + b"\xff\x00" + body for h in client] + [b"\x01" + h + b"\xff\x00" + body for h in worker]


def instrument_isopool(atheris) -> int:
    """Coverage for isopool's own functions and methods (what the fuzzer should steer by),
    and not for every function loaded (atheris.instrument_all: a minute of start-up here,
    spent on numpy and the like). Returns how many were instrumented."""
    import inspect

    done = 0
    for name, module in list(sys.modules.items()):
        if not name.startswith("isopool.") or module is None:
            continue
        for obj in list(vars(module).values()):
            members = vars(obj).values() if inspect.isclass(obj) else (obj,)
            for f in members:
                f = getattr(f, "__func__", f)  # a classmethod or staticmethod's function
                if inspect.isfunction(f) and f.__module__ == name and not getattr(f, "_isopool_fuzzed", False):
                    atheris.instrument_func(f)
                    f._isopool_fuzzed = True
                    done += 1
    return done


def main() -> None:
    import tempfile
    from pathlib import Path

    import atheris

    argv = list(sys.argv)
    if not any(not a.startswith("-") for a in argv[1:]):  # no corpus given: start from the seeds
        corpus = Path(tempfile.mkdtemp(prefix="isopool-fuzz-"))
        for i, seed in enumerate(seeds()):
            (corpus / f"seed{i}").write_bytes(seed)
        argv.append(str(corpus))
    instrument_isopool(atheris)
    atheris.Setup(argv, one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
