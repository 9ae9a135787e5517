"""MiniLM at 64 in flight: the pool's share of its own batched ceiling, by --max-batch-size.

    python -m isopool.bench.batchsize [--batch 8 --batch 16 ...] [--rounds 5] [--sentences 1024]

For each batch size, one pool (2 workers, `--max-batch-size B`, the rest default) and the
ceiling at the same batch (bench/suite.py: 2 processes calling batch() on B sentences back
to back). In each round the ceiling is measured just before and just after the pool, and
the pool's figure is divided by their mean: the guest's speed drifts by several % within
a minute. Prints each round and the median ratio (with its range) per batch size. Needs the
`embeddings` extra.
"""

from __future__ import annotations

import argparse
import statistics

from .models import embeddings_available
from .suite import EMBED_IN_FLIGHT, SENTENCE, Ceiling, IsopoolSync


def ratios(batch: int, rounds: int, sentences: int) -> list[float]:
    ceiling = Ceiling("embeddings", batch=batch)
    pool = IsopoolSync("embeddings", "--max-batch-size", str(batch))
    try:
        for m in (ceiling, pool):  # the first calls in each process run slower
            m.throughput(SENTENCE, 4 * EMBED_IN_FLIGHT, EMBED_IN_FLIGHT)
        out = []
        for r in range(rounds):
            before = ceiling.throughput(SENTENCE, sentences, EMBED_IN_FLIGHT)
            mine = pool.throughput(SENTENCE, sentences, EMBED_IN_FLIGHT)
            after = ceiling.throughput(SENTENCE, sentences, EMBED_IN_FLIGHT)
            out.append(mine / ((before + after) / 2))
            print(f"--max-batch-size {batch}, round {r + 1}: ceiling {before:.0f} / {after:.0f}, "
                  f"pool {mine:.0f} sentences/s: {out[-1]:.3f}x", flush=True)
        return out
    finally:
        pool.close()
        ceiling.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, action="append", help="a --max-batch-size to try (repeatable; "
                        "default 8 and 16)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sentences", type=int, default=1024, help="sentences per measurement")
    args = parser.parse_args()
    missing = embeddings_available()
    if missing:
        raise SystemExit(missing)
    results = {b: ratios(b, args.rounds, args.sentences) for b in args.batch or [8, 16]}
    for b, rs in results.items():
        print(f"--max-batch-size {b}: {statistics.median(rs):.3f}x the ceiling at {b} "
              f"(median of {len(rs)} rounds; {min(rs):.3f}-{max(rs):.3f})")


if __name__ == "__main__":
    main()
