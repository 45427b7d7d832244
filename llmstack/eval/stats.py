"""Uncertainty for small evaluations: on 20 items one item is 5 points, so every score carries its 95% interval and
its n, and a comparison between two stages is paired on the same items.

- `wilson`: the Wilson score interval for a proportion (k of n items right) — well behaved at 0, 1 and small n, where
  the normal approximation gives intervals outside [0, 1].
- `bootstrap_mean`: the mean of per-item values (e.g. a judge's 1 / 0.5 / 0 per prompt) with its percentile interval.
- `items_needed`: how many items a paired comparison needs before its interval is narrow enough to decide.
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


def bootstrap_mean(values: list[float], iters: int = 2000, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap over items (seeded). For values that are not 0/1 (ties as 0.5), where
    Wilson does not apply."""
    if not values:
        raise ValueError("bootstrap_mean needs at least one value")
    n = len(values)
    rng = random.Random(seed)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(iters))
    tail = (1 - level) / 2
    return (sum(values) / n, means[int(tail * iters)], means[min(iters - 1, int((1 - tail) * iters))])


def items_needed(reference: list[float], quantized: list[float], threshold: float = 0.95, z: float = 1.959964,
                 cap: int = 1_000_000) -> dict[str, float | int | None]:
    """How many items a paired comparison of a quantized model with its reference needs for its 95% interval to
    decide whether the recovery (quantized score / reference score) is at least `threshold`.

    Recovery >= t is the same as mean(quantized - t * reference) >= 0 on the same items, so the interval is that
    mean's, and the normal approximation gives n = (z * sd / |mean|)^2 items at the observed per-item spread. Returns
    {"n": items needed (None: the observed recovery is exactly at the threshold, or nothing varies — no n decides
    it), "n_now", "recovery", "margin" (the mean above), "sd"}. A planning number from these items' own spread: the
    true n is only as good as that estimate."""
    if len(reference) != len(quantized) or not reference:
        raise ValueError(f"paired scores need the same non-empty items (got {len(reference)} and {len(quantized)})")
    n_now = len(reference)
    d = [q - threshold * r for r, q in zip(reference, quantized)]
    mean = sum(d) / n_now
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / max(n_now - 1, 1))
    ref = sum(reference) / n_now
    recovery = (sum(quantized) / n_now) / ref if ref else None
    if abs(mean) < 1e-12 or sd == 0:
        needed = None if abs(mean) < 1e-12 else n_now
    else:
        needed = min(cap, math.ceil((z * sd / abs(mean)) ** 2))
    return {"n": needed, "n_now": n_now, "recovery": recovery, "margin": mean, "sd": sd}
