"""The event stream: one JSON object per event on an XPUB socket, and a log line.

Publishing never blocks: a slow or absent subscriber loses events, the supervisor never
waits. XPUB (rather than PUB) lets the supervisor count subscribers, so a watcher can
tell when its subscription is live and no event it cares about can be missed.
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

from .connections import LISTEN_BACKLOG

log = logging.getLogger("isopool.events")
MAX_TOPIC = 64  # bytes of a subscription's topic
MAX_SUBSCRIPTIONS_READ = 256  # subscription messages read in one pass of the loop


class EventLog:
    def __init__(self, ctx: zmq.Context, endpoint: str | None, keep: int = 200):
        self.endpoint = endpoint
        self.recent: deque[dict] = deque(maxlen=keep)
        self.pub = None
        self.subscribers = 0
        if endpoint:
            self.pub = ctx.socket(zmq.XPUB)
            self.pub.setsockopt(zmq.LINGER, 0)
            self.pub.setsockopt(zmq.SNDHWM, 10_000)
            self.pub.setsockopt(zmq.XPUB_VERBOSER, 1)  # every subscribe and unsubscribe reaches us
            # a subscription is a topic: an event kind or a prefix of one. A longer one drops its
            # connection, as libzmq would otherwise keep any size a subscriber sends, for good
            self.pub.setsockopt(zmq.MAXMSGSIZE, 1 + MAX_TOPIC)
            self.pub.setsockopt(zmq.BACKLOG, LISTEN_BACKLOG)
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

    def read_subscriptions(self) -> None:
        """Count subscribers from XPUB's subscribe (1) / unsubscribe (0) messages, a bounded
        number per call (the loop calls again while there are more)."""
        for _ in range(MAX_SUBSCRIPTIONS_READ):
            try:
                msg = self.pub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if msg[:1] == b"\x01":
                self.subscribers += 1
            elif msg[:1] == b"\x00":
                self.subscribers = max(0, self.subscribers - 1)

    def close(self) -> None:
        if self.pub is not None:
            self.pub.close(linger=0)
