"""The in-flight table's record: one per accepted request until its final answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Key = tuple  # (client routing id: bytes, client's request id)


@dataclass(eq=False, slots=True)
class Request:
    key: Key
    body: list  # payload + buffer frames, forwarded untouched (kept for retries)
    deadline: float  # monotonic
    timeout: float  # seconds the caller allowed (for error messages)
    timeout_setting: str  # which setting bounds it: "timeout" (client's) or "request_timeout"
    accepted_at: float
    retry: bool = True
    stream: bool = False
    bundles: bool = False  # its client reads bundled replies (protocol/transport.py)
    tenant: object = None  # the isolation key: the client's tenant, or the request itself
    attempt: int = 0  # dispatches so far
    worker: int | None = None  # slot while dispatched
    seq: int = 0  # its dispatch sequence number on that worker (protocol/board.py)
    started_at: float = 0.0
    chunks_sent: int = 0
    crashes: list = field(default_factory=list)  # one dict per worker death it was running in

    @property
    def client(self) -> bytes:
        return self.key[0]

    @property
    def client_id(self) -> Any:
        return self.key[1]
