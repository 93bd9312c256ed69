"""Learning-rate schedules: pure, jit-friendly functions of the optimizer step, built with optax.

`build(config.schedule, steps, start_lr)` returns a `Schedule`: the function (step -> float32 lr)
plus what the trainer needs to know without evaluating it, and `crossing_step`, the first step
after the peak at which the lr has decayed to a threshold (where the mixture switches blends; the
recipe switches at start/5). The schedules and their keys are in the README's table.

A run of `steps` optimizer steps uses steps 0..steps-1; every schedule reaches its floor `lr_min` at
step `steps` and stays there for any later step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cpt_jax.config import ConfigError

NAMES = ("recipe", "warmup_cosine", "rewarm", "wsd", "constant", "infinite")
DECAY_SHAPES = ("linear", "cosine", "exponential")
CROSSING_METHODS = ("auto", "scan")
# The schedules whose shape depends on the starting LR (`build`'s start_lr; the others ignore it),
# and those of them that cannot do without one ('rewarm' warms up from 0 when it is None).
READS_START_LR = ("recipe", "constant", "rewarm")
NEEDS_START_LR = ("recipe", "constant")


@dataclasses.dataclass(frozen=True)
class Segment:
    """One piece of a schedule: `kind` ('linear', 'cosine', 'exponential': a * (b/a)^(t/length), or
    'constant') from value `a` at step `start` to `b` at `start + length`. A Schedule's segments are
    contiguous, non-empty and cover steps 0..steps."""

    kind: str
    start: int
    length: int
    a: float
    b: float

    @property
    def end(self) -> int:
        return self.start + self.length

    def time_of(self, c: float) -> float:
        """Real offset t in [0, length] where this decreasing segment's value equals c (b <= c)."""
        if c >= self.a or self.a <= self.b:
            return 0.0
        if c <= self.b:
            return float(self.length)
        if self.kind == "linear":
            frac = (self.a - c) / (self.a - self.b)
        elif self.kind == "cosine":
            x = 2.0 * (c - self.b) / (self.a - self.b) - 1.0
            frac = math.acos(min(1.0, max(-1.0, x))) / math.pi
        else:  # exponential (a constant segment, a == b, has returned above)
            frac = math.log(c / self.a) / math.log(self.b / self.a)
        return frac * self.length


# eq=False: hashed by identity, so a Schedule can be jitted or passed as a static argument (the
# generated hash would fail on `params`, and field equality is meaningless with `fn` compared by
# identity anyway).
@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    """A learning-rate schedule over a run of `steps` optimizer steps (see the module docstring)."""

    name: str  # one of NAMES
    steps: int  # the run uses steps 0..steps-1
    fn: Callable[[Any], jax.Array]  # optax-style: step (int or integer array, traced or not) -> float32 lr
    start_lr: float  # the lr at step 0
    lr_max: float  # the largest lr over steps 0..steps
    lr_min: float  # the floor: the value at step == steps and after
    peak_step: int  # the first step at which the lr equals lr_max (0 without a warmup)
    params: dict[str, Any]  # every resolved value that defines the schedule (JSON-able)
    segments: tuple[Segment, ...] = ()  # the pieces it is made of, for the closed-form crossing step

    def __call__(self, step: Any) -> jax.Array:
        return self.fn(step)

    def crossing_step(self, threshold: float, *, method: str = "auto") -> int | None:
        """First step s, peak_step <= s <= steps, with lr(s) <= threshold; None if never."""
        return crossing_step(self, threshold, method=method)

    def metadata(self) -> dict[str, Any]:
        """JSON-able description: name, steps, start_lr, lr_max, lr_min and the resolved params."""
        return {"name": self.name, "steps": int(self.steps), "start_lr": float(self.start_lr),
                "lr_max": float(self.lr_max), "lr_min": float(self.lr_min), **self.params}


def build(cfg: Any, steps: int, start_lr: float | None) -> Schedule:
    """The schedule of the `config.schedule` section `cfg` for a run of `steps` (> 0) steps.

    `start_lr` is the resolved starting lr (`resolve.start_lr`; `cfg.start_lr` is not read): read by
    READS_START_LR, required by NEEDS_START_LR, ignored by the others. A bad value is a ConfigError
    naming its key.
    """
    name = cfg.name
    if name not in NAMES:
        raise ConfigError(f"schedule.name: {name!r}, expected one of {', '.join(map(repr, NAMES))}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps <= 0:
        raise ConfigError(f"train.steps: {steps!r}, expected a positive integer")
    return _BUILDERS[name](cfg, int(steps), start_lr)


def _build_recipe(cfg: Any, steps: int, start_lr: float | None) -> Schedule:
    s0 = _required_start_lr(start_lr)
    ratio = cfg.final_ratio
    if not _is_real(ratio) or not 0.0 < ratio <= 1.0:
        raise ConfigError(f"schedule.final_ratio: {ratio!r}, expected a value in (0, 1]")
    ratio = float(ratio)
    floor = s0 * ratio
    return Schedule("recipe", steps, _float32(optax.cosine_decay_schedule(s0, steps, alpha=ratio)), start_lr=s0,
                    lr_max=s0, lr_min=floor, peak_step=0, params={"start_lr": s0, "final_ratio": ratio},
                    segments=(Segment("cosine", 0, steps, s0, floor),))


def _build_rewarm(cfg: Any, steps: int, start_lr: float | None) -> Schedule:
    s0 = 0.0
    if start_lr is not None:
        # 0 is the same as None here (a warmup from zero), so only negative values are errors.
        if not _is_real(start_lr) or not math.isfinite(start_lr) or start_lr < 0:
            raise ConfigError(f"schedule.start_lr: {start_lr!r}, expected a non-negative learning rate")
        s0 = float(start_lr)
    return _warmup_then_cosine(cfg, steps, "rewarm", s0)


def _warmup_then_cosine(cfg: Any, steps: int, name: str, s0: float) -> Schedule:
    peak, floor = _peak_and_min(cfg)
    warmup = _count(cfg, "warmup_steps")
    if warmup > 0 and s0 > peak:
        # Above the peak the "warmup" would decay and the peak would not be the maximum.
        raise ConfigError(f"schedule.start_lr: {s0!r}, expected at most schedule.peak_lr ({peak!r}) for 'rewarm'")
    if warmup >= steps:
        raise ConfigError(
            f"schedule.warmup_steps: {warmup}, expected at most {steps - 1} "
            f"(the run has {steps} steps and the cosine decay needs at least one)"
        )
    # optax's decay_steps counts the warmup too: the cosine covers steps warmup..steps.
    fn = optax.warmup_cosine_decay_schedule(s0, peak, warmup, steps, end_value=floor)
    segments = _nonempty(Segment("linear", 0, warmup, s0, peak), Segment("cosine", warmup, steps - warmup, peak, floor))
    params: dict[str, Any] = {"peak_lr": peak, "min_lr": floor, "warmup_steps": warmup}
    if name == "rewarm" and warmup > 0:
        params = {"start_lr": s0, **params}
    return Schedule(name, steps, _float32(fn), start_lr=s0 if warmup > 0 else peak, lr_max=peak, lr_min=floor,
                    peak_step=warmup if s0 < peak else 0, params=params, segments=segments)


def _build_wsd(cfg: Any, steps: int, start_lr: float | None) -> Schedule:
    peak, floor = _peak_and_min(cfg)
    shape = cfg.decay_shape
    if shape not in DECAY_SHAPES:
        raise ConfigError(f"schedule.decay_shape: {shape!r}, expected one of {', '.join(map(repr, DECAY_SHAPES))}")
    warmup = _count(cfg, "warmup_steps")
    decay = _count(cfg, "decay_steps")
    if decay == 0:
        decay = max(1, (steps + 5) // 10)  # 10% of the run, rounded half up
    elif decay > steps:
        raise ConfigError(f"schedule.decay_steps: {decay}, expected at most the run's {steps} steps")
    if warmup + decay > steps:
        raise ConfigError(
            f"schedule.warmup_steps: {warmup}, expected at most {steps - decay} "
            f"(the run's {steps} steps less {decay} decay steps)"
        )
    segments = _nonempty(
        Segment("linear", 0, warmup, 0.0, peak),
        Segment("constant", warmup, steps - decay - warmup, peak, peak),
        Segment(shape, steps - decay, decay, peak, floor),
    )
    params = {"peak_lr": peak, "min_lr": floor, "warmup_steps": warmup, "decay_steps": decay, "decay_shape": shape}
    return Schedule("wsd", steps, _join(segments), start_lr=0.0 if warmup > 0 else peak, lr_max=peak, lr_min=floor,
                    peak_step=warmup, params=params, segments=segments)


def _build_constant(cfg: Any, steps: int, start_lr: float | None) -> Schedule:
    s0 = _required_start_lr(start_lr)
    return Schedule("constant", steps, _float32(optax.constant_schedule(s0)), start_lr=s0, lr_max=s0, lr_min=s0,
                    peak_step=0, params={"start_lr": s0}, segments=(Segment("constant", 0, steps, s0, s0),))


def _build_infinite(cfg: Any, steps: int, start_lr: float | None) -> Schedule:
    warmup = _count(cfg, "warmup_steps")
    cooldown = _count(cfg, "cooldown_steps")
    anneal = _count(cfg, "anneal_steps")
    const = _positive_lr(cfg.const_lr, "const_lr")
    # Without warmup and cooldown the run starts in the constant phase (continuing a run that
    # stopped there): peak_lr plays no part.
    uses_peak = warmup > 0 or cooldown > 0
    peak = _positive_lr(cfg.peak_lr, "peak_lr") if uses_peak else const
    if const > peak:
        raise ConfigError(f"schedule.const_lr: {const!r}, expected at most schedule.peak_lr ({peak!r})")
    if warmup > 0 and cooldown == 0 and const < peak:
        # The warmup ends at peak_lr; dropping straight to const_lr would never reach the peak.
        raise ConfigError(
            f"schedule.cooldown_steps: 0, expected at least 1 when warmup_steps ({warmup}) > 0 "
            f"and const_lr ({const!r}) < peak_lr ({peak!r})"
        )
    floor = const
    if anneal > 0:
        floor = _positive_lr(cfg.min_lr, "min_lr")
        if floor > const:
            raise ConfigError(f"schedule.min_lr: {floor!r}, expected at most schedule.const_lr ({const!r})")
    if warmup + cooldown + anneal > steps:
        raise ConfigError(
            f"schedule.warmup_steps + cooldown_steps + anneal_steps: {warmup} + {cooldown} + {anneal} = "
            f"{warmup + cooldown + anneal}, expected at most the run's {steps} steps"
        )
    t_anneal = steps - anneal
    segments = _nonempty(
        Segment("linear", 0, warmup, 0.0, peak),
        Segment("cosine", warmup, cooldown, peak, const),
        Segment("constant", warmup + cooldown, t_anneal - warmup - cooldown, const, const),
        Segment("exponential", t_anneal, anneal, const, floor),
    )
    params: dict[str, Any] = {"const_lr": const}
    if uses_peak:
        params["peak_lr"] = peak
    if anneal > 0:
        params["min_lr"] = floor
    params.update(warmup_steps=warmup, cooldown_steps=cooldown, anneal_steps=anneal)
    return Schedule("infinite", steps, _join(segments), start_lr=0.0 if warmup > 0 else peak, lr_max=peak,
                    lr_min=floor, peak_step=warmup, params=params, segments=segments)


_BUILDERS: dict[str, Callable[[Any, int, float | None], Schedule]] = {
    "recipe": _build_recipe,
    "warmup_cosine": lambda cfg, steps, start_lr: _warmup_then_cosine(cfg, steps, "warmup_cosine", 0.0),
    "rewarm": _build_rewarm,
    "wsd": _build_wsd,
    "constant": _build_constant,
    "infinite": _build_infinite,
}


def _float32(inner: Callable[[Any], Any]) -> Callable[[Any], jax.Array]:
    """Wraps an optax schedule: float32 result with the shape of `step` (constants ignore it)."""

    def fn(step: Any) -> jax.Array:
        return jnp.broadcast_to(jnp.asarray(inner(step), jnp.float32), jnp.shape(step))

    # Always compiled: op-by-op evaluation rounds differently from XLA's fused code (by a few ulps),
    # and the crossing step must see the same values as the jitted train step.
    return jax.jit(fn)


def _optax_piece(seg: Segment) -> Callable[[Any], Any]:
    """The optax schedule of one segment, as a function of the step since the segment's start."""
    if seg.kind == "linear":
        return optax.linear_schedule(seg.a, seg.b, seg.length)
    if seg.kind == "cosine":
        return optax.cosine_decay_schedule(seg.a, seg.length, alpha=seg.b / seg.a)
    if seg.kind == "exponential":
        # end_value clamps the tail at b, but a * (b/a)^1 rounds to either side of b: the end (and
        # every later step) is pinned to b itself.
        decay = optax.exponential_decay(seg.a, seg.length, seg.b / seg.a, end_value=seg.b)
        return lambda t: jnp.where(t >= seg.length, seg.b, decay(t))
    return optax.constant_schedule(seg.a)


def _join(segments: tuple[Segment, ...]) -> Callable[[Any], jax.Array]:
    pieces = [_optax_piece(s) for s in segments]
    return _float32(optax.join_schedules(pieces, [s.start for s in segments[1:]]))


def _nonempty(*segments: Segment) -> tuple[Segment, ...]:
    # A zero-length piece would still win join_schedules at its boundary (and, at the end of the
    # run, for every later step), so empty pieces must not reach the join.
    return tuple(s for s in segments if s.length > 0)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _required_start_lr(start_lr: float | None) -> float:
    if start_lr is None:
        raise ConfigError(
            "schedule.start_lr: None and no init_from checkpoint lr_min; set --config.schedule.start_lr=X"
        )
    if not _is_real(start_lr) or not math.isfinite(start_lr) or start_lr <= 0:
        raise ConfigError(f"schedule.start_lr: {start_lr!r}, expected a positive learning rate")
    return float(start_lr)


def _positive_lr(value: Any, key: str) -> float:
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"schedule.{key}: {value!r}, expected a positive learning rate")
    return float(value)


def _peak_and_min(cfg: Any) -> tuple[float, float]:
    peak = _positive_lr(cfg.peak_lr, "peak_lr")
    floor = _positive_lr(cfg.min_lr, "min_lr")
    if floor > peak:
        raise ConfigError(f"schedule.min_lr: {floor!r}, expected at most schedule.peak_lr ({peak!r})")
    return peak, floor


def _count(cfg: Any, key: str) -> int:
    value = getattr(cfg, key)
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"schedule.{key}: {value!r}, expected a non-negative integer number of steps")
    return int(value)


def values(schedule: Schedule) -> np.ndarray:
    """The lr at steps 0..steps inclusive (float64 holding the exact float32 values), vectorised."""
    return _lr_at(schedule, np.arange(schedule.steps + 1))


def _lr_at(schedule: Schedule, steps: Any) -> np.ndarray:
    return np.asarray(schedule.fn(np.asarray(steps, dtype=np.int32)), dtype=np.float64)


def crossing_step(schedule: Schedule, threshold: float, *, method: str = "auto") -> int | None:
    """First integer step s with peak_step <= s <= steps and lr(s) <= threshold (compared as
    float32, the lr's precision); None if never. Steps before the peak do not count.

    method 'auto' takes the closed form of the segment the crossing falls in (`Segment.time_of`),
    checks the steps around it against `fn` so float rounding cannot move it by one, and falls back
    to 'scan' (every step, `values`) when that check fails.
    """
    if method not in CROSSING_METHODS:
        raise ValueError(f"crossing_step method: {method!r}, expected one of {CROSSING_METHODS}")
    c = float(np.float32(threshold))
    if math.isnan(c):
        raise ValueError(f"crossing_step threshold: {threshold!r}, expected a number")
    if method == "scan":
        return _scan_crossing(schedule, c)
    # Every schedule is non-increasing from its peak on, so its last value is its smallest there.
    if _lr_at(schedule, schedule.steps) > c:
        return None
    found = _closed_form_crossing(schedule, c)
    return found if found is not None else _scan_crossing(schedule, c)


def _scan_crossing(schedule: Schedule, c: float) -> int | None:
    hits = np.flatnonzero(values(schedule)[schedule.peak_step :] <= c)
    return int(schedule.peak_step + hits[0]) if hits.size else None


def _closed_form_crossing(schedule: Schedule, c: float) -> int | None:
    """The closed-form crossing, confirmed against `fn`; None when it cannot be confirmed."""
    peak = schedule.peak_step
    for seg in schedule.segments:
        if seg.end <= peak:
            continue
        # Compare in float32, the precision of the lr itself, so that a threshold equal to a
        # segment's end value is found in that segment.
        if float(np.float32(seg.b)) > c:
            continue
        if seg.a < seg.b:
            return None  # rising after the peak: no closed form (not built by this module)
        candidate = min(max(peak, seg.start + math.ceil(seg.time_of(c))), schedule.steps)
        return _confirm(schedule, candidate, c)
    return None


def _confirm(schedule: Schedule, candidate: int, c: float) -> int | None:
    """The first step at or below c in a window around `candidate`, if the window proves it first."""
    lo = max(schedule.peak_step, candidate - 2)
    hi = min(schedule.steps, candidate + 2)
    window = np.arange(lo, hi + 1)
    hits = np.flatnonzero(_lr_at(schedule, window) <= c)
    if not hits.size:
        return None
    # A hit at the window's first step proves nothing unless nothing before it counts.
    if hits[0] == 0 and lo != schedule.peak_step:
        return None
    return int(lo + hits[0])
