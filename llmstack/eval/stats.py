"""Uncertainty for small evaluations: on 20 items one item is 5 points, so every score carries its 95% interval and
its n, and a comparison between two stages is paired on the same items.

- `wilson`: the Wilson score interval for a proportion (k of n items right) — well behaved at 0, 1 and small n, where
  the normal approximation gives intervals outside [0, 1].
- `paired_bootstrap`: the mean per-item difference between two stages scored on the same items, with a percentile
  bootstrap interval over items (seeded: the same scores give the same interval).
Written here because they are a few lines each (scipy's binomtest has Wilson too, but scipy is not a dependency of the
main environment); their values are checked against textbook cases in tests/test_eval_stats.py.
"""

from __future__ import annotations

import math
import random


def wilson(k: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_bootstrap(a: list[float], b: list[float], iters: int = 2000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """(mean of b - a, low, high) over items scored by both stages, in the same order."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired scores need the same non-empty items (got {len(a)} and {len(b)})")
    diffs = [y - x for x, y in zip(a, b)]
    n = len(diffs)
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(iters))
    tail = (1 - level) / 2
    return (sum(diffs) / n, means[int(tail * iters)], means[min(iters - 1, int((1 - tail) * iters))])
