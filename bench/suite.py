"""The benchmark suite: isopool against the executors people use today, in one process tree.

    isopool bench [--quick] [--repeats 3] [--out DIR] [--only NAME ...] [--no-embeddings] [--noisy]

Every mechanism runs the same model on the same number of worker processes (2), one
mechanism after another:

    inproc     the model called in this process: the ideal, no isolation at all
    ceiling    the physical limits: a memcpy of the 16 MiB buffer there and back; for the real
               model, 2 processes each calling its batch() on 16 sentences back to back
    isopool    Client (sync, thread-safe) / AsyncClient; isopool_threads2: 2 torch threads per
               worker instead of the default share (cores / workers = 1 here)
    ppe        concurrent.futures.ProcessPoolExecutor
    mp_pool    multiprocessing.Pool
    loky, pebble   (from the `bench` extra)

Workloads, on the tiny model (bench/models.py: Linear(256, 256) + ReLU): tiny-request
throughput (64 in flight), sequential latency (p50/p99), and a 16 MiB float32 round trip
(MiB/s). Then, when the `embeddings` extra is installed, a real model: all-MiniLM-L6-v2,
one sentence per request, 64 in flight (sentences/s); isopool's workers batch concurrent
requests (the Embedder has batch(); --max-batch-size 16 here, EMBED_BATCH), the executors'
workers take one call at a time.
For each model, all mechanisms are started (and warmed up) first, then measured in rounds
(each once per round), and each figure is the median of --repeats rounds. The ceiling is
measured again after each isopool mechanism; that mechanism's "× ceiling" is the median of
its per-round ratios to the mean of the two ceiling figures beside it (and their range). Every
mechanism's answers are checked against the in-process model; speed is never asserted.
Writes results.md (ratios to inproc and to ppe), results.json and results.png (median bars,
min–max whiskers across the rounds) to --out, by default a new directory under
~/.cache/isopool/bench; each says the date, the machine and whether it was a --quick run.
With --noisy, a CPU-bound process runs on every core throughout (bench/noisy.py): the same
ratios on a busy machine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import MECHANISMS as ALL
from . import peers
from .noisy import neighbours
from .models import BATCHING, DIM, EMBED_BATCH, POOL_MODELS, build, embeddings_available
from .pool import in_flight_rate, sequential, serve

WORKERS = 2
IN_FLIGHT = 64
BIG_MIB = 16
EMBED_IN_FLIGHT = 64
SENTENCE = "the supervisor restarts a crashed worker while the other workers keep serving"
WARM_INPUT = {"tiny": np.zeros(DIM, np.float32), "embeddings": SENTENCE}


@dataclass
class Sizes:
    requests: int
    latency: int
    big: int
    repeats: int
    sentences: int  # single-sentence requests per round of the embeddings workload


QUICK = Sizes(requests=300, latency=100, big=2, repeats=1, sentences=16)
FULL = Sizes(requests=6000, latency=1500, big=8, repeats=3, sentences=1024)


class Mechanism:
    """submit(x) -> concurrent Future; call(x) -> result. Subclasses start and stop their workers."""

    name = "?"

    def submit(self, x: Any) -> cf.Future:
        raise NotImplementedError

    def call(self, x: Any) -> Any:
        return self.submit(x).result(timeout=120)

    def throughput(self, x: Any, n: int, in_flight: int = IN_FLIGHT) -> float:
        return in_flight_rate(self.submit, x, n, in_flight)

    def wait_for_workers(self, kind: str) -> None:
        """Every worker up and its model built: a few requests each, answered."""
        for f in [self.submit(WARM_INPUT[kind]) for _ in range(WORKERS * 4)]:
            f.result(timeout=300)

    def close(self) -> None:
        pass


class InProcess(Mechanism):
    name = "inproc"

    def __init__(self, kind: str) -> None:
        self.model = build(kind)

    def submit(self, x: Any) -> cf.Future:
        f: cf.Future = cf.Future()
        f.set_result(self.model(x))
        return f


class IsopoolSync(Mechanism):
    name = "isopool"

    def __init__(self, kind: str, *serve_args: str, name: str | None = None) -> None:
        from isopool import Client

        self.name = name or self.name
        self.ctx = serve("--workers", str(WORKERS), "--model", POOL_MODELS[kind], *BATCHING.get(kind, ()),
                         *serve_args)  # a flag given twice: the last wins
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

    def throughput(self, x: Any, n: int, in_flight: int = IN_FLIGHT) -> float:
        from isopool import AsyncClient

        async def run() -> float:
            async with AsyncClient(self.client.endpoint, timeout=120) as c:
                async def lane(k: int) -> None:
                    for _ in range(k):
                        await c.infer(x)

                per = max(1, n // in_flight)
                t = time.perf_counter()
                await asyncio.gather(*(lane(per) for _ in range(in_flight)))
                return per * in_flight / (time.perf_counter() - t)

        return asyncio.run(run())


class Executor(Mechanism):
    """Any concurrent.futures-style executor whose workers build the model in an initializer."""

    def __init__(self, name: str, kind: str, make: Callable[[], Any],
                 schedule: Callable[[Any, Any], cf.Future] | None = None):
        self.name = name
        self.executor = make()
        self.schedule = schedule or (lambda ex, x: ex.submit(peers.run, x))
        self.wait_for_workers(kind)

    def submit(self, x: Any) -> cf.Future:
        return self.schedule(self.executor, x)

    def close(self) -> None:
        self.executor.shutdown(wait=True) if hasattr(self.executor, "shutdown") else None


class MpPool(Mechanism):
    name = "mp_pool"

    def __init__(self, kind: str) -> None:
        self.pool = mp.get_context("spawn").Pool(WORKERS, initializer=peers.init, initargs=(kind,))
        self.wait_for_workers(kind)

    def submit(self, x: Any) -> cf.Future:
        f: cf.Future = cf.Future()
        self.pool.apply_async(peers.run, (x,), callback=f.set_result, error_callback=f.set_exception)
        return f

    def close(self) -> None:
        self.pool.close()
        self.pool.join()


def mechanisms(names: list[str], kind: str) -> dict[str, Callable[[], Mechanism]]:
    """Makers of the named mechanisms, each running the model `kind` (bench/models.py)."""
    spawn = mp.get_context("spawn")
    init = {"initializer": peers.init, "initargs": (kind,)}
    makers: dict[str, Callable[[], Mechanism]] = {
        "inproc": lambda: InProcess(kind),
        "ceiling": lambda: Ceiling(kind),
        "isopool": lambda: IsopoolSync(kind),
        "isopool_async": lambda: IsopoolAsync(kind),
        # the default gives each worker cores/workers torch threads; this oversubscribes 2 cores
        "isopool_threads2": lambda: IsopoolSync(kind, "--threads", "2", name="isopool_threads2"),
        "ppe": lambda: Executor("ppe", kind, lambda: cf.ProcessPoolExecutor(WORKERS, mp_context=spawn, **init)),
        "mp_pool": lambda: MpPool(kind),
    }
    try:
        import loky

        makers["loky"] = lambda: Executor("loky", kind, lambda: loky.ProcessPoolExecutor(WORKERS, **init))
    except ImportError:
        pass
    try:
        import pebble

        makers["pebble"] = lambda: Executor(
            "pebble", kind, lambda: pebble.ProcessPool(WORKERS, context=spawn, **init),
            lambda ex, x: ex.schedule(peers.run, (x,)))
    except ImportError:
        pass
    return {n: makers[n] for n in names if n in makers}


def check(mech: Mechanism, model: Any, rng: np.random.Generator) -> bool:
    """Answers equal the in-process model: tiny inputs, and the big echo byte for byte."""
    xs = [rng.standard_normal(DIM).astype(np.float32) for _ in range(8)]
    futures = [mech.submit(x) for x in xs]
    ok = all(np.allclose(f.result(timeout=120), model(x), rtol=1e-5, atol=1e-6) for f, x in zip(futures, xs))
    big = rng.standard_normal(1 << 16).astype(np.float32)
    return ok and np.array_equal(mech.call({"echo": big}), big)


def check_embeddings(mech: Mechanism, model: Any, rng: np.random.Generator) -> bool:
    """Embeddings equal the in-process model's, sent together so that isopool batches them."""
    words = SENTENCE.split()
    texts = [" ".join(rng.permutation(words)[: 4 + k]) for k in range(6)]
    futures = [mech.submit(t) for t in texts]
    # a sentence encoded in a batch is padded beside longer ones: equal up to float rounding
    return all(np.allclose(f.result(timeout=300), model(t), atol=1e-4) for f, t in zip(futures, texts))


def warm_up(mech: Mechanism, sizes: Sizes) -> None:
    """One large round trip before any timing: the first use of 16 MiB buffers pays page
    faults in every process it crosses, which is start-up, not throughput."""
    if sizes.big:
        mech.call({"echo": np.zeros(BIG_MIB * 2**20 // 4, dtype=np.float32)})


def warm_up_embeddings(mech: Mechanism, sizes: Sizes) -> None:
    """A first round of requests: the model's first calls in each worker run slower."""
    mech.throughput(SENTENCE, 2 * EMBED_IN_FLIGHT, EMBED_IN_FLIGHT)


def measure(mech: Mechanism, sizes: Sizes) -> dict[str, float]:
    """One run of every tiny-model workload."""
    x = np.random.default_rng(1).standard_normal(DIM).astype(np.float32)
    big = np.random.default_rng(2).standard_normal(BIG_MIB * 2**20 // 4).astype(np.float32)
    figures = {"req_per_s": mech.throughput(x, sizes.requests)}
    figures["p50_us"], figures["p99_us"] = sequential(mech.call, x, sizes.latency, warm=0)
    t = time.perf_counter()
    for _ in range(sizes.big):
        mech.call({"echo": big})
    figures["mib_per_s"] = BIG_MIB * sizes.big / (time.perf_counter() - t)
    return figures


def measure_embeddings(mech: Mechanism, sizes: Sizes) -> dict[str, float]:
    return {"emb_per_s": mech.throughput(SENTENCE, sizes.sentences, EMBED_IN_FLIGHT)}


class Ceiling(Mechanism):
    """The physical limits, as a row: `memcpy` for the 16 MiB round trip (the buffer copied
    there and back, into buffers already faulted in), and for embeddings the model's own
    batched throughput: WORKERS processes each calling batch() on `batch` sentences, back to
    back, the batch the pool forms (--max-batch-size EMBED_BATCH). Not a serving mechanism: its
    tiny-request figures are the in-process model's."""

    name = "ceiling"

    def __init__(self, kind: str, batch: int = EMBED_BATCH) -> None:
        self.kind = kind
        self.batch = batch
        self.model = build(kind)
        self.buffers: tuple[np.ndarray, np.ndarray] | None = None
        self.pool = None
        if kind == "embeddings":
            spawn = mp.get_context("spawn")
            self.pool = cf.ProcessPoolExecutor(WORKERS, mp_context=spawn, initializer=peers.init, initargs=(kind,))
            list(self.pool.map(peers.run_batches, [SENTENCE] * WORKERS, [self.batch] * WORKERS, [2] * WORKERS))

    def submit(self, x: Any) -> cf.Future:
        f: cf.Future = cf.Future()
        f.set_result(self.model(x))
        return f

    def call(self, x: Any) -> Any:
        if isinstance(x, dict) and "echo" in x:  # the round trip's ceiling: two copies
            src = x["echo"]
            if self.buffers is None or self.buffers[0].shape != src.shape or self.buffers[0].dtype != src.dtype:
                self.buffers = (np.empty_like(src), np.empty_like(src))
                self.buffers[0].fill(0)
                self.buffers[1].fill(0)  # faulted in once, as a pool's warmed-up buffers are
            there, back = self.buffers
            np.copyto(there, src)
            np.copyto(back, there)
            return back
        return self.model(x)

    def throughput(self, x: Any, n: int, in_flight: int = IN_FLIGHT) -> float:
        if self.pool is None:
            return super().throughput(x, n, in_flight)
        per = max(1, n // (WORKERS * self.batch))
        t = time.perf_counter()
        done = sum(self.pool.map(peers.run_batches, [x] * WORKERS, [self.batch] * WORKERS, [per] * WORKERS))
        return done / (time.perf_counter() - t)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


@dataclass
class Workload:
    kind: str  # the model (bench/models.py)
    check: Callable[[Mechanism, Any, np.random.Generator], bool]
    warm_up: Callable[[Mechanism, Sizes], None]
    measure: Callable[[Mechanism, Sizes], dict[str, float]]


WORKLOADS = {"tiny": Workload("tiny", check, warm_up, measure),
             "embeddings": Workload("embeddings", check_embeddings, warm_up_embeddings, measure_embeddings)}


def rounds(names: list[str], sizes: Sizes, work: Workload) -> dict[str, dict]:
    """Start every mechanism on one model, check and warm each, then measure them in rounds."""
    model, rng = build(work.kind), np.random.default_rng(0)
    mechs: dict[str, Mechanism] = {}
    correct: dict[str, bool] = {}
    runs: dict[str, dict[str, list[float]]] = {}
    try:
        for name, make in mechanisms(names, work.kind).items():
            mechs[name] = make()
            correct[name] = work.check(mechs[name], model, rng)
            work.warm_up(mechs[name], sizes)
        # every mechanism once per round, so a noisy minute on this machine hits them all alike;
        # the ceiling again after each isopool mechanism, which is measured against the two
        # ceiling figures on either side of it (bracketed): the machine's speed drifts by ±7%
        # within a round, more than the ratios the goals ask about
        for r in range(sizes.repeats):
            before: dict[str, float] | None = None
            for name, mech in mechs.items():
                figures = work.measure(mech, sizes)
                record(runs, name, figures, r, work.kind)
                if name == "ceiling":
                    before = figures
                elif before is not None and name.startswith("isopool"):
                    after = work.measure(mechs["ceiling"], sizes)
                    record(runs, "ceiling", after, r, work.kind)
                    for key in CAPPED:
                        if key in figures and before.get(key) and after.get(key):
                            runs[name].setdefault(f"{key}_x_ceiling", []).append(
                                figures[key] / ((before[key] + after[key]) / 2))
                    before = after
    finally:
        for mech in mechs.values():
            mech.close()
    return {name: {"correct": correct[name], **spread(runs[name])} for name in mechs}


CAPPED = ("mib_per_s", "emb_per_s")  # the figures the ceiling row bounds


def record(runs: dict[str, dict[str, list[float]]], name: str, figures: dict[str, float], r: int, kind: str) -> None:
    for key, value in figures.items():
        runs.setdefault(name, {}).setdefault(key, []).append(value)
    print(f"round {r + 1} {name} ({kind}): " + ", ".join(f"{k} {v:.0f}" for k, v in figures.items()), flush=True)


def spread(runs: dict[str, list[float]]) -> dict[str, float]:
    """Each figure's median across the rounds, with its min and max (KEY_min, KEY_max)."""
    out: dict[str, float] = {}
    digits = {key: 3 if key.endswith("_x_ceiling") else 1 for key in runs}
    for key, values in runs.items():
        out[key] = round(statistics.median(values), digits[key])
        out[f"{key}_min"], out[f"{key}_max"] = round(min(values), digits[key]), round(max(values), digits[key])
    return out


def machine() -> str:
    """One line on where the figures were measured."""
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = "none"
    from isopool.protocol.shm import huge_pages

    pages = "2 MiB pages" if huge_pages() else "4 KiB pages"
    return (f"{os.cpu_count()} CPUs ({platform.machine()}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch_version}, shared memory in {pages}")


def heading(quick: bool, sizes: "Sizes", when: str, noisy: bool = False) -> str:
    kind = ("QUICK run (small sizes, 1 round: a correctness check, not figures to compare)" if quick
            else f"full run, median of {sizes.repeats} rounds")
    beside = " — NOISY: a CPU-bound process on every core throughout" if noisy else ""
    return f"isopool bench — {kind}{beside} — {when} — {machine()}"


def table(results: dict[str, dict], embeddings_note: str | None = None) -> str:
    base, ppe, cap = results.get("inproc", {}), results.get("ppe", {}), results.get("ceiling", {})

    def ratio(row: dict, ref: dict, key: str, higher_better: bool = True) -> str:
        if ref is cap and f"{key}_x_ceiling" in row:  # bracketed in each round: the median, and the range
            return f"{row[key + '_x_ceiling']:.2f}× ({row[key + '_x_ceiling_min']:.2f}–{row[key + '_x_ceiling_max']:.2f})"
        if not ref or not ref.get(key) or not row.get(key):
            return "-"
        r = row[key] / ref[key] if higher_better else ref[key] / row[key]
        return f"{r:.2f}×"

    lines = ["| mechanism | correct | req/s (64 in flight) | × inproc | × ppe | p50 µs | p99 µs | × ppe (p50) "
             "| 16 MiB round trip MiB/s | × ppe | × ceiling | embeddings/s (64 in flight) | × ppe | × ceiling |",
             "|" + "---|" * 14]
    for name, row in results.items():
        emb = (f"{row['emb_per_s']:.0f} | {ratio(row, ppe, 'emb_per_s')} | {ratio(row, cap, 'emb_per_s')} |"
               if "emb_per_s" in row else f"{embeddings_note or '-'} | - | - |")
        lines.append(
            f"| {name} | {'yes' if row['correct'] else 'NO'} | {row['req_per_s']:.0f} | "
            f"{ratio(row, base, 'req_per_s')} | {ratio(row, ppe, 'req_per_s')} | {row['p50_us']:.0f} | "
            f"{row['p99_us']:.0f} | {ratio(row, ppe, 'p50_us', False)} | "
            + ("n/a: nothing is copied | - | - | " if name == "inproc" else
               f"{row['mib_per_s']:.0f} | {ratio(row, ppe, 'mib_per_s')} | {ratio(row, cap, 'mib_per_s')} | ") + emb)
    return "\n".join(lines)


PANELS = [("req_per_s", "tiny requests/s (64 in flight), higher is better"),
          ("p50_us", "p50 latency µs, lower is better"),
          ("mib_per_s", "16 MiB round trip MiB/s, higher is better"),
          ("emb_per_s", "embeddings/s (1 sentence a request, 64 in flight), higher is better")]


def plot(results: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    panels = [(k, t) for k, t in PANELS if any(k in row for row in results.values())]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.6))
    for ax, (key, panel) in zip(axes, panels):
        shown = [n for n in names if key in results[n] and not (key == "mib_per_s" and n == "inproc")]
        mid = [results[n][key] for n in shown]
        low = [m - results[n].get(f"{key}_min", m) for n, m in zip(shown, mid)]
        high = [results[n].get(f"{key}_max", m) - m for n, m in zip(shown, mid)]
        ax.bar(shown, mid, yerr=[low, high], capsize=3,
               color=["#4c72b0" if "isopool" in n else "#999999" for n in shown])
        ax.set_title(panel, fontsize=9)
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    fig.suptitle(title + "\nbars: median; whiskers: min–max across rounds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(names: list[str], sizes: Sizes, out: Path, embeddings: bool = True, quick: bool = False,
        noisy: bool = False) -> dict[str, dict]:
    out.mkdir(parents=True, exist_ok=True)
    when = time.strftime("%Y-%m-%d %H:%M %Z")
    results = rounds(names, sizes, WORKLOADS["tiny"])
    note = embeddings_available() if embeddings else "skipped (--no-embeddings)"
    if note is None:  # a second set of pools and executors, each worker holding the real model
        for name, row in rounds(names, sizes, WORKLOADS["embeddings"]).items():
            results[name]["correct"] = results[name]["correct"] and row.pop("correct")
            results[name].update(row)
    title = heading(quick, sizes, when, noisy)
    report = f"{title}\n\n{table(results, note)}"
    (out / "results.md").write_text(report + "\n")
    (out / "results.json").write_text(json.dumps({
        "quick": quick, "date": when, "machine": machine(), "workers": WORKERS, "in_flight": IN_FLIGHT,
        "embeddings_in_flight": EMBED_IN_FLIGHT, "embeddings": note or "run", "sizes": sizes.__dict__, "noisy": noisy,
        "results": results}, indent=2))
    plot(results, out / "results.png", title)
    print(report)
    print(f"\nwritten to {out}/results.md, .json and .png")
    return results


def default_out(quick: bool) -> Path:
    """A new directory per run, outside any source tree."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "isopool" / "bench"
    return base / (time.strftime("%Y%m%d-%H%M%S") + ("-quick" if quick else ""))


def bench(quick: bool, repeats: int | None, out: Path | None, only: list[str], embeddings: bool,
          noisy: bool = False) -> int:
    sizes = QUICK if quick else FULL
    if repeats:
        sizes = Sizes(sizes.requests, sizes.latency, sizes.big, repeats, sizes.sentences)
    with neighbours() if noisy else contextlib.nullcontext():
        results = run(only or ALL, sizes, out or default_out(quick), embeddings=embeddings, quick=quick, noisy=noisy)
    return 0 if all(r["correct"] for r in results.values()) else 1
