"""Every setting of a pool, in one dataclass. CLI flags and config files both land here."""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from isopool.protocol.limits import Limits
from isopool.protocol.schemas import MAX_WORKERS
from isopool.protocol.contract import DEFAULT_MODEL, SHM_THRESHOLD

MODEL_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
MAX_SPIN_US = 100_000  # a spin longer than a tenth of a second would be a busy loop, not a wait


@dataclass
class PoolConfig:
    model: str = DEFAULT_MODEL
    workers: int = 2
    endpoint: str | None = None  # default: ipc:// in the per-user runtime directory
    insecure: bool = False  # allow tcp:// without authentication
    curve_secret_key: str | None = None  # the server's .key_secret file: CURVE on the frontend
    curve_clients: str | None = None  # directory of client public keys (*.key) allowed in
    curve_admins: str | None = None  # directory of public keys also allowed control ops
    devices: str = "cpu"
    threads: int = 0  # threads per worker (torch, Rayon pools); 0 = cores / workers
    max_queue: int = 4096  # queued requests beyond which new ones get Overloaded (one client: 7/8 of it)
    max_queue_bytes: int = 1 << 30  # bytes of the requests held (queued or running) beyond which: Overloaded
    prefetch: int = 16  # requests a worker may hold at once; chosen by measurement (README, Performance)
    max_batch_size: int = 8  # models with batch(list) -> list get up to this many requests at once
    max_batch_wait_ms: float = 2.0  # a partial batch waits at most this long for more
    spin_us: int = 300  # after quick work, look for the next message this long before sleeping (0: never)
    request_timeout: float = 300.0  # cap on any request, and the default deadline
    max_attempts: int = 2  # tries of a request whose worker crashed (1 = no retry)
    poison_threshold: int = 3  # worker deaths after which an input is refused for good
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 10.0  # an idle worker silent this long is replaced
    start_timeout: float = 120.0  # a worker not READY by then is killed
    kill_grace: float = 3.0  # TERM, then KILL after this many seconds (given up on after as many more, 30 s at least)
    drain_timeout: float = 30.0  # SIGTERM: finish work for at most this long
    max_restarts: int = 10  # restarts within restart_window before the pool is degraded
    restart_window: float = 60.0
    backoff_base: float = 0.1
    backoff_max: float = 10.0
    max_requests: int = 0  # recycle a worker after this many requests (0: never)
    max_requests_jitter: int = 0  # + random 0..jitter, so workers don't recycle together
    max_rss: int = 0  # bytes; recycle a worker whose RSS grows past it (0: never)
    stats_interval: float = 1.0  # how often worker RSS/CPU are sampled
    log_rate: int = 128 * 1024  # bytes a second of each worker's output that are logged (0: no limit)
    max_message_bytes: int = Limits.max_message_bytes
    max_depth: int = Limits.max_depth
    max_elements: int = Limits.max_elements
    arrays: str = "auto"  # how handlers receive arrays: auto | numpy | torch
    shm: str = "auto"  # auto: large arrays of clients on this host travel in shared memory (protocol/shm.py) | off
    shm_threshold: int = SHM_THRESHOLD  # arrays of this many bytes or more go by shared memory
    max_shm_bytes: int = 4 << 30  # shared memory of requests in flight, per model; past it: Overloaded
    http: str | None = None  # HOST:PORT: serve the Open Inference Protocol there (gateway processes)
    http_workers: int = 0  # gateway processes (0: half the cores, at least 1)
    http_cert: str | None = None  # TLS certificate (PEM) for --http
    http_key: str | None = None  # its private key (PEM)
    http_tokens: str | None = None  # file of "ROLE TOKEN" lines: bearer tokens for --http (gateway/auth.py)
    http_access_log: bool = False  # one log line per HTTP request (in --log-format)
    http_client_timeout: float = 10.0  # seconds for a request's headers, and between pieces of its body
    metrics_port: int = 0  # serve Prometheus /metrics here (0: off)
    metrics_host: str = "127.0.0.1"
    integrity_interval: float = 0.0  # seconds between weight fingerprint checks of idle workers (0: off)
    integrity_every_request: bool = False  # also check after every request
    isolation: str = "none"  # none | tenant (a worker serves one tenant) | request (a fresh worker each)
    preload: str = "auto"  # none (fresh interpreter per worker) | imports | model (CPU: share weights) | auto
    # (model where safe: CPU, no sandbox, a model that takes no context or says fork_safe = True; else imports)
    sandbox: bool = False  # workers under uids of their own, no_new_privs, seccomp (supervisor/sandbox.py)
    sandbox_user: str | None = None  # with --sandbox: every worker as this user, instead of a uid per slot
    sandbox_network: str = "host"  # host | none: with --sandbox, none gives each worker an empty network namespace
    user_config: dict = field(default_factory=dict)  # [models.NAME.config] and --set: the factory's context.config
    model_name: str = "default"  # the name of the one model served (its [models.NAME] table)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        problems = []
        positive = ("workers", "max_queue", "max_queue_bytes", "prefetch", "max_batch_size", "max_attempts", "poison_threshold", "max_restarts",
                    "max_message_bytes", "max_depth", "max_elements")
        for name in positive:
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("request_timeout", "heartbeat_interval", "heartbeat_timeout", "start_timeout",
                     "restart_window", "stats_interval", "http_client_timeout"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        for f in fields(self):
            value = getattr(self, f.name)
            if type(value) is float and not math.isfinite(value):
                problems.append(f"{f.name.replace('_', '-')} must be a finite number, got {value}")
        if self.workers > MAX_WORKERS:
            problems.append(f"workers must be at most {MAX_WORKERS}, got {self.workers}")
        if self.http_workers < 0 or self.http_workers > 64:
            problems.append(f"http-workers must be 0 (half the cores) to 64, got {self.http_workers}")
        if not 0 <= self.metrics_port <= 65535:
            problems.append(f"metrics-port must be 0 (off) to 65535, got {self.metrics_port}")
        if not 0 <= self.spin_us <= MAX_SPIN_US:
            problems.append(f"spin_us must be 0 to {MAX_SPIN_US} microseconds, got {self.spin_us}")
        for name in ("max_batch_wait_ms", "integrity_interval", "threads", "max_requests", "max_requests_jitter", "max_rss",
                     "log_rate", "kill_grace",
                     "drain_timeout", "backoff_base", "backoff_max"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative, got {getattr(self, name)}")
        if self.shm not in ("auto", "off"):
            problems.append(f"shm must be auto or off, got {self.shm!r}")
        if self.shm_threshold < 1 or self.max_shm_bytes < 0:
            problems.append("shm-threshold must be at least 1 byte and max-shm-bytes not negative")
        if self.arrays not in ("auto", "numpy", "torch"):
            problems.append(f"arrays must be auto, numpy or torch, got {self.arrays!r}")
        if self.isolation not in ("none", "tenant", "request"):
            problems.append(f"isolation must be none, tenant or request, got {self.isolation!r}")
        if self.sandbox_network not in ("host", "none"):
            problems.append(f"sandbox-network must be host or none, got {self.sandbox_network!r}")
        if self.sandbox_user and not self.sandbox:
            problems.append("--sandbox-user is a setting of --sandbox; give --sandbox too")
        if self.sandbox and self.preload == "model":
            problems.append("--sandbox with --preload model would build the model outside the sandbox (in the "
                            "template, with the supervisor's rights); use --preload imports or none")
        if self.preload not in ("none", "imports", "model", "auto"):
            problems.append(f"preload must be none, imports, model or auto, got {self.preload!r}")
        elif self.preload == "model" and self.devices.strip().lower() != "cpu":
            problems.append("preload=model builds the model before fork, and CUDA cannot survive fork; "
                            "it needs --devices cpu (use --preload imports with GPUs)")
        if ":" not in self.model:
            problems.append(f"model must look like MODULE:ATTR, got {self.model!r}")
        if not MODEL_NAME.fullmatch(self.model_name):
            problems.append(f"a model's name is 1 to 64 letters, digits, '_', '-' or '.', got {self.model_name!r}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def limits(self) -> Limits:
        return Limits(max_message_bytes=self.max_message_bytes, max_depth=self.max_depth,
                      max_elements=self.max_elements)

    def gateway_count(self) -> int:
        return self.http_workers or max(1, (os.cpu_count() or 1) // 2)

    def worker_threads(self) -> int:
        if self.threads:
            return self.threads
        return max(1, (os.cpu_count() or 1) // self.workers)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass
class ServeConfig:
    """What `isopool serve` runs: one PoolConfig per model, in order. The daemon's own
    settings (endpoint, keys, metrics, limits, timers) are the same in each; the first
    model's are read for them."""

    models: list[PoolConfig]

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("no model to serve")
        names = [m.model_name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must differ, got {', '.join(names)}")

    @property
    def daemon(self) -> PoolConfig:
        return self.models[0]

    def names(self) -> list[str]:
        return [m.model_name for m in self.models]
