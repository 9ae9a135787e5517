"""The isopool wire protocol. Nothing else builds or parses frames by hand.

    client --[header, payload, *buffers]--> supervisor --(same payload frames)--> worker
    worker --[header, payload, *buffers]--> supervisor --(same payload frames)--> client

Only headers are rewritten on the way (request ids are mapped, attempts added);
payload and array frames are forwarded untouched. See codec.py for the frame layout.
"""

from . import ops
from .codec import (
    ARRAY_MODES,
    DTYPES,
    decode_error,
    decode_payload,
    encode,
    encode_error,
    encode_payload,
    frame_view,
    total_bytes,
    validate_payload,
)
from .headers import pack_header, peek_id, unpack_header
from .errors import (
    BadRequest,
    Cancelled,
    InternalError,
    IsopoolError,
    NotAllowed,
    Overloaded,
    PoisonRequest,
    RemoteError,
    RequestTimeout,
    ShuttingDown,
    Unavailable,
    WorkerCrashed,
)
from .limits import CLIENT_LIMITS, DEFAULT_LIMITS, Limits
from .ops import VERSION

__all__ = [
    "ops", "VERSION", "Limits", "DEFAULT_LIMITS", "CLIENT_LIMITS", "DTYPES", "ARRAY_MODES",
    "pack_header", "unpack_header", "peek_id", "encode", "encode_payload", "decode_payload",
    "validate_payload", "encode_error", "decode_error", "frame_view", "total_bytes",
    "IsopoolError", "RemoteError", "WorkerCrashed", "PoisonRequest", "RequestTimeout", "Overloaded",
    "ShuttingDown", "BadRequest", "Unavailable", "Cancelled", "NotAllowed", "InternalError",
]
