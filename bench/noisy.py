"""A noisy neighbour: one CPU-bound process on every core, for as long as a benchmark runs.

    with neighbours():        # isopool bench --noisy
        ...measure...

The neighbours run at the same priority as the benchmark (another job on a shared machine
would), each a Python loop that never sleeps; they are killed (and reaped) on the way out,
also when the benchmark fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from typing import Iterator

SPIN = "while True:\n    pass\n"


@contextlib.contextmanager
def neighbours(count: int | None = None) -> Iterator[list[int]]:
    procs = [subprocess.Popen([sys.executable, "-c", SPIN], stdin=subprocess.DEVNULL)
             for _ in range(count or os.cpu_count() or 1)]
    try:
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
        for p in procs:
            p.wait(10)
