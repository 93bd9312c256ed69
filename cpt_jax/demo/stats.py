"""The demo's statistics: pure functions of the questions each run got right, seed by seed.

- The intervals are over the questions, given the trained models: seed-to-seed variation is not
  in them, it is guarded by the rule that an effect must have the same sign in every seed.
- An accuracy is pooled over the seeds (right answers / questions, every seed's questions
  together) with a 95% Wilson score interval on the pooled count; the per-seed values are kept
  beside it, so the spread between seeds is shown, not hidden in the pool.
- The average accuracy (the paper's headline) is the mean of the groups' accuracies, with a normal
  95% interval. Groups that ask about the same fact (acquisition and held-out QA ask about the
  same person's same attribute) are not independent: a model that knows the fact tends to get
  both right. So the variance comes from one value per fact, the sum of its groups' outcomes each
  divided by its group's size, facts matched by their key (name and attribute) within a seed:
  for the demo's groups se^2 = (var(retention)/n_A + var(acquisition + held-out QA)/n_B) / 9.
- Two runs are compared on the same questions (the same corpus per seed): the paired difference
  of each question's outcome (+1, 0, -1), pooled over the seeds, with a normal 95% interval; the
  difference of average accuracies takes its variance from the same per-fact sums of those
  differences.
- A comparison is `better` when the interval lies above zero AND every seed's difference is
  positive, `worse` when it lies below zero and every seed's is negative, otherwise `within
  noise`: an effect must be outside the pooled noise and reproduce in each seed.
- A finding of the paper is answered `agree` when its choice is better than every alternative,
  `disagree` when some alternative is better than its choice, `cannot tell` otherwise.
- The base has finished pretraining when its validation loss improved by less than 1% (relative)
  over the last 10% of its steps: the mean of its evaluations in the last tenth of the run against
  the mean of those in the tenth before (means, so that one evaluation's wobble decides nothing).
  A loss that rose by more than 5% there is not "flattened" but its own failure: the base overfits.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Mapping, Sequence

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
PLATEAU_FRACTION = 0.1
PLATEAU_THRESHOLD = 0.01
PLATEAU_RISE_TOLERANCE = 0.05
FLATTENED, IMPROVING, ROSE = "flattened", "still improving", "rose"

BETTER, WORSE, NOISE = "better", "worse", "within noise"
AGREE, DISAGREE, CANNOT_TELL = "agree", "disagree", "cannot tell"


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A pooled value with its 95% interval, the value of each seed, and the questions pooled."""

    value: float
    lo: float
    hi: float
    per_seed: tuple[float, ...]
    n: int

    @property
    def half_width(self) -> float:
        """The larger distance from the value to an end of the interval."""
        return max(self.value - self.lo, self.hi - self.value)


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion k/n (0 <= k <= n, n > 0)."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"wilson: k={k}, n={n}, expected 0 <= k <= n and n > 0")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At k = 0 or k = n an end equals p exactly; keep rounding from moving it past p.
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def accuracy(correct: Sequence[Sequence[bool]]) -> Estimate:
    """The pooled accuracy of one group over seeds (`correct[seed][question]`), Wilson interval."""
    n = sum(len(c) for c in correct)
    k = sum(sum(bool(x) for x in c) for c in correct)
    lo, hi = wilson(k, n)
    return Estimate(k / n, lo, hi, tuple(sum(bool(x) for x in c) / len(c) for c in correct), n)


def average(values: Mapping[str, Sequence[Sequence[float]]],
            keys: Mapping[str, Sequence[Sequence[Hashable]]]) -> Estimate:
    """The mean over groups of each group's mean outcome (`values[group][seed][question]`: 1/0 for
    accuracies, +1/0/-1 for paired differences), pooled over seeds, with a normal 95% interval.

    `keys[group][seed][question]` names each question's fact: one term per fact and seed, its variance
    taken within each set of facts asked by the same groups (see the module docstring)."""
    names = list(values)
    g = len(names)
    sizes = {name: sum(len(per_seed) for per_seed in values[name]) for name in names}
    terms: dict[tuple[int, Hashable], dict[str, float]] = {}
    for name in names:
        if [len(v) for v in values[name]] != [len(k) for k in keys[name]]:
            raise ValueError(f"average: group {name} has {len(values[name])} seeds' outcomes and keys of other sizes")
        for seed, (vals, ks) in enumerate(zip(values[name], keys[name], strict=True)):
            for v, k in zip(vals, ks, strict=True):
                unit = terms.setdefault((seed, k), {})
                if name in unit:
                    raise ValueError(f"average: group {name}, seed {seed} asks about {k!r} twice, expected one "
                                     "question per fact")
                unit[name] = float(v)
    blocks: dict[frozenset, list[float]] = {}
    for unit in terms.values():
        blocks.setdefault(frozenset(unit), []).append(sum(v / sizes[n] for n, v in unit.items()) / g)
    value = sum(sum(c) for c in blocks.values())
    var = sum(len(c) * _mean_var(c)[1] for c in blocks.values())
    se = math.sqrt(var)
    seeds = len(values[names[0]])
    per_seed = tuple(sum(sum(values[n][s]) / len(values[n][s]) for n in names) / g for s in range(seeds))
    return Estimate(value, value - Z95 * se, value + Z95 * se, per_seed, sum(sizes.values()))


def _mean_var(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, var


def paired_difference(a: Sequence[Sequence[bool]], b: Sequence[Sequence[bool]]) -> Estimate:
    """Accuracy of `a` minus that of `b` on the same questions (`[seed][question]`), pooled over
    seeds, with a normal 95% interval of the mean paired difference."""
    if [len(x) for x in a] != [len(x) for x in b]:
        raise ValueError("paired_difference: the two runs answered different numbers of questions")
    diffs = [float(x) - float(y) for sa, sb in zip(a, b, strict=True) for x, y in zip(sa, sb, strict=True)]
    mean, var = _mean_var(diffs)
    se = math.sqrt(var / len(diffs))
    per_seed = tuple((sum(sa) - sum(sb)) / len(sa) for sa, sb in zip(a, b, strict=True))
    return Estimate(mean, mean - Z95 * se, mean + Z95 * se, per_seed, len(diffs))


def outcome(diff: Estimate) -> str:
    """`better`, `worse` or `within noise` (see the module docstring) of a difference."""
    if diff.lo > 0 and all(d > 0 for d in diff.per_seed):
        return BETTER
    if diff.hi < 0 and all(d < 0 for d in diff.per_seed):
        return WORSE
    return NOISE


def verdict(outcomes: Sequence[str]) -> str:
    """The answer to one of the paper's findings from its choice's outcome against each alternative."""
    if any(o == WORSE for o in outcomes):
        return DISAGREE
    if outcomes and all(o == BETTER for o in outcomes):
        return AGREE
    return CANNOT_TELL


@dataclasses.dataclass(frozen=True)
class Plateau:
    """The plateau check of a loss curve: the mean loss of the evaluations in the stretch before the
    last (`before`, steps `before_steps` = (lo, hi]) and in the last stretch (`last`, `last_steps`),
    the relative improvement (before - last) / before, and the verdict: FLATTENED (improved by less
    than the threshold and did not rise beyond the tolerance), IMPROVING or ROSE."""

    before: float
    last: float
    before_steps: tuple[float, float]
    last_steps: tuple[float, float]
    relative_improvement: float
    verdict: str

    @property
    def flattened(self) -> bool:
        return self.verdict == FLATTENED

    def describe(self) -> str:
        """'flattened', 'still improving by X%' or 'rose by X%: the base overfits'."""
        if self.verdict == ROSE:
            return f"rose by {-100 * self.relative_improvement:.1f}%: the base overfits"
        if self.verdict == IMPROVING:
            return f"still improving by {100 * self.relative_improvement:.2f}%"
        return FLATTENED


def plateau(curve: Sequence[tuple[int, float]], fraction: float = PLATEAU_FRACTION,
            threshold: float = PLATEAU_THRESHOLD, rise_tolerance: float = PLATEAU_RISE_TOLERANCE) -> Plateau:
    """How much a loss curve [(step, loss)] still fell over its last `fraction` of steps. The last
    stretch is (end - fraction x end, end], the one before it the same length earlier; each must
    hold an evaluation (ValueError otherwise)."""
    curve = sorted(curve)
    end = curve[-1][0] if curve else 0
    span = end * fraction

    def mean_in(lo: float, hi: float) -> float:
        losses = [loss for step, loss in curve if lo + 1e-9 < step <= hi + 1e-9]
        if not losses:
            raise ValueError(f"relative_improvement: no evaluation in steps ({lo:g}, {hi:g}], expected at least "
                             f"one in each of the last two stretches of {fraction:.0%} of the run")
        return sum(losses) / len(losses)

    before_steps, last_steps = (end - 2 * span, end - span), (end - span, float(end))
    before, last = mean_in(*before_steps), mean_in(*last_steps)
    rel = (before - last) / before
    verdict = ROSE if rel < -rise_tolerance else IMPROVING if rel >= threshold else FLATTENED
    return Plateau(before, last, before_steps, last_steps, rel, verdict)

