"""The supervisor daemon: the queue, dispatch, worker slots, restart policy, status and events."""

from .config import PoolConfig
from .loop import StartupError, Supervisor

__all__ = ["PoolConfig", "Supervisor", "StartupError"]
