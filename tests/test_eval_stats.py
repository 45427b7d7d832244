"""Intervals for small evaluations (llmstack/eval/stats.py), checked on planted scores with known answers."""

import pytest

from llmstack.eval.stats import paired_bootstrap, wilson


def test_wilson_matches_textbook_values():
    # Wilson 95% interval for 10 of 20: (0.2993, 0.7007); for 0 of 20: (0, 0.1611); for 20 of 20: (0.8389, 1)
    assert wilson(10, 20) == pytest.approx((0.2993, 0.7007), abs=1e-4)
    assert wilson(0, 20) == pytest.approx((0.0, 0.1611), abs=1e-4)
    assert wilson(20, 20) == pytest.approx((0.8389, 1.0), abs=1e-4)
    lo, hi = wilson(190, 200)  # more items: a narrower interval around the same kind of score
    assert hi - lo < 0.07 and lo < 0.95 < hi


def test_paired_bootstrap_on_planted_differences():
    same = [1.0, 0.0] * 50
    assert paired_bootstrap(same, same) == (0.0, 0.0, 0.0)
    worse = [1.0] * 100
    after = [1.0] * 80 + [0.0] * 20  # 20 of 100 items lost: -0.2, clearly below zero
    mean, lo, hi = paired_bootstrap(worse, after)
    assert mean == pytest.approx(-0.2) and lo < -0.1 and hi < 0
    noisy = [1.0, 0.0] * 10
    flipped = [0.0, 1.0] * 10  # every item changed, the mean did not: the interval straddles 0
    mean, lo, hi = paired_bootstrap(noisy, flipped)
    assert mean == 0 and lo < 0 < hi
    assert paired_bootstrap(worse, after, seed=0) == paired_bootstrap(worse, after, seed=0)  # seeded
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0, 0.0])
