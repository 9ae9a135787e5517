"""Hostile models, for the tests of what a compromised model cannot do (tests/supervisor/test_hostile.py).

Hostile answers like faulty.Echo ({"echo": x, "pid": ...}) until a request asks it to attack:

    {"attack": "impersonate", "backend": "ipc://...", "slot": S, "generation": G, "victim": PID, "seconds": 2}
        kill the worker PID, then connect to the backend as slot S's next process (the identity
        an older isopool would have given it: "S.G", and "S.G.<a guessed token>"), say READY every
        50 ms and answer whatever arrives with forged results; answers how many messages it got
        and sent
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import msgpack
import zmq

from isopool.protocol import ops, pack_header


class Hostile:
    def __call__(self, x: Any) -> Any:
        if isinstance(x, dict) and x.get("attack") == "impersonate":
            return impersonate(x)
        return {"echo": x, "pid": os.getpid()}


def impersonate(x: dict) -> dict:
    try:
        os.kill(int(x["victim"]), signal.SIGKILL)  # same user, no sandbox: this works
    except ProcessLookupError:
        pass
    ctx = zmq.Context()
    socks = []
    for ident in (b"%d.%d" % (x["slot"], x["generation"]), b"%d.%d.%s" % (x["slot"], x["generation"], b"0" * 32)):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.IDENTITY, ident)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(x["backend"])
        socks.append(s)
    ready = pack_header(ops.READY, None, capacity=16, pid=os.getpid())
    sent = received = 0
    end = time.monotonic() + float(x.get("seconds", 2.0))
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    while time.monotonic() < end:
        for s in socks:  # again and again: whenever the real replacement is up, claim to be it
            s.send_multipart([ready])
            sent += 1
        for s, _ in poller.poll(50):
            frames = s.recv_multipart()
            received += 1
            header = msgpack.unpackb(frames[0])
            forged = pack_header(ops.RESULT, header.get("id"), attempt=header.get("attempt", 0))
            s.send_multipart([forged, msgpack.packb({"forged": True})])
            sent += 1
    for s in socks:
        s.close()
    ctx.term()
    return {"received": received, "sent": sent}
