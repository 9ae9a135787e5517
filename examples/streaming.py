"""A streaming handler: a model that returns a generator streams its parts as they are made.

    isopool serve --model isopool.examples.streaming:Countdown
    isopool infer --stream '{"n": 5, "delay": 0.2}'

Input {"n": N, "tag": T, "delay": S, "crash_after": K, "pad": B}: yields {"tag": T, "i": i}
for i < N (with "pad": B bytes if B is given), sleeping S between parts, and os._exit(3)
after K parts if K is given. The input
{"stats": true} returns what this worker's generators did: parts produced, streams
closed before their end (a client that stopped early, or cancelled).
"""

from __future__ import annotations

import os
import time
from typing import Any, Iterator

STATS = {"parts": 0, "closed_early": 0, "finished": 0}


class Countdown:
    def __call__(self, x: dict) -> Any:
        if x.get("stats"):
            return dict(STATS)
        return self.parts(x)

    def parts(self, x: dict) -> Iterator[dict]:
        done = False
        pad = {"pad": b"z" * int(x["pad"])} if x.get("pad") else {}
        try:
            for i in range(int(x.get("n", 3))):
                if i and x.get("delay"):
                    time.sleep(float(x["delay"]))
                if x.get("crash_after") is not None and i >= x["crash_after"]:
                    os._exit(3)
                STATS["parts"] += 1
                yield {"tag": x.get("tag"), "i": i, **pad}
            done = True
        finally:
            STATS["finished" if done else "closed_early"] += 1
