"""sd_notify: tell systemd (or a test harness) that the pool is ready or stopping."""

from __future__ import annotations

import os
import socket


def sd_notify(message: str) -> bool:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(1.0)
            sock.sendto(message.encode(), path)
        return True
    except OSError:
        return False
