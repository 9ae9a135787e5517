"""Log output for the daemon and its gateways: text, or one JSON object a line (--log-format)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys

FIELDS = ("worker", "pid", "request", "gateway", "method", "path", "route", "model", "status", "duration_ms",
          "client", "bytes")  # a record's extra fields that JSON lines carry


def worth_a_line(count: int, every: int = 100) -> bool:
    """Whether the count-th of a repeated event is logged: the first 10, then one in `every`,
    so that a flood (a client repeating what it can repeat) is a few lines, not a full disk."""
    return count <= 10 or count % every == 0


_ALIAS_KEY = os.urandom(16)  # this process's: an alias tells nothing across daemons, or about the name


def client_alias(ident: bytes) -> str:
    """How logs and events name a client connection: a keyed hash of its routing id, never
    the id itself. libzmq names a connection that names itself not 0x00 and a counter, and
    a client that learnt the counter (from a `client_stalled` event, say) could connect
    under the name the next such connection will be given; libzmq does not check the names
    it makes up, and aborts the supervisor (an assertion). The alias is stable for the
    daemon's life, so an operator can still follow one client through logs and events."""
    return hashlib.blake2b(ident, digest_size=8, key=_ALIAS_KEY).hexdigest()


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 6), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        for key in FIELDS:
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)
