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


def _keys(prefix, n):
    return [[(prefix, i) for i in range(n)]]


def test_average_is_the_mean_of_the_groups_and_independent_groups_add_in_quadrature():
    a = [[True] * 30 + [False] * 70]
    b = [[True] * 80 + [False] * 20]
    avg = stats.average({"a": a, "b": b}, {"a": _keys("A", 100), "b": _keys("B", 100)})
    assert avg.value == pytest.approx(0.55) and avg.per_seed == pytest.approx((0.55,))
    # Different facts: the groups' variances of the mean add, over 2^2.
    se = math.sqrt((0.3 * 0.7 * 100 / 99) / 100 + (0.8 * 0.2 * 100 / 99) / 100) / 2
    assert (avg.lo, avg.hi) == pytest.approx((0.55 - stats.Z95 * se, 0.55 + stats.Z95 * se))
    assert avg.n == 200


def test_average_pairs_questions_about_the_same_fact():
    rng = random.Random(3)
    n_a, n_b, seeds = 40, 30, 2
    ret = [[rng.random() < 0.9 for _ in range(n_a)] for _ in range(seeds)]
    known = [[rng.random() < 0.6 for _ in range(n_b)] for _ in range(seeds)]  # a fact known -> both right
    acq = [[k or rng.random() < 0.25 for k in ks] for ks in known]
    qa = [[(k and rng.random() < 0.8) or rng.random() < 0.25 for k in ks] for ks in known]
    facts_a = [[("A", s, i) for i in range(n_a)] for s in range(seeds)]
    facts_b = [[("B", s, i) for i in range(n_b)] for s in range(seeds)]
    # The held-out questions in another order: pairing goes by the fact, not by position.
    order = list(range(n_b))
    rng.shuffle(order)
    qa_shuffled = [[q[i] for i in order] for q in qa]
    facts_qa = [[f[i] for i in order] for f in facts_b]
    avg = stats.average({"retention": ret, "acquisition": acq, "heldout_qa": qa_shuffled},
                        {"retention": facts_a, "acquisition": facts_b, "heldout_qa": facts_qa})

    def var(xs):
        m = sum(xs) / len(xs)
        return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)

    flat_ret = [float(x) for s in ret for x in s]
    z = [float(x) + float(y) for sa, sq in zip(acq, qa, strict=True) for x, y in zip(sa, sq, strict=True)]
    value = (sum(flat_ret) / len(flat_ret) + sum(z) / len(z)) / 3
    se = math.sqrt((var(flat_ret) / len(flat_ret) + var(z) / len(z)) / 9)
    assert avg.value == pytest.approx(value) and avg.half_width == pytest.approx(stats.Z95 * se)
    # Positively correlated groups: wider than treating them as independent.
    independent = math.sqrt((var(flat_ret) / len(flat_ret) + var([float(x) for s in acq for x in s]) / len(z)
                             + var([float(x) for s in qa for x in s]) / len(z)) / 9)
    assert se > independent
    # Two groups on the same facts and as many questions: se^2 is the brute-force variance of the
    # per-fact mean over the facts, divided by their number.
    n = 25
    x = [[rng.random() < 0.5 for _ in range(n)]]
    y = [[v and rng.random() < 0.9 for v in x[0]]]
    keys = _keys("F", n)
    two = stats.average({"x": x, "y": y}, {"x": keys, "y": keys})
    per_fact = [(float(u) + float(v)) / 2 for u, v in zip(x[0], y[0], strict=True)]
    assert two.half_width == pytest.approx(stats.Z95 * math.sqrt(var(per_fact) / n))
    with pytest.raises(ValueError, match="twice"):
        stats.average({"x": [[True, False]]}, {"x": [[("F", 0), ("F", 0)]]})


def test_paired_difference():
    d = stats.paired_difference([[True, True, False, False]], [[False, True, False, True]])
    assert d.value == 0.0 and d.per_seed == (0.0,) and d.n == 4
    se = math.sqrt((2 / 3) / 4)  # differences 1, 0, 0, -1: sample variance 2/3
    assert (d.lo, d.hi) == pytest.approx((-stats.Z95 * se, stats.Z95 * se))
    d = stats.paired_difference([[True] * 3, [True, False]], [[False] * 3, [False, False]])
    assert d.value == pytest.approx(4 / 5) and d.per_seed == pytest.approx((1.0, 0.5))
    with pytest.raises(ValueError, match="different numbers"):
        stats.paired_difference([[True]], [[True, False]])
    avg = stats.average({"a": [[1.0] * 10], "b": [[0.0] * 10]}, {"a": _keys("A", 10), "b": _keys("B", 10)})
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
    assert stats.plateau(curve).relative_improvement == pytest.approx((before - last) / before)
    assert not stats.plateau(curve).flattened
    flat = [(s, 1.0 + 0.5 * math.exp(-s / 50)) for s in range(0, 1001, 50)]
    assert 0 < stats.plateau(flat).relative_improvement < 1e-6 and stats.plateau(flat).flattened
    # One evaluation's wobble is averaged with its neighbours.
    wobbly = [(s, 1.0) for s in range(50, 1001, 50)]
    wobbly[-4] = (850, 1.03)
    p = stats.plateau(wobbly)
    assert p.relative_improvement == pytest.approx(0.015 / 1.015) and not p.flattened
    wobbly[-2] = (950, 1.03)
    p = stats.plateau(wobbly)
    assert p.relative_improvement == pytest.approx(0.0) and p.flattened
    rising = [(800, 0.9), (900, 0.80), (1000, 0.82)]  # a rise within the tolerance: no improvement left
    p = stats.plateau(rising)
    assert p.relative_improvement == pytest.approx(-0.025) and p.flattened
    # A rise beyond 5% (the 3-biography scale's 0.58 -> 0.85) is its own failure, never "flattened".
    overfit = [(800, 0.9), (900, 0.60), (1000, 0.84)]
    p = stats.plateau(overfit)
    assert p.relative_improvement == pytest.approx(-0.4) and p.verdict == stats.ROSE and not p.flattened
    assert p.describe() == "rose by 40.0%: the base overfits"
    assert (p.before, p.last, p.before_steps, p.last_steps) == (0.6, 0.84, (800, 900), (900, 1000))
    assert stats.plateau(curve).verdict == stats.IMPROVING and stats.plateau(flat).describe() == "flattened"
    any_order = stats.plateau([(1000, 1.0), (850, 2.0), (950, 1.5)])
    assert any_order.relative_improvement == pytest.approx(0.375)
    with pytest.raises(ValueError, match="no evaluation in steps"):
        stats.plateau([(950, 1.0), (1000, 1.0)])
    with pytest.raises(ValueError, match="no evaluation in steps"):
        stats.plateau([(10, 1.0)])
