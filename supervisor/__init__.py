"""The supervisor daemon: a pure core (core.py: every decision) inside an I/O shell (loop.py).

Importing the package imports neither: `Supervisor` and `StartupError` load the shell on
first use, so the core and its simulator (sim.py) run without ZeroMQ or processes.
"""

from .config import PoolConfig

__all__ = ["PoolConfig", "Supervisor", "StartupError"]


def __getattr__(name: str):
    if name in ("Supervisor", "StartupError"):
        from . import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
