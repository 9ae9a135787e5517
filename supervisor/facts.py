"""What only the supervisor's shell (loop.py) knows, for status: its process, sockets and
connections. (status.py, which builds the rest from the cores, does no I/O of its own.)"""

from __future__ import annotations

import os
import time
from typing import Any


def shell_facts(shell: Any) -> dict:
    """What only the supervisor's shell (loop.Supervisor) knows, for status."""
    io = shell.io
    return {"pid": os.getpid(), "time": time.time(), "started_at": shell.started_at,
            "started_wall": shell.started_wall, "endpoint": shell.endpoint, "events_endpoint": io.events.endpoint,
            "event_subscribers": io.events.subscribers, "metrics_url": io.metrics_url,
            "auth_denied": io.auth.denied if io.auth is not None else None, "backend_strangers": shell.strangers,
            "backend_refused": io.zap.refused, "output_dropped": shell.procs.dropped,
            "replies_waiting": shell.to_clients.waiting(),
            "replies_dropped": shell.to_clients.dropped, **io.connections.facts(time.monotonic()),
            **(shell.gateways.facts() if shell.gateways is not None else {"http": None, "http_url": None,
                                                                           "gateways": []})}
