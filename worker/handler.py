"""Loading the user's model: `MODULE:ATTR`, called once per worker to build the model."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from isopool.protocol.contract import DEFAULT_MODEL  # noqa: E402,F401 - re-exported
from isopool.protocol.signature import check_signature


@dataclass(frozen=True)
class WorkerContext:
    """What a model factory may ask for: which worker it is, its device and the user config."""

    worker_id: int
    generation: int
    device: str = "cpu"
    threads: int = 1
    config: dict = field(default_factory=dict)


def resolve(spec: str) -> Callable[..., Any]:
    """Import `MODULE:ATTR` (ATTR may be dotted). The current directory is importable, as in gunicorn."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--model must look like MODULE:ATTR (e.g. mypkg.models:Embedder), not {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"module {module_name!r} has no attribute {attr!r} (from --model {spec})") from None
    if not callable(obj):
        raise ValueError(f"--model {spec} names a {type(obj).__name__}, not a class or factory")
    return obj


def wants_context(factory: Callable[..., Any]) -> bool:
    """A factory gets the WorkerContext if it has a `context` parameter or any required one."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    for p in params:
        if p.name == "context":
            return True
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            return True
    return False


def build_model(spec: str, context: WorkerContext) -> Any:
    factory = resolve(spec)
    model = factory(context) if wants_context(factory) else factory()
    if not callable(model) and not callable(getattr(model, "batch", None)):
        raise TypeError(f"{spec} built a {type(model).__name__}, which is neither callable nor has batch(); "
                        "the model is called once per request, or batch(list) once per batch")
    signature = getattr(model, "signature", None)
    if signature is not None:
        try:
            check_signature(signature)
        except ValueError as exc:
            raise ValueError(f"{spec} declares a signature that is not valid: {exc}") from None
    return model


class NotAStream(Exception):
    """A generator's answer to a request that is not a stream: refused before any of it runs."""

    def __init__(self, parts: Any):
        super().__init__("not a stream")
        self.parts = parts

    def close(self) -> None:
        close = getattr(self.parts, "close", None)
        if close is not None:
            close()  # a generator not yet started runs nothing; one that had, runs its finally blocks
