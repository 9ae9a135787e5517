"""--devices: which device each worker gets, round-robin over the list."""

from __future__ import annotations

import re


def cuda_count() -> int:
    import torch  # only when the spec asks for CUDA: a CPU pool's supervisor never imports torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_devices(spec: str, count=cuda_count) -> list[str]:
    """'cpu', 'auto' (every GPU, else CPU), 'cuda' (every GPU) or a list like 'cuda:0,cuda:1'."""
    spec = spec.strip().lower()
    if spec == "cpu":
        return ["cpu"]
    n = count()
    if spec == "auto":
        return [f"cuda:{i}" for i in range(n)] or ["cpu"]
    if spec == "cuda":
        if not n:
            raise ValueError("--devices cuda: no CUDA device is visible to torch (torch.cuda.device_count() is 0); "
                             "use --devices cpu, or auto to use GPUs only when present")
        return [f"cuda:{i}" for i in range(n)]
    devices = []
    for item in (d.strip() for d in spec.split(",")):
        m = re.fullmatch(r"cuda:(\d+)", item)
        if item == "cpu":
            devices.append("cpu")
        elif m and int(m.group(1)) < n:
            devices.append(item)
        elif m:
            raise ValueError(f"--devices {spec}: {item} does not exist; {n} CUDA device(s) visible")
        else:
            raise ValueError(f"--devices {spec}: {item!r} is not a device; use cpu, cuda, cuda:N or auto")
    if not devices:
        raise ValueError("--devices is empty; use cpu, cuda, cuda:N[,cuda:M...] or auto")
    return devices
