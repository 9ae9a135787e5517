"""Typed errors. They cross the wire as data (to_dict/from_dict), never as pickles.

A RemoteError keeps the handler's traceback text and, like concurrent.futures,
attaches it as __cause__ so it is printed under the local traceback.
"""

from __future__ import annotations

from typing import Any


class IsopoolError(Exception):
    """Base of every error isopool raises to a caller."""

    def __init__(self, message: str, **details: Any):
        super().__init__(message)
        self.message = message
        self.details = details

    def __getattr__(self, name: str) -> Any:
        # details (exit_code, attempts, setting, ...) read as attributes
        details = self.__dict__.get("details", {})
        if name in details:
            return details[name]
        raise AttributeError(name)

    def __reduce__(self):  # keep errors copyable/picklable for local use (never sent)
        return (_rebuild, (type(self).__name__, self.to_dict()))

    def to_dict(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "message": self.message, **self.details}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "IsopoolError":
        data = dict(data)
        cls = _REGISTRY.get(str(data.pop("type", "")), IsopoolError)
        message = str(data.pop("message", "unknown error"))
        err = cls(message, **data)
        if isinstance(err, RemoteError) and err.details.get("traceback"):
            err.__cause__ = RemoteTraceback(err.details["traceback"])
        return err


class RemoteTraceback(Exception):
    """Carries the handler's traceback text so Python prints it as the cause."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return "\n" + self.tb


class RemoteError(IsopoolError):
    """The handler raised. details: remote_type, traceback, worker, pid. The worker kept serving."""


class WorkerCrashed(IsopoolError):
    """The worker process died while running the request. details: attempts (each with
    worker, pid, exit_code, signal, reason)."""


class PoisonRequest(IsopoolError):
    """The request killed poison_threshold workers; it is never retried again."""


class RequestTimeout(IsopoolError):
    """The request passed its deadline. details: setting (which timeout to raise), started."""


class Overloaded(IsopoolError):
    """The queue is full; retry later or raise --max-queue."""


class ShuttingDown(IsopoolError):
    """The supervisor is draining and accepts no new requests."""


class BadRequest(IsopoolError):
    """The request could not be decoded or broke a limit. details: setting (if a limit)."""


class Unavailable(IsopoolError):
    """The supervisor could not be reached or went away."""


class Cancelled(IsopoolError):
    """The request was cancelled before it finished."""


class NotAllowed(IsopoolError):
    """The caller's key may not run this operation (control ops need an admin key)."""


class UnknownModel(IsopoolError):
    """No model of that name is served here. details: models (the names that are)."""


class InternalError(IsopoolError):
    """The supervisor failed while handling this request: a bug in isopool, not in the request
    or the model. The pool keeps serving; the supervisor's log has the traceback."""


_REGISTRY: dict[str, type[IsopoolError]] = {
    cls.__name__: cls
    for cls in (
        IsopoolError, RemoteError, WorkerCrashed, PoisonRequest, RequestTimeout, Overloaded,
        ShuttingDown, BadRequest, Unavailable, Cancelled, NotAllowed, InternalError, UnknownModel,
    )
}


def _rebuild(name: str, data: dict[str, Any]) -> IsopoolError:
    return IsopoolError.from_dict({**data, "type": name})
