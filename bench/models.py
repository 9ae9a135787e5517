"""The benchmark's model, the same for every mechanism: Linear(256, 256) + ReLU, fixed seed.

A map {"echo": array} is returned as it came, for the large-tensor round trip.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

DIM = 256


class BenchModel:
    def __init__(self) -> None:
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(DIM, DIM), torch.nn.ReLU()).eval().requires_grad_(False)

    def __call__(self, x: Any) -> Any:
        if isinstance(x, dict):
            return x["echo"]
        with torch.inference_mode():
            return self.net(torch.from_numpy(np.array(x, dtype=np.float32, copy=True))).numpy()
