"""What goes into the supervisor's core (events) and what comes out (actions).

The core (core.py) never touches a socket, a clock or a process. The shell (loop.py)
turns what it sees into the events below, calls the core, and carries out the actions the
core left. Sends are by far the commonest action, so they wait in two lists of their own,
as plain tuples, in the order they were made:

    core.to_clients   (client routing id, frames, bundles)   a reply for a client
    core.to_workers   (worker identity, frames)               RUN, CANCEL or STOP

every other action waits in core.actions as one of the classes below. The simulator
(sim.py) drives the same core with the same events and reads the same actions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# ---------------------------------------------------------------- events (shell -> core)


@dataclass(slots=True)
class ClientMessage:
    ident: bytes  # the client's routing id
    header: dict  # decoded by protocol/ (unpack_header)
    body: list  # payload and buffer frames, untouched
    admin: bool = True  # may it send control ops (CURVE: its key is an admin's)


@dataclass(slots=True)
class ClientGarbage:
    """A client message the shell could not decode; `rid` is its id, if one could be read."""
    ident: bytes
    rid: Any
    error: Exception


@dataclass(slots=True)
class ClientStalled:
    """Replies for this client wait at their bound (it does not read them), or no longer do."""
    ident: bytes
    stalled: bool


@dataclass(slots=True)
class StreamCut:
    """A stream's parts came faster than its client read them, past the bound of what may wait
    for it (replies.py): its part was dropped; the stream is to be cancelled and ended with an
    error."""
    ident: bytes
    rid: Any


@dataclass(slots=True)
class ClientGone:
    """A reply could not be routed: the client has disconnected."""
    ident: bytes


@dataclass(slots=True)
class WorkerMessage:
    ident: bytes
    header: dict
    body: list


@dataclass(slots=True)
class WorkerGarbage:
    """A worker message that could not be decoded: the worker is broken."""
    ident: bytes
    why: str


@dataclass(slots=True)
class Spawned:
    slot: int
    pid: int


@dataclass(slots=True)
class SpawnFailed:
    slot: int
    why: str
    template: bool  # the template failed to fork (it is restarted)
    broken: bool = False  # the template broke its protocol: as a load failure (backoff, or no start)


@dataclass(slots=True)
class WorkerExited:
    slot: int
    exit: dict  # protocol.exits.exit_fields(): exit_code, signal, reason


@dataclass(slots=True)
class SandboxRefused:
    """A sandboxed worker's process made a call its seccomp filter held back, and the
    supervisor refused it (supervisor/listener.py)."""
    slot: int
    call: str  # the system call's name
    target: int | None  # the pid it aimed at, for calls on a process
    caller: int  # the thread that made it


@dataclass(slots=True)
class Sampled:
    slot: int
    rss: int
    uss: int
    cpu_percent: float


@dataclass(slots=True)
class TemplateReady:
    preload: str = "imports"  # what it preloaded: "model" (built once, shared) or "imports"


@dataclass(slots=True)
class TemplateFailed:
    error: str
    traceback: str = ""


@dataclass(slots=True)
class TemplateExited:
    pid: int
    exit: dict


@dataclass(slots=True)
class SignalReceived:
    name: str  # SIGTERM, SIGINT, SIGHUP


@dataclass(slots=True)
class Tick:
    """A timer may be due (deadlines, heartbeats, kills, backoff) or the pool changed."""


# ---------------------------------------------------------------- actions (core -> shell)


@dataclass(slots=True)
class Spawn:
    """Start a process for `slot`: by fork from the template, or a fresh interpreter."""
    slot: int
    generation: int
    device: str
    worker_id: int = 0  # what the model sees as context.worker_id
    token: str = ""  # the secret part of its backend identity (handed to it privately, never in argv or env)


@dataclass(slots=True)
class Kill:
    slot: int
    sig: str  # "TERM" or "KILL": to the worker's whole process group


@dataclass(slots=True)
class GiveUp:
    """`slot`'s process outlived SIGKILL by long (health.KILLED_WITHIN_S): stop watching it (it is killed again as
    a stray, and reaped when it can be); the slot is free for a new process."""
    slot: int


@dataclass(slots=True)
class StartTemplate:
    pass


@dataclass(slots=True)
class StopTemplate:
    pass


@dataclass(slots=True)
class Sample:
    """Measure these workers' memory and CPU; answer with one Sampled each."""
    slots: list


@dataclass(slots=True)
class ReapStrays:
    """Reap exited children nobody tracks (a handler's orphans reparented to us)."""


@dataclass(slots=True)
class AnswerStatus:
    """Send `ident` the status map (the shell adds what only it knows: pid, endpoints)."""
    ident: bytes
    rid: Any


@dataclass(slots=True)
class Emit:
    kind: str
    fields: dict


@dataclass(slots=True)
class Log:
    level: int  # a logging level
    msg: str
    args: tuple = ()
    extra: dict = field(default_factory=dict)


@dataclass(slots=True)
class Notify:
    """Tell systemd (sd_notify)."""
    state: str
