"""Memory of N workers against one, for a model whose weights dominate: does --preload model share them?

    python -m isopool.bench.memory [--workers 8] [--mib 256]

Sums the PSS of the pool's processes (workers and template): each shared page is split
among the processes sharing it, so the sum is the memory the pool really uses. (USS would
miss the weights entirely once they are shared.) With --preload imports each worker builds
its own model; with --preload model the template builds it once and workers share its
pages copy-on-write (CPU only).
"""

from __future__ import annotations

import argparse
import json

import psutil

from isopool import Client

from .pool import serve


class Heavy:
    """A model that is mostly weights: `mib` MiB of float32 parameters (context.config['mib'])."""

    def __init__(self, context=None) -> None:
        import torch

        mib = int((context.config if context else {}).get("mib", 256))
        torch.manual_seed(0)
        side = int((mib * 2**20 / 4) ** 0.5)
        self.layer = torch.nn.Linear(side, side, bias=False).requires_grad_(False)

    def __call__(self, x):
        return float(self.layer.weight[0, 0])


def uss_of(endpoint: str) -> dict:
    with Client(endpoint) as c:
        status = c.status()
    workers = [w["pid"] for w in status["workers"]]
    sup = psutil.Process(status["pool"]["pid"])
    others = [p.pid for p in sup.children() if p.pid not in workers]  # the template
    pss = lambda pids: sum(psutil.Process(p).memory_full_info().pss for p in pids)  # noqa: E731
    return {"workers_pss_mib": round(pss(workers) / 2**20), "template_pss_mib": round(pss(others) / 2**20)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--mib", type=int, default=256)
    args = ap.parse_args()
    import tempfile
    from pathlib import Path

    cfg = Path(tempfile.mkdtemp()) / "heavy.toml"
    cfg.write_text(f'[isopool]\nmodel = "isopool.bench.memory:Heavy"\nuser-config = {{mib = {args.mib}}}\n')
    rows = {}
    for preload in ("imports", "model"):
        for n in (1, args.workers):
            with serve("--config", str(cfg), "--workers", str(n), "--preload", preload) as endpoint:
                m = uss_of(endpoint)
                rows[f"{preload}_{n}_workers"] = {**m, "total_mib": m["workers_pss_mib"] + m["template_pss_mib"]}
                print(json.dumps({f"{preload}, {n} worker(s)": rows[f"{preload}_{n}_workers"]}), flush=True)
    one = rows["imports_1_workers"]["total_mib"]  # one worker with its own model
    print(json.dumps({f"{args.workers} workers / 1, preload model": round(
                          rows[f"model_{args.workers}_workers"]["total_mib"] / one, 2),
                      f"{args.workers} workers / 1, preload imports": round(
                          rows[f"imports_{args.workers}_workers"]["total_mib"] / one, 2)}))


if __name__ == "__main__":
    main()
