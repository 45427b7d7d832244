"""Intervals for small evaluations (llmstack/eval/stats.py), checked on planted scores with known answers."""

import pytest

from llmstack.eval.stats import bootstrap_mean, items_needed, paired_bootstrap, wilson


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


def test_bootstrap_mean_on_planted_values():
    assert bootstrap_mean([0.5] * 10) == (0.5, 0.5, 0.5)
    mean, lo, hi = bootstrap_mean([1.0] * 15 + [0.0] * 5)
    assert mean == 0.75 and lo < 0.75 < hi and 0.5 < lo and hi <= 1.0
    with pytest.raises(ValueError):
        bootstrap_mean([])


def test_items_needed_for_the_int4_recovery_decision():
    ref = [1.0] * 60 + [0.0] * 40
    # 59 of the reference's 60 kept: recovery 98.3%, 0.02 above the 95% line per item; at this spread the interval
    # clears it at n = (1.96 * sd / 0.02)^2 items, and the planted numbers give sd = 0.101
    r = items_needed(ref, [1.0] * 59 + [0.0] * 41)
    assert r["recovery"] == pytest.approx(59 / 60) and r["margin"] == pytest.approx(0.02)
    assert r["sd"] == pytest.approx(0.1010, abs=1e-4) and r["n"] == 98
    # the more the two models disagree item by item, or the nearer the threshold, the more items it takes
    assert items_needed(ref, [1.0] * 55 + [0.0] * 45)["n"] > 98
    closer = items_needed(ref, [1.0] * 57 + [0.0] * 43)  # recovery exactly 95%: no n decides it
    assert closer["n"] is None
    # cross-check with the bootstrap: at about n items (these 100) the interval's lower end sits at the line;
    # with the same items four times over it clears it
    d = [q - 0.95 * x for x, q in zip(ref, [1.0] * 59 + [0.0] * 41)]
    assert abs(paired_bootstrap([0.0] * 100, d)[1]) < 0.006
    assert paired_bootstrap([0.0] * 400, d * 4)[1] > 0.005
