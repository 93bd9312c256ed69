"""The demo's statistics: interval arithmetic, paired differences, the verdict rules, the plateau check."""

import math
import random

import pytest

from cpt_jax.demo import stats


def test_wilson_matches_the_textbook_values():
    assert stats.wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    lo, hi = stats.wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = stats.wilson(10, 10)
    assert hi == 1.0 and lo == pytest.approx(1 - 0.2775, abs=1e-4)
    # The sizing: 600 questions near 0.5 give +-4 points, fewer do not.
    lo, hi = stats.wilson(300, 600)
    assert (hi - lo) / 2 == pytest.approx(0.0399, abs=1e-4) and (hi - lo) / 2 <= 0.04
    lo, hi = stats.wilson(250, 500)
    assert (hi - lo) / 2 > 0.04
    for bad in ((1, 0), (-1, 5), (6, 5)):
        with pytest.raises(ValueError):
            stats.wilson(*bad)


def test_wilson_covers_the_true_proportion_about_95_percent_of_the_time():
    rng = random.Random(0)
    p, n, trials = 0.3, 200, 2000
    hits = 0
    for _ in range(trials):
        k = sum(rng.random() < p for _ in range(n))
        lo, hi = stats.wilson(k, n)
        hits += lo <= p <= hi
    assert 0.93 <= hits / trials <= 0.97


def test_accuracy_pools_the_seeds_and_keeps_each_seeds_value():
    e = stats.accuracy([[True, True, False, False], [True, True, True, True, True, False]])
    assert e.value == pytest.approx(7 / 10) and e.n == 10
    assert e.per_seed == pytest.approx((0.5, 5 / 6))
    assert (e.lo, e.hi) == pytest.approx(stats.wilson(7, 10))


def test_average_is_the_mean_of_the_groups_with_their_half_widths_in_quadrature():
    groups = [stats.accuracy([[True] * 30 + [False] * 70]), stats.accuracy([[True] * 80 + [False] * 20])]
    avg = stats.average(groups)
    assert avg.value == pytest.approx(0.55) and avg.per_seed == pytest.approx((0.55,))
    assert avg.half_width == pytest.approx(math.hypot(groups[0].half_width, groups[1].half_width) / 2)
    assert avg.n == 200


def test_paired_difference():
    d = stats.paired_difference([[True, True, False, False]], [[False, True, False, True]])
    assert d.value == 0.0 and d.per_seed == (0.0,) and d.n == 4
    se = math.sqrt((2 / 3) / 4)  # differences 1, 0, 0, -1: sample variance 2/3
    assert (d.lo, d.hi) == pytest.approx((-stats.Z95 * se, stats.Z95 * se))
    d = stats.paired_difference([[True] * 3, [True, False]], [[False] * 3, [False, False]])
    assert d.value == pytest.approx(4 / 5) and d.per_seed == pytest.approx((1.0, 0.5))
    with pytest.raises(ValueError, match="different numbers"):
        stats.paired_difference([[True]], [[True, False]])
    avg = stats.average_difference([stats.paired_difference([[True] * 10], [[False] * 10]),
                                    stats.paired_difference([[True] * 5 + [False] * 5], [[True] * 5 + [False] * 5])])
    assert avg.value == pytest.approx(0.5) and avg.lo == pytest.approx(0.5) and avg.per_seed == (0.5,)


def _estimate(lo, hi, per_seed):
    return stats.Estimate((lo + hi) / 2, lo, hi, tuple(per_seed), 100)


def test_outcome_needs_the_interval_and_every_seed():
    assert stats.outcome(_estimate(0.01, 0.05, (0.02, 0.04))) == stats.BETTER
    assert stats.outcome(_estimate(-0.05, -0.01, (-0.02, -0.04))) == stats.WORSE
    assert stats.outcome(_estimate(-0.01, 0.05, (0.02, 0.04))) == stats.NOISE  # the interval holds 0
    assert stats.outcome(_estimate(0.01, 0.05, (0.05, -0.01))) == stats.NOISE  # a seed disagrees
    assert stats.outcome(_estimate(0.0, 0.0, (0.0, 0.0))) == stats.NOISE


def test_verdict():
    B, W, N = stats.BETTER, stats.WORSE, stats.NOISE
    assert stats.verdict([B]) == stats.AGREE and stats.verdict([B, B, B]) == stats.AGREE
    assert stats.verdict([B, N]) == stats.CANNOT_TELL and stats.verdict([N]) == stats.CANNOT_TELL
    assert stats.verdict([B, W]) == stats.DISAGREE and stats.verdict([W]) == stats.DISAGREE
    assert stats.verdict([]) == stats.CANNOT_TELL


def test_plateau_check():
    # Means of the evaluations in the last tenth and in the tenth before it.
    curve = [(s, 10.0 - s / 100) for s in range(50, 1001, 50)]  # 9.5 ... 0.0: falling 0.5 per 50 steps
    before, last = (1.5 + 1.0) / 2, (0.5 + 0.0) / 2  # steps 850, 900 | 950, 1000
    assert stats.relative_improvement(curve) == pytest.approx((before - last) / before)
    assert not stats.plateaued(curve)
    flat = [(s, 1.0 + 0.5 * math.exp(-s / 50)) for s in range(0, 1001, 50)]
    assert 0 < stats.relative_improvement(flat) < 1e-6 and stats.plateaued(flat)
    # One evaluation's wobble is averaged with its neighbours.
    wobbly = [(s, 1.0) for s in range(50, 1001, 50)]
    wobbly[-4] = (850, 1.03)
    assert stats.relative_improvement(wobbly) == pytest.approx(0.015 / 1.015) and not stats.plateaued(wobbly)
    wobbly[-2] = (950, 1.03)
    assert stats.relative_improvement(wobbly) == pytest.approx(0.0) and stats.plateaued(wobbly)
    rising = [(800, 0.9), (900, 0.80), (1000, 0.82)]  # overfitting: no improvement left
    assert stats.relative_improvement(rising) == pytest.approx(-0.025) and stats.plateaued(rising)
    assert stats.relative_improvement([(1000, 1.0), (850, 2.0), (950, 1.5)]) == pytest.approx(0.375)  # any order
    with pytest.raises(ValueError, match="no evaluation in steps"):
        stats.relative_improvement([(950, 1.0), (1000, 1.0)])
    with pytest.raises(ValueError, match="no evaluation in steps"):
        stats.relative_improvement([(10, 1.0)])
