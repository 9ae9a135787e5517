"""The built-in default model: a tiny deterministic MLP, so `isopool serve` does real torch work.

Input: 16 numbers, or a batch of them — a list, nested list, numpy array or torch tensor
of shape (16,) or (N, 16). Output: a float32 numpy array of shape (4,) or (N, 4), the
logits of Linear(16, 32) -> ReLU -> Linear(32, 4) with weights drawn from seed 0.
The same input always gives the same output, in every worker and every run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

IN_FEATURES = 16
OUT_FEATURES = 4
SEED = 0


class DefaultModel:
    # the tensors it takes and gives (protocol/signature.py): GET /v2/models/default says so
    signature = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, IN_FEATURES]}],
                 "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, OUT_FEATURES]}]}

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(SEED)
        self.net = torch.nn.Sequential(torch.nn.Linear(IN_FEATURES, 32), torch.nn.ReLU(), torch.nn.Linear(32, OUT_FEATURES))
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        self.net.eval().requires_grad_(False)

    def __call__(self, x: Any) -> np.ndarray:
        if isinstance(x, torch.Tensor):
            t = x.to(torch.float32)
        else:  # inputs arrive read-only; a small copy gives torch a writable array
            t = torch.from_numpy(np.array(x, dtype=np.float32))
        if t.shape[-1:] != (IN_FEATURES,) or t.dim() > 2:
            raise ValueError(f"the default model takes shape ({IN_FEATURES},) or (N, {IN_FEATURES}), "
                             f"got {tuple(t.shape)}")
        return self.net(t).numpy()
