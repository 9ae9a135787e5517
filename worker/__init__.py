"""The worker process: loads the model, answers requests. Never imports the supervisor."""

from .handler import DEFAULT_MODEL, WorkerContext, build_model, resolve

__all__ = ["DEFAULT_MODEL", "WorkerContext", "build_model", "resolve"]
