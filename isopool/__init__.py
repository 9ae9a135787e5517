"""isopool: a multiprocess, isolated inference worker pool for PyTorch models.

    from isopool import Client
    with Client() as c:
        y = c.infer(x, timeout=5.0)
"""

from isopool.client import AsyncClient, Client
from isopool.protocol.limits import Limits
from isopool.errors import (
    BadRequest,
    IsopoolError,
    Overloaded,
    PoisonRequest,
    RemoteError,
    RequestTimeout,
    ShuttingDown,
    Unavailable,
    WorkerCrashed,
)

__version__ = "0.1.0"

__all__ = [
    "Client", "AsyncClient", "Limits", "IsopoolError", "RemoteError", "WorkerCrashed", "PoisonRequest",
    "RequestTimeout", "Overloaded", "ShuttingDown", "BadRequest", "Unavailable", "__version__",
]
