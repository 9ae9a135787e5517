"""The event stream: one JSON object per event on a PUB socket, and a log line.

PUB never blocks: a slow or absent subscriber loses events, the supervisor never waits.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from typing import Any

import zmq

from isopool.protocol.endpoints import ipc_path

log = logging.getLogger("isopool.events")


class EventLog:
    def __init__(self, ctx: zmq.Context, endpoint: str | None, keep: int = 200):
        self.endpoint = endpoint
        self.recent: deque[dict] = deque(maxlen=keep)
        self.pub = None
        if endpoint:
            self.pub = ctx.socket(zmq.PUB)
            self.pub.setsockopt(zmq.LINGER, 0)
            self.pub.setsockopt(zmq.SNDHWM, 10_000)
            self.pub.bind(endpoint)
            path = ipc_path(endpoint)
            if path is not None:
                os.chmod(path, 0o600)

    def emit(self, kind: str, fields: dict[str, Any]) -> dict:
        event = {"ts": round(time.time(), 6), "kind": kind, **fields}
        self.recent.append(event)
        log.info("%s %s", kind, " ".join(f"{k}={v}" for k, v in fields.items()))
        if self.pub is not None:
            try:
                self.pub.send_multipart([kind.encode(), json.dumps(event).encode()], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        return event

    def close(self) -> None:
        if self.pub is not None:
            self.pub.close(linger=0)
