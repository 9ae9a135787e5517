"""The benchmark suite: isopool against the executors people use today, in one process tree.

    isopool bench [--quick] [--repeats 3] [--out bench/results]

Every mechanism runs the same model (bench/models.py: Linear(256, 256) + ReLU) on the same
number of worker processes (2), one mechanism after another:

    inproc     the model called in this process: the ideal, no isolation at all
    isopool    Client (sync, thread-safe) / AsyncClient; isopool_threads2: 2 torch threads per
               worker instead of the default share (cores / workers = 1 here)
    ppe        concurrent.futures.ProcessPoolExecutor
    mp_pool    multiprocessing.Pool
    loky, pebble   (from the `bench` extra)

Workloads: tiny-request throughput (64 in flight), sequential latency (p50/p99), and a
16 MiB float32 round trip (MiB/s). All mechanisms are started (and warmed up with one
16 MiB round trip) first, then measured in rounds (each once per round), and each figure is the median of --repeats rounds. Every
mechanism's answers are checked against the in-process model; speed is never asserted.
Writes results.md (ratios to inproc and to ppe), results.json and results.png.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import json
import multiprocessing as mp
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import peers
from .models import DIM, BenchModel
from .pool import in_flight_rate, sequential, serve

WORKERS = 2
IN_FLIGHT = 64
BIG_MIB = 16


@dataclass
class Sizes:
    requests: int
    latency: int
    big: int
    repeats: int


QUICK = Sizes(requests=300, latency=100, big=2, repeats=1)
FULL = Sizes(requests=6000, latency=1500, big=8, repeats=3)


class Mechanism:
    """submit(x) -> concurrent Future; call(x) -> result. Subclasses start and stop their workers."""

    name = "?"

    def submit(self, x: Any) -> cf.Future:
        raise NotImplementedError

    def call(self, x: Any) -> Any:
        return self.submit(x).result(timeout=120)

    def throughput(self, x: Any, n: int) -> float:
        return in_flight_rate(self.submit, x, n, IN_FLIGHT)

    def close(self) -> None:
        pass


class InProcess(Mechanism):
    name = "inproc"

    def __init__(self) -> None:
        self.model = BenchModel()

    def submit(self, x: Any) -> cf.Future:
        f: cf.Future = cf.Future()
        f.set_result(self.model(x))
        return f


class IsopoolSync(Mechanism):
    name = "isopool"

    def __init__(self, *serve_args: str, name: str | None = None) -> None:
        from isopool import Client

        self.name = name or self.name
        self.ctx = serve("--workers", str(WORKERS), "--model", "isopool.bench.models:BenchModel", *serve_args)
        self.client = Client(self.ctx.__enter__(), timeout=120)

    def submit(self, x: Any) -> cf.Future:
        return self.client.submit(x)

    def call(self, x: Any) -> Any:
        return self.client.infer(x)

    def close(self) -> None:
        self.client.close()
        self.ctx.__exit__(None, None, None)


class IsopoolAsync(IsopoolSync):
    name = "isopool_async"

    def throughput(self, x: Any, n: int) -> float:
        from isopool import AsyncClient

        async def run() -> float:
            async with AsyncClient(self.client.endpoint, timeout=120) as c:
                async def lane(k: int) -> None:
                    for _ in range(k):
                        await c.infer(x)

                per = n // IN_FLIGHT
                t = time.perf_counter()
                await asyncio.gather(*(lane(per) for _ in range(IN_FLIGHT)))
                return per * IN_FLIGHT / (time.perf_counter() - t)

        return asyncio.run(run())


class Executor(Mechanism):
    """Any concurrent.futures-style executor whose workers build the model in an initializer."""

    def __init__(self, name: str, make: Callable[[], Any], schedule: Callable[[Any, Any], cf.Future] | None = None):
        self.name = name
        self.executor = make()
        self.schedule = schedule or (lambda ex, x: ex.submit(peers.run, x))
        for f in [self.submit(np.zeros(DIM, np.float32)) for _ in range(WORKERS * 4)]:
            f.result(timeout=120)  # every worker up and its model built

    def submit(self, x: Any) -> cf.Future:
        return self.schedule(self.executor, x)

    def close(self) -> None:
        self.executor.shutdown(wait=True) if hasattr(self.executor, "shutdown") else None


class MpPool(Mechanism):
    name = "mp_pool"

    def __init__(self) -> None:
        self.pool = mp.get_context("spawn").Pool(WORKERS, initializer=peers.init)
        self.call(np.zeros(DIM, np.float32))

    def submit(self, x: Any) -> cf.Future:
        f: cf.Future = cf.Future()
        self.pool.apply_async(peers.run, (x,), callback=f.set_result, error_callback=f.set_exception)
        return f

    def close(self) -> None:
        self.pool.close()
        self.pool.join()


def mechanisms(names: list[str]) -> dict[str, Callable[[], Mechanism]]:
    spawn = mp.get_context("spawn")
    makers: dict[str, Callable[[], Mechanism]] = {
        "inproc": InProcess,
        "isopool": IsopoolSync,
        "isopool_async": IsopoolAsync,
        # the default gives each worker cores/workers torch threads; this oversubscribes 2 cores
        "isopool_threads2": lambda: IsopoolSync("--threads", "2", name="isopool_threads2"),
        "ppe": lambda: Executor("ppe", lambda: cf.ProcessPoolExecutor(WORKERS, mp_context=spawn,
                                                                      initializer=peers.init)),
        "mp_pool": MpPool,
    }
    try:
        import loky

        makers["loky"] = lambda: Executor("loky", lambda: loky.ProcessPoolExecutor(WORKERS, initializer=peers.init))
    except ImportError:
        pass
    try:
        import pebble

        makers["pebble"] = lambda: Executor(
            "pebble", lambda: pebble.ProcessPool(WORKERS, initializer=peers.init, context=spawn),
            lambda ex, x: ex.schedule(peers.run, (x,)))
    except ImportError:
        pass
    return {n: makers[n] for n in names if n in makers}


def check(mech: Mechanism, model: BenchModel, rng: np.random.Generator) -> bool:
    """Answers equal the in-process model: tiny inputs, and the big echo byte for byte."""
    xs = [rng.standard_normal(DIM).astype(np.float32) for _ in range(8)]
    futures = [mech.submit(x) for x in xs]
    ok = all(np.allclose(f.result(timeout=120), model(x), rtol=1e-5, atol=1e-6) for f, x in zip(futures, xs))
    big = rng.standard_normal(1 << 16).astype(np.float32)
    return ok and np.array_equal(mech.call({"echo": big}), big)


def warm_up(mech: Mechanism, sizes: Sizes) -> None:
    """One large round trip before any timing: the first use of 16 MiB buffers pays page
    faults in every process it crosses, which is start-up, not throughput."""
    if sizes.big:
        mech.call({"echo": np.zeros(BIG_MIB * 2**20 // 4, dtype=np.float32)})


def measure(mech: Mechanism, sizes: Sizes) -> dict[str, float]:
    """One run of every workload."""
    x = np.random.default_rng(1).standard_normal(DIM).astype(np.float32)
    big = np.random.default_rng(2).standard_normal(BIG_MIB * 2**20 // 4).astype(np.float32)
    figures = {"req_per_s": mech.throughput(x, sizes.requests)}
    figures["p50_us"], figures["p99_us"] = sequential(mech.call, x, sizes.latency, warm=0)
    t = time.perf_counter()
    for _ in range(sizes.big):
        mech.call({"echo": big})
    figures["mib_per_s"] = BIG_MIB * sizes.big / (time.perf_counter() - t)
    return figures


def table(results: dict[str, dict]) -> str:
    base, ppe = results.get("inproc", {}), results.get("ppe", {})

    def ratio(row: dict, ref: dict, key: str, higher_better: bool = True) -> str:
        if not ref or not ref.get(key) or not row.get(key):
            return "-"
        r = row[key] / ref[key] if higher_better else ref[key] / row[key]
        return f"{r:.2f}×"

    lines = ["| mechanism | correct | req/s (64 in flight) | × inproc | × ppe | p50 µs | p99 µs | × ppe (p50) "
             "| 16 MiB round trip MiB/s | × ppe |", "|" + "---|" * 10]
    for name, row in results.items():
        lines.append(
            f"| {name} | {'yes' if row['correct'] else 'NO'} | {row['req_per_s']:.0f} | "
            f"{ratio(row, base, 'req_per_s')} | {ratio(row, ppe, 'req_per_s')} | {row['p50_us']:.0f} | "
            f"{row['p99_us']:.0f} | {ratio(row, ppe, 'p50_us', False)} | "
            + ("n/a: nothing is copied | - |" if name == "inproc" else
               f"{row['mib_per_s']:.0f} | {ratio(row, ppe, 'mib_per_s')} |"))
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (key, title) in zip(axes, [("req_per_s", "tiny requests/s (64 in flight), higher is better"),
                                       ("p50_us", "p50 latency µs, lower is better"),
                                       ("mib_per_s", "16 MiB round trip MiB/s, higher is better")]):
        shown = [n for n in names if not (key == "mib_per_s" and n == "inproc")]  # in-process moves no bytes
        ax.bar(shown, [results[n][key] for n in shown], color=["#4c72b0" if "isopool" in n else "#999999"
                                                                for n in shown])
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(names: list[str], sizes: Sizes, out: Path) -> dict[str, dict]:
    out.mkdir(parents=True, exist_ok=True)
    model, rng = BenchModel(), np.random.default_rng(0)
    mechs: dict[str, Mechanism] = {}
    correct: dict[str, bool] = {}
    runs: dict[str, dict[str, list[float]]] = {}
    try:
        for name, make in mechanisms(names).items():
            mechs[name] = make()
            correct[name] = check(mechs[name], model, rng)
            warm_up(mechs[name], sizes)
        # every mechanism once per round, so a noisy minute on this machine hits them all alike
        for r in range(sizes.repeats):
            for name, mech in mechs.items():
                figures = measure(mech, sizes)
                for key, value in figures.items():
                    runs.setdefault(name, {}).setdefault(key, []).append(value)
                print(f"round {r + 1} {name}: " + ", ".join(f"{k} {v:.0f}" for k, v in figures.items()), flush=True)
    finally:
        for mech in mechs.values():
            mech.close()
    results = {name: {"correct": correct[name], **{k: round(statistics.median(v), 1) for k, v in runs[name].items()}}
               for name in mechs}
    report = table(results)
    (out / "results.md").write_text(report + "\n")
    (out / "results.json").write_text(json.dumps({"workers": WORKERS, "in_flight": IN_FLIGHT, "sizes": sizes.__dict__,
                                                  "results": results}, indent=2))
    plot(results, out / "results.png")
    print(report)
    return results


ALL = ["inproc", "isopool", "isopool_async", "isopool_threads2", "ppe", "mp_pool", "loky", "pebble"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="isopool bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat: checks correctness fast")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--only", nargs="*", default=ALL, help=f"mechanisms to run (default all of {ALL})")
    args = ap.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.repeats:
        sizes = Sizes(sizes.requests, sizes.latency, sizes.big, args.repeats)
    results = run(args.only, sizes, args.out)
    return 0 if all(r["correct"] for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
