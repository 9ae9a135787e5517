"""The errors a caller can catch. Defined with the wire in isopool.protocol.errors."""

from isopool.protocol.errors import (  # noqa: F401
    BadRequest,
    Cancelled,
    InternalError,
    IsopoolError,
    NotAllowed,
    Overloaded,
    PoisonRequest,
    RemoteError,
    RemoteTraceback,
    RequestTimeout,
    ShuttingDown,
    Unavailable,
    UnknownModel,
    WorkerCrashed,
)

__all__ = [
    "IsopoolError", "RemoteError", "RemoteTraceback", "WorkerCrashed", "PoisonRequest",
    "RequestTimeout", "Overloaded", "ShuttingDown", "BadRequest", "Unavailable", "Cancelled",
    "NotAllowed", "InternalError", "UnknownModel",
]
