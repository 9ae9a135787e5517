"""Starting worker processes from a clean interpreter, and ending them.

Workers are never forked from the supervisor: its sockets and state must not leak into
a child. Each worker gets its own session (process group) so a kill reaches anything
the handler started, and a pidfd so its exit wakes the supervisor's poll at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil

from isopool.worker.process import ENV_CONFIG, WorkerConfig


class Process:
    """A started worker: pid, pidfd for the poll loop, and reaping."""

    def __init__(self, popen: subprocess.Popen):
        self.popen = popen
        self.pid = popen.pid
        self.pidfd = os.pidfd_open(self.pid)
        self.returncode: int | None = None
        self._ps: psutil.Process | None = None

    def resources(self) -> tuple[int, int, float]:
        """(RSS bytes, USS bytes, CPU %) of the worker and its children; zeros once it is gone."""
        try:
            if self._ps is None:
                self._ps = psutil.Process(self.pid)
                self._ps.cpu_percent()
            procs = [self._ps, *self._ps.children(recursive=True)]
            rss = uss = 0
            for p in procs:
                mem = p.memory_full_info()
                rss += mem.rss
                uss += mem.uss
            return rss, uss, self._ps.cpu_percent()
        except (psutil.Error, OSError):
            return 0, 0, 0.0

    def poll(self) -> int | None:
        """Reap if exited. Returns the returncode (negative = killed by that signal)."""
        if self.returncode is None:
            self.returncode = self.popen.poll()
            if self.returncode is not None:
                os.close(self.pidfd)
        return self.returncode

    def signal(self, sig: int) -> None:
        """Signal the worker's whole process group (it leads its own session)."""
        if self.returncode is not None:
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            os.kill(self.pid, sig)


def spawn(config: WorkerConfig, log_file=None) -> Process:
    env = dict(os.environ)
    env[ENV_CONFIG] = config.to_env()
    env.setdefault("PYTHONUNBUFFERED", "1")
    popen = subprocess.Popen(
        [sys.executable, "-m", "isopool.worker"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=log_file,
        close_fds=True,
        start_new_session=True,
    )
    return Process(popen)


def kill_now(proc: Process) -> None:
    proc.signal(signal.SIGKILL)
