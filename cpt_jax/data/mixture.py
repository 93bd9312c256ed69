"""Schedule-aware data mixture: global example index -> (source, k-th draw from that source).

A mixture is a list of phases, each with weights over the named sources; every phase after the
first starts at a condition (step, fraction of the run, tokens, LR or a fraction of the starting
LR) that `resolve_phases` turns into a step ONCE, through the LR schedule. After that, index `i`
maps to its source and to `k`, how many examples of that source came before it in the whole run
(so a source picked up again in a later phase continues where it left off): a pure function of
the index (Principles 1 and 2).

Within a phase the weights are integer counts `c_s` over a period `P` (exact for ratios with a
small common denominator, 0.9/0.1 -> 9:1 over 10; else quantized to 1/65536 by largest remainder),
laid out once by earliest-deadline-first so that every prefix of `j` examples holds each source
within `j * c_s / P` +- delta, delta < 1 (1/2 where achievable; Tijdeman's 1 - 1/(2n-2) otherwise).
Index -> (source, k) is then O(1). `ProcessSelection` is this sampler as grain's selection map
on global indices, which (unlike a mixer inside grain's workers) does not depend on how many
workers read. `from_config` is the one place a run's mixture is made.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

import grain
import numpy as np

from cpt_jax.config import ConfigError

START_KEYS = ("step", "fraction", "tokens", "lr", "lr_ratio")

# Largest period of the interleave. Weights that are not ratios with a common denominator up to
# this are quantized to multiples of 1/MAX_PERIOD: a share error below 2e-5, while one period
# (a few arrays of P entries per phase) stays small and is laid out in well under a second.
MAX_PERIOD = 1 << 16
# Largest denominator tried when recognising a weight as an exact ratio (0.3 -> 3/10).
_MAX_DENOMINATOR = 10_000


@dataclasses.dataclass(frozen=True)
class Phase:
    """One resolved phase: from `start_step` on, examples follow `weights` (every source of the
    mixture in its order, summing to 1); `start_at` is the config's condition (None for the first)."""

    index: int
    start_step: int
    weights: dict[str, float]
    start_at: dict | None


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def _as_mapping(x: Any) -> Mapping | None:
    if isinstance(x, Mapping):
        return x
    if hasattr(x, "to_dict"):  # an ml_collections ConfigDict nested in the phases tuple
        return x.to_dict()
    return None


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def resolve_phases(phases_cfg: Sequence[Any], source_names: Sequence[str], schedule: Any, batch_size: int,
                   seq_len: int) -> list[Phase]:
    """Validates `data.phases` and resolves every start condition to a step of `schedule`.

    `schedule` is a `cpt_jax.schedules.Schedule` (uses `.steps`, `.start_lr`, `.lr_min` and
    `.crossing_step`). Raises `ConfigError` (one line naming the key) on any mistake.
    """
    names = list(source_names)
    known = ", ".join(names) if names else "(none: data.sources is empty)"
    steps = int(schedule.steps)
    if phases_cfg is None or len(phases_cfg) == 0:
        raise ConfigError(
            "data.phases: empty, expected at least one phase like dict(weights={name: weight}) "
            "when data.kind is 'mixture'"
        )
    phases: list[Phase] = []
    for i, raw in enumerate(phases_cfg):
        key = f"data.phases[{i}]"
        spec = _as_mapping(raw)
        if spec is None:
            raise ConfigError(f"{key}: {raw!r}, expected a dict with 'weights' (and 'start_at' after the first)")
        for extra in spec:
            if extra not in ("weights", "start_at"):
                raise ConfigError(f"{key}.{extra}: unknown key, expected 'weights' and 'start_at'")
        weights = _resolve_weights(key, spec.get("weights"), names, known)
        start_at = spec.get("start_at")
        if i == 0:
            if start_at is not None:
                raise ConfigError(f"{key}.start_at: {start_at!r}, the first phase starts at step 0; remove it")
            start_step = 0
            start_dict = None
        else:
            what, value = _check_start_at(key, start_at)
            start_dict = {what: value}
            start_step = _start_step(key, what, value, schedule, batch_size, seq_len)
            if start_step >= steps:
                raise ConfigError(
                    f"{key}.start_at.{what}: {_fmt(value)} resolves to step {start_step}, at or after the "
                    f"end of the run (train.steps = {steps}); expected a start before step {steps}"
                )
            prev = phases[-1]
            if start_step <= prev.start_step:
                raise ConfigError(
                    f"{key}.start_at.{what}: {_fmt(value)} resolves to step {start_step}, at or before "
                    f"phase {prev.index}'s start (step {prev.start_step}); phases must start in order"
                )
        phases.append(Phase(index=i, start_step=start_step, weights=weights, start_at=start_dict))
    return phases


def _resolve_weights(key: str, weights: Any, names: list[str], known: str) -> dict[str, float]:
    spec = _as_mapping(weights)
    if spec is None or len(spec) == 0:
        raise ConfigError(f"{key}.weights: {weights!r}, expected a dict {{source name: weight}} over: {known}")
    for name, w in spec.items():
        if name not in names:
            raise ConfigError(f"{key}.weights.{name}: unknown source; known sources are: {known}")
        if not _is_number(w) or not math.isfinite(float(w)) or float(w) < 0:
            raise ConfigError(f"{key}.weights.{name}: {w!r}, expected a weight >= 0")
    total = math.fsum(float(w) for w in spec.values())
    if total <= 0:
        raise ConfigError(f"{key}.weights: all weights are 0, expected at least one weight > 0")
    return {name: float(spec.get(name, 0.0)) / total for name in names}


def _check_start_at(key: str, start_at: Any) -> tuple[str, float | int]:
    expected = "expected exactly one of " + ", ".join(START_KEYS)
    if start_at is None:
        raise ConfigError(f"{key}.start_at: missing; phases after the first need a start, {expected}")
    spec = _as_mapping(start_at)
    if spec is None or len(spec) == 0:
        raise ConfigError(f"{key}.start_at: {start_at!r}, {expected}")
    for what in spec:
        if what not in START_KEYS:
            raise ConfigError(f"{key}.start_at.{what}: unknown key, {expected}")
    if len(spec) > 1:
        raise ConfigError(f"{key}.start_at: has {', '.join(spec)}; {expected}")
    what, value = next(iter(spec.items()))
    if not _is_number(value) or not math.isfinite(float(value)):
        raise ConfigError(f"{key}.start_at.{what}: {value!r}, expected a number")
    value = float(value)
    if what == "step" and (value != int(value) or value < 1):
        raise ConfigError(f"{key}.start_at.step: {_fmt(value)}, expected an integer step >= 1")
    if what == "fraction" and not 0 < value < 1:
        raise ConfigError(f"{key}.start_at.fraction: {_fmt(value)}, expected a fraction of the run in (0, 1)")
    if what in ("tokens", "lr", "lr_ratio") and value <= 0:
        raise ConfigError(f"{key}.start_at.{what}: {_fmt(value)}, expected a value > 0")
    return what, int(value) if what == "step" else value


def _start_step(key: str, what: str, value: float, schedule: Any, batch_size: int, seq_len: int) -> int:
    if what == "step":
        return int(value)
    if what == "fraction":
        return int(round(value * schedule.steps))
    if what == "tokens":
        return int(math.ceil(value / (batch_size * seq_len)))
    if what == "lr":
        threshold, shown = value, _fmt(value)
    else:
        if schedule.start_lr is None or schedule.start_lr <= 0:
            raise ConfigError(
                f"{key}.start_at.lr_ratio: {_fmt(value)}, but schedule '{schedule.name}' has no start_lr "
                "to take a ratio of; use start_at.lr (an absolute LR) instead"
            )
        threshold = value * schedule.start_lr
        shown = f"{_fmt(value)} (LR {_fmt(threshold)} = {_fmt(value)} x start_lr {_fmt(schedule.start_lr)})"
    step = schedule.crossing_step(threshold)
    if step is None:
        raise ConfigError(
            f"{key}.start_at.{what}: {shown}, the schedule never decays that far (its lowest LR is "
            f"{_fmt(schedule.lr_min)}); expected a threshold >= {_fmt(schedule.lr_min)}"
        )
    return int(step)


def quantize(weights: Sequence[float]) -> np.ndarray:
    """Integer counts per source over one period (their sum is the period).

    Exact when the weights are ratios with a common denominator up to `MAX_PERIOD`; otherwise the
    largest-remainder apportionment of `MAX_PERIOD` (a positive weight keeps at least one slot so
    that a source the user asked for never silently disappears).
    """
    w = np.asarray(weights, dtype=np.float64)
    fracs = [Fraction(float(x)).limit_denominator(_MAX_DENOMINATOR) for x in w]
    exact = sum(fracs) == 1 and all(abs(float(f) - x) <= 1e-12 for f, x in zip(fracs, w, strict=True))
    if exact:
        period = math.lcm(*(f.denominator for f in fracs))
        if period <= MAX_PERIOD:
            return np.array([f.numerator * (period // f.denominator) for f in fracs], dtype=np.int64)
    w = w / w.sum()
    scaled = w * MAX_PERIOD
    counts = np.floor(scaled).astype(np.int64)
    counts[(w > 0) & (counts == 0)] = 1
    short = MAX_PERIOD - int(counts.sum())
    # Stable sort: ties go to the earlier source, so the result depends only on the weights.
    by_remainder = np.argsort(-(scaled - np.floor(scaled)), kind="stable")
    by_remainder = by_remainder[w[by_remainder] > 0]
    if short > 0:
        counts[by_remainder[:short]] += 1
    while short < 0:  # Minimum slots overshot the period: take them back from the largest.
        largest = int(np.argmax(counts))
        take = min(-short, int(counts[largest]) - 1)
        counts[largest] -= take
        short += take
    return counts


def _edf(counts: list[int], num: int, den: int) -> np.ndarray | None:
    """One period in which every prefix count n_s(t) satisfies |t*c_s/P - n_s(t)| <= num/den.

    The k-th example of source s must land in [release, deadline] (integers, 1-based times) for
    the bound to hold; earliest-deadline-first is optimal for unit jobs with integer release times,
    so it fails (returns None) only when no sequence meets this bound.
    """
    period = sum(counts)
    order = np.empty(period, dtype=np.int32)

    def window(s: int, k: int) -> tuple[int, int]:
        c = counts[s]
        # k - t*c/P <= d  <=>  t >= (k - d) * P / c ;  t*c/P - (k - 1) <= d for t < t_k.
        release = max(1, -((-(k * den - num) * period) // (c * den)))
        deadline = ((k - 1) * den + num) * period // (c * den) + 1
        return release, min(deadline, period)

    placed = [0] * len(counts)
    pending: list[tuple[int, int, int]] = []
    ready: list[tuple[int, int]] = []
    for s, c in enumerate(counts):
        if c:
            heapq.heappush(pending, (*window(s, 1), s))
    for t in range(1, period + 1):
        while pending and pending[0][0] <= t:
            _, deadline, s = heapq.heappop(pending)
            heapq.heappush(ready, (deadline, s))
        if not ready:
            return None
        deadline, s = heapq.heappop(ready)
        if deadline < t:
            return None
        order[t - 1] = s
        placed[s] += 1
        if placed[s] < counts[s]:
            heapq.heappush(pending, (*window(s, placed[s] + 1), s))
    return order


def interleave(counts: Sequence[int]) -> np.ndarray:
    """Source id of each slot of one period with `counts[s]` slots for source s.

    Tries the tightest bound first: 1/2 (e.g. 9:1 puts the one in the middle, not at the end),
    then Tijdeman's 1 - 1/(2n-2), which always exists for n sources, then any bound below 1.
    """
    counts = [int(c) for c in counts]
    n = sum(1 for c in counts if c > 0)
    if n == 0:
        raise ValueError("interleave: all counts are 0")
    if n == 1:
        return np.full(sum(counts), next(s for s, c in enumerate(counts) if c), dtype=np.int32)
    # Bounds as num/den; the last is 1 - 1/(2P), the loosest bound that is still below 1 for
    # every prefix of a period of P slots (deviations are multiples of 1/P).
    period = sum(counts)
    for num, den in ((1, 2), (2 * n - 3, 2 * n - 2), (2 * period - 1, 2 * period)):
        order = _edf(counts, num, den)
        if order is not None:
            return order
    raise AssertionError(f"no interleave below 1 for counts {counts}: contradicts Tijdeman's theorem")


class Mixture:
    """Global example index -> (source id, k-th draw from that source): pure and picklable.

    Phase `p` covers global examples [start_step_p * B, start_step_{p+1} * B); the last phase runs
    on forever (an evaluation past the end still gets an answer).
    """

    def __init__(self, phases: Sequence[Phase], source_names: Sequence[str], batch_size: int):
        if not phases:
            raise ValueError("Mixture needs at least one phase")
        if phases[0].start_step != 0:
            raise ValueError(f"the first phase must start at step 0, not {phases[0].start_step}")
        self.phases = list(phases)
        self.source_names = list(source_names)
        self.batch_size = int(batch_size)
        num_sources = len(self.source_names)
        self.start_steps = np.array([p.start_step for p in self.phases], dtype=np.int64)
        if np.any(np.diff(self.start_steps) <= 0):
            raise ValueError(f"phase start steps must increase: {self.start_steps.tolist()}")
        self.start_examples = self.start_steps * self.batch_size
        # counts[p, s] slots of source s in one period of phase p.
        self.counts = np.stack([quantize([p.weights.get(name, 0.0) for name in self.source_names])
                                for p in self.phases])
        self.periods = self.counts.sum(axis=1)
        self.orders = [interleave(c) for c in self.counts]
        # cum[p][j, s]: examples of source s among the first j slots of a period (j = 0..P).
        self.cum = []
        for order in self.orders:
            onehot = np.zeros((len(order) + 1, num_sources), dtype=np.int64)
            onehot[np.arange(1, len(order) + 1), order] = 1
            self.cum.append(np.cumsum(onehot, axis=0))
        # ranks[p][t]: how many earlier slots of the period hold the same source as slot t.
        self.ranks = [cum[np.arange(len(order)), order] for order, cum in zip(self.orders, self.cum, strict=True)]
        # offsets[p, s]: draws of source s consumed by phases before p (where p picks it up).
        self.offsets = np.zeros((len(self.phases), num_sources), dtype=np.int64)
        for p in range(1, len(self.phases)):
            length = int(self.start_examples[p] - self.start_examples[p - 1])
            self.offsets[p] = self.offsets[p - 1] + self._in_phase(p - 1, length)
        # The same tables as plain Python lists for select_one: grain asks for one example at a
        # time, and list indexing costs a fraction of building and indexing numpy arrays per call.
        self._lists = (self.start_examples.tolist(), self.periods.tolist(), [o.tolist() for o in self.orders],
                       [r.tolist() for r in self.ranks], self.offsets.tolist(), self.counts.tolist())

    def _in_phase(self, p: int, j: int) -> np.ndarray:
        """Examples of each source among the first j examples of phase p."""
        q, r = divmod(int(j), int(self.periods[p]))
        return q * self.counts[p] + self.cum[p][r]

    def _before(self, example: int) -> np.ndarray:
        """Examples of each source among global examples [0, example)."""
        if example < 0:
            raise ValueError(f"example index {example} < 0")
        p = int(np.searchsorted(self.start_examples, example, side="right")) - 1
        return self.offsets[p] + self._in_phase(p, example - int(self.start_examples[p]))

    def select_one(self, index: int) -> tuple[int, int]:
        """(source id, k) of one global example index, as Python ints: what grain's per-example
        selection map calls."""
        index = int(index)
        if index < 0:
            raise ValueError(f"example indices must be >= 0, got {index}")
        starts, periods, orders, ranks, offsets, counts = self._lists
        p = bisect.bisect_right(starts, index) - 1
        q, r = divmod(index - starts[p], periods[p])
        s = orders[p][r]
        return s, offsets[p][s] + q * counts[p][s] + ranks[p][r]

    def phase_at(self, step: int) -> int:
        """Index of the phase that step `step` trains in."""
        return int(np.searchsorted(self.start_steps, int(step), side="right")) - 1

    def examples_per_source(self, start_example: int, end_example: int) -> dict[str, int]:
        """How many of global examples [start_example, end_example) come from each source."""
        if end_example < start_example:
            raise ValueError(f"end_example {end_example} < start_example {start_example}")
        diff = self._before(int(end_example)) - self._before(int(start_example))
        return {name: int(n) for name, n in zip(self.source_names, diff, strict=True)}

    def tokens_per_source(self, step: int, tokens_per_example: int) -> dict[str, int]:
        """Tokens served by each source in steps [0, step) (examples [0, step*B)): closed form."""
        counts = self.examples_per_source(0, int(step) * self.batch_size)
        return {name: n * int(tokens_per_example) for name, n in counts.items()}


class ProcessSelection(grain.transforms.DatasetSelectionMap):
    """The mixture as grain's selection hook for `MapDataset.select_from_datasets`, for one process.

    Local index i is global example `(i // R) * B + rows.start + i % R` (R rows per step), so
    `.batch(R)` gives this process's rows of step s at index s with no worker-local counters.
    Component s must yield the k-th draw of source s at index k.
    """

    def __init__(self, mixture: Mixture, rows: slice, num_steps: int):
        self._mixture = mixture
        self._start, self._rows = int(rows.start), int(rows.stop - rows.start)
        self._length = int(num_steps) * self._rows

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} out of range [0, {self._length})")
        step, row = divmod(int(index), self._rows)
        return self._mixture.select_one(step * self._mixture.batch_size + self._start + row)


SYNTHETIC = "synthetic"


def from_config(cfg: Any, schedule: Any) -> Mixture:
    """The run's mixture: data.phases over data.sources (data.kind 'mixture'), or one source of
    generated data ('synthetic'). What the trainer, plan and the benchmarks all read."""
    B, L = int(cfg.train.batch_size), int(cfg.train.seq_len)
    if cfg.data.kind == SYNTHETIC:
        return Mixture([Phase(index=0, start_step=0, weights={SYNTHETIC: 1.0}, start_at=None)], [SYNTHETIC], B)
    names = list(cfg.data.sources.keys())
    if not names:
        raise ConfigError("data.sources: empty, expected {name: prepared directory} when data.kind is 'mixture'")
    return Mixture(resolve_phases(cfg.data.phases, names, schedule, B, L), names, B)
