"""What the supervisor and its workers agree on, besides the wire codec (codec.py).

    supervisor ──env ISOPOOL_WORKER = WorkerConfig (JSON)──────────────► fresh worker
    supervisor ──env ISOPOOL_TEMPLATE = TemplateSpec, fd ISOPOOL_TEMPLATE_FD─► template
    supervisor ──{"config": WorkerConfig} + the worker's output fd──► template ──fork──► worker
    template ──{"ready"} | {"error", "traceback"} | {"pid", "slot"} | {"error", "slot"}──► supervisor
    worker ──DEALER identity worker_ident(slot, generation, token)──► backend ROUTER

Each JSON message to or from the template is one line. Exit codes are in exits.py.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MODEL = "isopool.models.default:DefaultModel"  # what `serve` runs without --model
# the calls a sandboxed worker's seccomp filter holds back for the supervisor to decide
# (worker/sandbox.py builds the filter, supervisor/listener.py answers): signals and pidfd_open
# name their target in argument 0; AT_A_PROCESS maps a call to the argument that names its
# process, 0 meaning the caller itself
SIGNALS = ("kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "pidfd_open")
AT_A_PROCESS = {"prlimit64": 0, "sched_setaffinity": 0, "sched_setparam": 0, "sched_setscheduler": 0,
                "sched_setattr": 0, "migrate_pages": 0, "move_pages": 0, "kcmp": 0, "setpriority": 1, "ioprio_set": 1}
SHM_THRESHOLD = 1 << 20  # arrays of this many bytes or more go by shared memory (protocol/shm.py): the default
WORKER_MAIN = "isopool.worker"  # `python -m` this: a fresh worker (--preload none)
TEMPLATE_MAIN = "isopool.worker.template"  # `python -m` this: the template
ENV_CONFIG_FD = "ISOPOOL_WORKER_FD"  # a fresh worker's WorkerConfig: the fd of a memfd holding its JSON
ENV_TEMPLATE = "ISOPOOL_TEMPLATE"  # the template's spec: {model, preload, user_config, parent_pid}
ENV_TEMPLATE_FD = "ISOPOOL_TEMPLATE_FD"  # the template's end of its command socket


@dataclass
class WorkerConfig:
    backend: str
    slot: int
    generation: int
    model: str
    parent_pid: int
    device: str = "cpu"
    worker_id: int = 0  # 0..N-1, stable across restarts and reload: the model's context.worker_id
    threads: int = 1
    heartbeat_interval: float = 1.0
    integrity_interval: float = 0.0  # seconds between weight checks when idle (0: never)
    integrity_every_request: bool = False
    prefetch: int = 16
    max_batch_size: int = 8  # for models with batch(): requests handed over at once
    max_batch_wait_ms: float = 2.0  # how long a partial batch waits for more
    spin_us: int = 300  # after quick work, look for more this long before sleeping (0: sleep at once)
    arrays: str = "auto"
    shm_threshold: int = SHM_THRESHOLD  # result arrays this large go into the client's shared memory, if it gave some
    user_config: dict = field(default_factory=dict)
    limits: dict = field(default_factory=dict)
    board: str | None = None  # the file this worker marks each request's start and end in

    token: str = ""  # the secret part of its identity (supervisor/slots.py)
    sandbox: dict | None = None  # {"uid", "gid", "home", "network", "supervisor"}: worker/sandbox.py enters it

    @property
    def ident(self) -> bytes:
        return worker_ident(self.slot, self.generation, self.token)

    def to_env(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_env(cls) -> "WorkerConfig":
        """A fresh worker's config, from the memfd the supervisor passed it (ENV_CONFIG_FD: read,
        then closed; the environment, which other processes of the user can read, holds only its number)."""
        fd = int(os.environ.pop(ENV_CONFIG_FD))
        with os.fdopen(fd, "rb") as f:
            return cls(**json.loads(f.read()))


def worker_ident(slot: int, generation: int, token: str = "") -> bytes:
    """A worker process's identity on the backend socket: SLOT.GENERATION.TOKEN. The token
    (128 random bits, hex) is what makes it unguessable: another process that connects under
    a worker's slot and generation without it is refused (answers.worker_of)."""
    return f"{slot}.{generation}.{token}".encode()


def parse_ident(ident: bytes) -> tuple[int, int] | None:
    """(slot, generation) of a backend identity; None if it is not one."""
    try:
        slot, gen, _token = ident.split(b".")
        return int(slot), int(gen)
    except ValueError:
        return None


# ---------------------------------------------------------------- the template's JSON lines

def template_line(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode() + b"\n"


def spawn_request(config: WorkerConfig) -> bytes:
    return template_line({"config": config.__dict__})


def read_spawn_request(line: bytes) -> WorkerConfig:
    return WorkerConfig(**json.loads(line)["config"])
