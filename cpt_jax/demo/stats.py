"""The demo's statistics: pure functions of the questions each run got right, seed by seed.

- An accuracy is pooled over the seeds (right answers / questions, every seed's questions
  together) with a 95% Wilson score interval on the pooled count; the per-seed values are kept
  beside it, so the spread between seeds is shown, not hidden in the pool.
- The average accuracy (the paper's headline) is the mean of the groups' accuracies; its interval
  combines the groups' Wilson half-widths in quadrature, divided by the number of groups (the
  groups hold different questions, so their errors are independent).
- Two runs are compared on the same questions (the same corpus per seed): the paired difference
  of each question's outcome (+1, 0, -1), pooled over the seeds, with a normal 95% interval; the
  difference of average accuracies is the mean of the groups' differences, its standard error the
  groups' combined in quadrature, divided by the number of groups.
- A comparison is `better` when the interval lies above zero AND every seed's difference is
  positive, `worse` when it lies below zero and every seed's is negative, otherwise `within
  noise`: an effect must be outside the pooled noise and reproduce in each seed.
- A finding of the paper is answered `agree` when its choice is better than every alternative,
  `disagree` when some alternative is better than its choice, `cannot tell` otherwise.
- The base has finished pretraining when its validation loss improved by less than 1% (relative)
  over the last 10% of its steps: the mean of its evaluations in the last tenth of the run against
  the mean of those in the tenth before (means, so that one evaluation's wobble decides nothing).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
PLATEAU_FRACTION = 0.1
PLATEAU_THRESHOLD = 0.01

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


def average(groups: Sequence[Estimate]) -> Estimate:
    """The mean of the groups' accuracies; half-width: their half-widths in quadrature / count."""
    g = len(groups)
    value = sum(e.value for e in groups) / g
    half = math.sqrt(sum(e.half_width ** 2 for e in groups)) / g
    seeds = len(groups[0].per_seed)
    per_seed = tuple(sum(e.per_seed[s] for e in groups) / g for s in range(seeds))
    return Estimate(value, value - half, value + half, per_seed, sum(e.n for e in groups))


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


def average_difference(groups: Sequence[Estimate]) -> Estimate:
    """The difference of average accuracies from the groups' paired differences."""
    g = len(groups)
    value = sum(e.value for e in groups) / g
    se = math.sqrt(sum((e.half_width / Z95) ** 2 for e in groups)) / g
    seeds = len(groups[0].per_seed)
    per_seed = tuple(sum(e.per_seed[s] for e in groups) / g for s in range(seeds))
    return Estimate(value, value - Z95 * se, value + Z95 * se, per_seed, sum(e.n for e in groups))


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


def relative_improvement(curve: Sequence[tuple[int, float]], fraction: float = PLATEAU_FRACTION) -> float:
    """How much a loss curve [(step, loss)] still fell over its last `fraction` of steps, relative:
    (mean loss of the evaluations in the stretch before the last - mean in the last stretch) / the
    former. The last stretch is (end - fraction x end, end], the one before it the same length
    earlier; each must hold an evaluation."""
    curve = sorted(curve)
    end = curve[-1][0] if curve else 0
    span = end * fraction

    def mean_in(lo: float, hi: float) -> float:
        losses = [loss for step, loss in curve if lo + 1e-9 < step <= hi + 1e-9]
        if not losses:
            raise ValueError(f"relative_improvement: no evaluation in steps ({lo:g}, {hi:g}], expected at least "
                             f"one in each of the last two stretches of {fraction:.0%} of the run")
        return sum(losses) / len(losses)

    before, last = mean_in(end - 2 * span, end - span), mean_in(end - span, end)
    return (before - last) / before


def plateaued(curve: Sequence[tuple[int, float]], fraction: float = PLATEAU_FRACTION,
              threshold: float = PLATEAU_THRESHOLD) -> bool:
    """Whether the loss fell by less than `threshold` (relative) over the last `fraction` of steps."""
    return relative_improvement(curve, fraction) < threshold
