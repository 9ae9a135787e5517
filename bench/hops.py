"""What one hop costs per message: plain messages, a bundle of frames, a packed bundle.

    python -m isopool.bench.hops [--messages 16] [--rounds 3000]

Sends bursts of result messages (a 256-float32 array each, as the benchmark model returns)
over ipc between two sockets of this process, receives them and opens them, and prints
microseconds per message for each way of carrying a burst. This is the measurement behind
packing small messages into the bundle index (protocol/transport.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time

import numpy as np
import zmq

from isopool.protocol import encode, ops
from isopool.protocol.transport import PACK_BELOW, bundle, drain, send_frames, unbundle


def per_message_us(a: zmq.Socket, b: zmq.Socket, messages: list[list], rounds: int, packed: bool | None) -> float:
    """packed None: each message sent alone; False: one bundle of frames; True: one packed bundle."""
    t = time.perf_counter()
    for _ in range(rounds):
        if packed is None:
            outgoing = messages
        else:  # pack_below 0: nothing is small enough to pack
            outgoing = [bundle(messages, pack_below=PACK_BELOW if packed else 0)]
        for message in outgoing:
            send_frames(a, message)
        got = 0
        while got < len(messages):
            if not b.poll(5000):
                raise RuntimeError("a burst did not arrive")
            for frames in drain(b, len(messages)):
                got += len(unbundle(frames))
    return (time.perf_counter() - t) / rounds / len(messages) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3000)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="iso-hops-")
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind(f"ipc://{tmp}/hops.sock")
        b.connect(f"ipc://{tmp}/hops.sock")
        x = np.zeros(256, np.float32)
        messages = [encode(ops.RESULT, [b"client", i], x) for i in range(args.messages)]
        ways = {"plain": None, "bundle_of_frames": False, "packed_bundle": True}
        per_message_us(a, b, messages, 200, True)  # warm up
        result = {name: round(min(per_message_us(a, b, messages, args.rounds, packed) for _ in range(3)), 2)
                  for name, packed in ways.items()}
        print(json.dumps({"messages_per_burst": args.messages, "us_per_message": result}))
    finally:
        a.close(0)
        b.close(0)
        ctx.term()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
