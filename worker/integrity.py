"""Weight integrity: a fingerprint of every parameter and buffer a model holds.

A model that writes to its own weights during a request (a bug, or an input that triggers
an in-place op on a parameter) would corrupt every later answer of that worker. The worker
fingerprints its weights after load and compares later; a mismatch recycles the worker.
"""

from __future__ import annotations

import hashlib
from typing import Any


def modules_of(model: Any) -> list:
    """The torch modules a model is or holds (directly, or as attributes one level down)."""
    import torch

    if isinstance(model, torch.nn.Module):
        return [model]
    found = [v for v in vars(model).values() if isinstance(v, torch.nn.Module)] if hasattr(model, "__dict__") else []
    return found


def fingerprint(model: Any) -> str | None:
    """blake2b over every parameter and buffer (name, dtype, shape, bytes); None if no weights."""
    modules = modules_of(model)
    if not modules:
        return None
    h = hashlib.blake2b(digest_size=16)
    for i, module in enumerate(modules):
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            t = tensor.detach()
            if t.device.type != "cpu":
                t = t.cpu()
            t = t.contiguous()
            h.update(f"{i}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
