"""A model with batch(list) -> list: isopool hands it up to --max-batch-size requests at once.

    isopool serve --model isopool.examples.batched:Doubler --max-batch-size 8 --max-batch-wait-ms 5

Each result is {"x": 2 * x, "batch": size of the batch it ran in}. The input "bad" makes
batch() raise: isopool then reruns that batch's inputs one by one, so only "bad" fails.
The input {"sizes": true} returns every batch size this worker has seen.
"""

from __future__ import annotations

from typing import Any

SIZES: list[int] = []


class Doubler:
    def batch(self, xs: list[Any]) -> list[Any]:
        if any(x == "bad" for x in xs):
            raise ValueError("cannot double 'bad'")
        SIZES.append(len(xs))
        return [list(SIZES) if isinstance(x, dict) else {"x": 2 * x, "batch": len(xs)} for x in xs]
