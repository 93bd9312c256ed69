"""Tests of cpt_jax.schedules: each schedule against its formula written independently in numpy,
the crossing step (closed form against the scan, the paper's 71.1%), jit, metadata, validation."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpt_jax import schedules
from cpt_jax.config import ConfigError, default_config

START = 4.5e-5  # the paper's pretraining eta_min, where the recipe starts
RATIO = 0.01
# Exact t*/T for the paper's cosine (4.5e-5 -> 4.5e-7) and threshold start/5: the paper's 71.1%
# (213.4B tokens of a 300B-token run).
PAPER_FRACTION = math.acos(2 * (START / 5 - START * RATIO) / (START - START * RATIO) - 1) / math.pi


def section(name: str, **overrides):
    cfg = default_config().schedule
    cfg.name = name
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


# ----------------------------------------------------------------------------- reference formulas


def ref_cosine(t, a, b, length):
    u = np.minimum(np.asarray(t, np.float64), length) / length
    return b + (a - b) / 2 * (1 + np.cos(np.pi * u))


def ref_recipe(t, steps, start, ratio):
    return ref_cosine(t, start, start * ratio, steps)


def ref_warmup_cosine(t, steps, s0, peak, floor, warmup):
    t = np.asarray(t, np.float64)
    warm = s0 + (peak - s0) * t / max(warmup, 1)
    cos = ref_cosine(np.maximum(t - warmup, 0), peak, floor, steps - warmup)
    return np.where(t < warmup, warm, cos)


def ref_wsd(t, steps, peak, floor, warmup, decay, shape):
    t = np.asarray(t, np.float64)
    start = steps - decay
    u = np.clip(t - start, 0, decay) / decay
    if shape == "linear":
        dec = peak + (floor - peak) * u
    elif shape == "cosine":
        dec = floor + (peak - floor) / 2 * (1 + np.cos(np.pi * u))
    else:
        dec = peak * (floor / peak) ** u
    out = np.where(t < start, peak, dec)
    return np.where(t < warmup, peak * t / max(warmup, 1), out)


def ref_infinite(t, steps, peak, const, floor, warmup, cooldown, anneal):
    t = np.asarray(t, np.float64)
    t_ann = steps - anneal
    out = np.full_like(t, const)
    if anneal:
        out = np.where(t >= t_ann, const * (floor / const) ** (np.minimum(t - t_ann, anneal) / anneal), out)
    if cooldown:
        cool = ref_cosine(np.maximum(t - warmup, 0), peak, const, cooldown)
        out = np.where(t < warmup + cooldown, cool, out)
    if warmup:
        out = np.where(t < warmup, peak * t / warmup, out)
    return out


def check_points(sched, ref, points):
    got = np.asarray(sched(np.asarray(points, np.int32)), np.float64)
    np.testing.assert_allclose(got, ref(np.asarray(points)), rtol=2e-6, atol=1e-12)
    for p in points:  # python ints too
        assert float(sched(int(p))) == pytest.approx(float(ref(np.asarray([p]))[0]), rel=2e-6, abs=1e-12)


# ----------------------------------------------------------------------------- each schedule


@pytest.mark.parametrize("steps", [1, 10, 1000, 123457])
def test_recipe_matches_formula(steps):
    s = schedules.build(section("recipe"), steps, START)
    pts = sorted({0, steps // 3, steps // 2, max(steps - 1, 0), steps, steps + 1, 3 * steps})
    check_points(s, lambda t: ref_recipe(t, steps, START, RATIO), pts)
    assert (s.start_lr, s.lr_max, s.peak_step) == (START, START, 0)
    assert s.lr_min == pytest.approx(START * RATIO, rel=1e-12)


def test_recipe_step0_is_start_lr_exactly():
    for steps in (1, 100, 300000):
        s = schedules.build(section("recipe"), steps, START)
        assert s(0) == np.float32(START)
        assert s(jnp.int32(0)) == np.float32(START)
        assert schedules.values(s)[0] == float(np.float32(START))


def test_recipe_uses_final_ratio():
    s = schedules.build(section("recipe", final_ratio=0.1), 50, 2e-4)
    assert float(s(50)) == pytest.approx(2e-5, rel=1e-6)
    assert s.metadata()["final_ratio"] == 0.1


@pytest.mark.parametrize("warmup", [0, 1, 25])
def test_warmup_cosine_matches_formula(warmup):
    steps = 200
    s = schedules.build(section("warmup_cosine", peak_lr=3e-4, min_lr=3e-5, warmup_steps=warmup), steps, None)
    pts = sorted({0, warmup // 2, warmup, warmup + 1, 110, steps - 1, steps, steps + 7})
    check_points(s, lambda t: ref_warmup_cosine(t, steps, 0.0, 3e-4, 3e-5, warmup), pts)
    assert s.lr_max == 3e-4 and s.lr_min == 3e-5 and s.peak_step == warmup
    assert s.start_lr == (0.0 if warmup else 3e-4)


@pytest.mark.parametrize("start_lr", [None, 4.5e-5])
def test_rewarm_matches_formula(start_lr):
    steps, warmup = 300, 30
    cfg = section("rewarm", peak_lr=3e-4, min_lr=3e-5, warmup_steps=warmup)
    s = schedules.build(cfg, steps, start_lr)
    s0 = start_lr or 0.0
    check_points(s, lambda t: ref_warmup_cosine(t, steps, s0, 3e-4, 3e-5, warmup), [0, 15, 30, 31, 170, 300, 301])
    assert float(s(0)) == pytest.approx(s0)
    assert s.start_lr == s0 and s.peak_step == warmup and s.lr_max == 3e-4


def test_rewarm_from_peak_has_peak_at_zero():
    s = schedules.build(section("rewarm", peak_lr=3e-4, min_lr=3e-5, warmup_steps=10), 100, 3e-4)
    assert s.peak_step == 0
    np.testing.assert_allclose(schedules.values(s)[:11], np.float32(3e-4))


@pytest.mark.parametrize("shape", ["linear", "cosine", "exponential"])
@pytest.mark.parametrize("warmup,decay", [(10, 40), (0, 0), (20, 180)])
def test_wsd_matches_formula(shape, warmup, decay):
    steps = 200
    cfg = section("wsd", peak_lr=3e-4, min_lr=3e-5, warmup_steps=warmup, decay_steps=decay, decay_shape=shape)
    s = schedules.build(cfg, steps, None)
    d = decay or 20
    pts = sorted({0, warmup // 2, warmup, 100, steps - d - 1, steps - d, steps - d // 2, steps - 1, steps, 250})
    check_points(s, lambda t: ref_wsd(t, steps, 3e-4, 3e-5, warmup, d, shape), pts)
    assert s.params["decay_steps"] == d and s.params["decay_shape"] == shape
    assert (s.lr_max, s.lr_min, s.peak_step) == (3e-4, 3e-5, warmup)


@pytest.mark.parametrize("steps,expected", [(1, 1), (4, 1), (5, 1), (15, 2), (25, 3), (1000, 100), (1004, 100)])
def test_wsd_default_decay_is_ten_percent(steps, expected):
    s = schedules.build(section("wsd"), steps, None)
    assert s.params["decay_steps"] == expected


def test_constant():
    s = schedules.build(section("constant"), 10, 1e-4)
    v = schedules.values(s)
    assert v.shape == (11,) and v.dtype == np.float64
    np.testing.assert_array_equal(v, float(np.float32(1e-4)))
    assert float(s(10**6)) == np.float32(1e-4)
    assert s.lr_min == s.lr_max == s.start_lr == 1e-4


@pytest.mark.parametrize(
    "warmup,cooldown,anneal",
    [(10, 40, 50), (10, 40, 0), (0, 0, 30), (0, 20, 0), (0, 0, 0), (5, 95, 100)],
)
def test_infinite_matches_formula(warmup, cooldown, anneal):
    steps = 200
    cfg = section(
        "infinite",
        peak_lr=3e-4,
        const_lr=1e-4,
        min_lr=1e-5,
        warmup_steps=warmup,
        cooldown_steps=cooldown,
        anneal_steps=anneal,
    )
    s = schedules.build(cfg, steps, None)
    pts = sorted(
        {0, warmup, warmup + cooldown // 2, warmup + cooldown, 120, steps - anneal, steps - anneal // 3, steps, 999}
    )
    pts = [p for p in pts if p >= 0]
    check_points(s, lambda t: ref_infinite(t, steps, 3e-4, 1e-4, 1e-5, warmup, cooldown, anneal), pts)
    uses_peak = warmup > 0 or cooldown > 0
    assert s.lr_max == (3e-4 if uses_peak else 1e-4)
    assert s.lr_min == (1e-5 if anneal else 1e-4)
    assert ("min_lr" in s.params) == bool(anneal) and ("peak_lr" in s.params) == uses_peak


ALL_CASES = [
    ("recipe", {}, 1000, START),
    ("warmup_cosine", {"warmup_steps": 50}, 500, None),
    ("rewarm", {"warmup_steps": 50}, 500, START),
    ("wsd", {"warmup_steps": 20, "decay_shape": "cosine"}, 300, None),
    ("wsd", {"warmup_steps": 20, "decay_steps": 60, "decay_shape": "exponential"}, 300, None),
    ("constant", {}, 100, 2e-4),
    ("infinite", {"warmup_steps": 10, "cooldown_steps": 40, "anneal_steps": 50}, 300, None),
    ("infinite", {"anneal_steps": 50}, 300, None),
]


def build_case(case):
    name, overrides, steps, start_lr = case
    return schedules.build(section(name, **overrides), steps, start_lr)


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c[0] if isinstance(c, tuple) else None)
def test_summary_fields_match_values(case):
    s = build_case(case)
    v = schedules.values(s)
    assert v.shape == (s.steps + 1,)
    assert float(v[0]) == pytest.approx(s.start_lr, rel=1e-6, abs=1e-12)
    assert v.max() == pytest.approx(s.lr_max, rel=1e-6)
    assert v[-1] == pytest.approx(s.lr_min, rel=1e-6)
    assert int(np.argmax(v >= np.float32(s.lr_max) * (1 - 1e-6))) == s.peak_step
    # Non-increasing from the peak on (up to float32 rounding): what the closed-form crossing assumes.
    assert np.all(np.diff(v[s.peak_step :]) <= 1e-6 * s.lr_max)
    beyond = np.asarray(s(np.arange(s.steps, s.steps + 50, dtype=np.int32)), np.float64)
    np.testing.assert_array_equal(beyond, v[-1])


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c[0] if isinstance(c, tuple) else None)
def test_jit_equals_eager_and_float32(case):
    s = build_case(case)
    steps = jnp.arange(s.steps + 3, dtype=jnp.int32)
    eager, jitted = s(steps), jax.jit(s.fn)(steps)
    assert eager.dtype == jnp.float32 and jitted.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(eager))
    one = jax.jit(s)(jnp.int32(s.steps // 2))
    assert one.shape == () and one.dtype == jnp.float32
    assert s(3).dtype == jnp.float32 and s(3).shape == ()


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c[0] if isinstance(c, tuple) else None)
def test_metadata_is_json(case):
    s = build_case(case)
    meta = json.loads(json.dumps(s.metadata()))
    assert meta["name"] == s.name and meta["steps"] == s.steps
    assert meta["lr_max"] == s.lr_max and meta["lr_min"] == s.lr_min and meta["start_lr"] == s.start_lr
    for key, value in s.params.items():
        assert meta[key] == value


# ----------------------------------------------------------------------------- crossing step


@pytest.mark.parametrize("steps", [10, 100, 1000, 3333, 100000, 300000])
def test_recipe_crossing_paper(steps):
    s = schedules.build(section("recipe"), steps, START)
    closed = s.crossing_step(START / 5)
    assert closed == schedules.crossing_step(s, START / 5, method="scan")
    assert closed == schedules.crossing_step(s, START / 5)
    assert closed == math.ceil(PAPER_FRACTION * steps)
    assert float(s(closed)) <= np.float32(START / 5) < float(s(closed - 1))


def test_recipe_crossing_at_71_1_percent():
    assert round(PAPER_FRACTION, 3) == 0.711 and abs(PAPER_FRACTION - 213.4 / 300) < 1e-4
    s = schedules.build(section("recipe"), 1000, START)
    assert s.crossing_step(9e-6) == 712
    s = schedules.build(section("recipe"), 100000, START)
    assert abs(s.crossing_step(9e-6) / 100000 - PAPER_FRACTION) < 1e-4
    assert abs(s.crossing_step(9e-6) / 100000 - 0.711) < 1e-3


@pytest.mark.parametrize("divisor", [2, 5, 10, 50, 100])
def test_recipe_crossing_other_switch_points(divisor):
    s = schedules.build(section("recipe"), 20000, START)
    assert s.crossing_step(START / divisor) == schedules.crossing_step(s, START / divisor, method="scan")


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c[0] if isinstance(c, tuple) else None)
def test_closed_form_agrees_with_scan(case):
    s = build_case(case)
    thresholds = list(np.geomspace(s.lr_min * 0.5, s.lr_max * 1.5, 41))
    # Values the schedule holds exactly (plateaus, segment ends) are the hard cases for rounding.
    thresholds += [s.lr_max, s.lr_min, s.start_lr, *[seg.b for seg in s.segments], *[seg.a for seg in s.segments]]
    thresholds += [float(x) for x in schedules.values(s)[:: max(1, s.steps // 37)]]
    final = float(s(s.steps))
    for c in thresholds:
        scan = schedules.crossing_step(s, c, method="scan")
        assert s.crossing_step(c) == scan, c
        c32 = float(np.float32(c))
        if final <= c32:  # the closed form itself, without the scan fallback of crossing_step
            assert schedules._closed_form_crossing(s, c32) == scan, c


def test_closed_form_path_is_taken_for_cosine():
    s = schedules.build(section("recipe"), 100000, START)
    c = float(np.float32(START / 5))
    assert schedules._closed_form_crossing(s, c) == schedules._scan_crossing(s, c)
    assert schedules._closed_form_crossing(s, c) is not None


def brute_force(s, c):
    v = np.asarray([float(s(i)) for i in range(s.steps + 1)])
    c = np.float32(c)
    for i in range(s.peak_step, s.steps + 1):
        if v[i] <= c:
            return i
    return None


def test_crossing_wsd_scan():
    cfg = section("wsd", peak_lr=3e-4, min_lr=3e-5, warmup_steps=10, decay_steps=40, decay_shape="linear")
    s = schedules.build(cfg, 100, None)
    # Linear decay 3e-4 -> 3e-5 over steps 60..100: 1.5e-4 at 60 + 40 * (1.5/2.7) = 82.2.
    assert schedules.crossing_step(s, 1.5e-4, method="scan") == 83 == s.crossing_step(1.5e-4) == brute_force(s, 1.5e-4)
    # The plateau is at the threshold: crossed on the first step of the plateau, the peak.
    assert s.crossing_step(3e-4) == 10


def test_crossing_infinite_scan():
    cfg = section("infinite", peak_lr=3e-4, const_lr=1e-4, min_lr=1e-5, warmup_steps=10, cooldown_steps=40)
    cfg.anneal_steps = 50
    s = schedules.build(cfg, 200, None)
    assert s.crossing_step(1e-4) == 50 == schedules.crossing_step(s, 1e-4, method="scan") == brute_force(s, 1e-4)
    for c in (2e-4, 5e-5, 1.0001e-5):
        assert s.crossing_step(c) == schedules.crossing_step(s, c, method="scan") == brute_force(s, c)
    assert 150 < s.crossing_step(5e-5) < 200


def test_crossing_rewarm_scan():
    cfg = section("rewarm", peak_lr=3e-4, min_lr=3e-5, warmup_steps=20)
    s = schedules.build(cfg, 200, START)
    c = 1e-4
    # Below the threshold during the warmup (it starts at 4.5e-5): only the decay counts.
    assert float(s(0)) < c
    got = schedules.crossing_step(s, c, method="scan")
    assert got == s.crossing_step(c) == brute_force(s, c)
    assert got > 20 and float(s(got)) <= np.float32(c) < float(s(got - 1))


def test_crossing_ignores_warmup_from_zero():
    s = schedules.build(section("warmup_cosine", peak_lr=3e-4, min_lr=3e-5, warmup_steps=30), 300, None)
    got = s.crossing_step(2e-4)
    assert got > 30 and got == brute_force(s, 2e-4)


def test_crossing_above_peak_is_peak_step():
    s = schedules.build(section("warmup_cosine", peak_lr=3e-4, min_lr=3e-5, warmup_steps=30), 300, None)
    assert s.crossing_step(1.0) == 30
    assert schedules.build(section("recipe"), 100, START).crossing_step(1.0) == 0


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c[0] if isinstance(c, tuple) else None)
def test_crossing_none_when_never_reached(case):
    s = build_case(case)
    for method in ("auto", "scan"):
        assert schedules.crossing_step(s, s.lr_min * 0.999, method=method) is None
        assert schedules.crossing_step(s, 0.0, method=method) is None


def test_crossing_bad_method():
    s = schedules.build(section("recipe"), 10, START)
    with pytest.raises(ValueError, match="method"):
        s.crossing_step(1e-5, method="bisect")


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "name,overrides,steps,start_lr,key",
    [
        ("cosine", {}, 100, START, "schedule.name"),
        ("recipe", {"final_ratio": 1.5}, 100, START, "schedule.final_ratio"),
        ("recipe", {"final_ratio": 0.0}, 100, START, "schedule.final_ratio"),
        ("recipe", {"final_ratio": -0.1}, 100, START, "schedule.final_ratio"),
        ("recipe", {}, 100, 0.0, "schedule.start_lr"),
        ("recipe", {}, 100, -1e-4, "schedule.start_lr"),
        ("recipe", {}, 100, float("nan"), "schedule.start_lr"),
        ("constant", {}, 100, -1e-4, "schedule.start_lr"),
        ("recipe", {}, 0, START, "train.steps"),
        ("recipe", {}, -5, START, "train.steps"),
        ("warmup_cosine", {}, 0, None, "train.steps"),
        ("warmup_cosine", {"peak_lr": 0.0}, 100, None, "schedule.peak_lr"),
        ("warmup_cosine", {"peak_lr": -3e-4}, 100, None, "schedule.peak_lr"),
        ("warmup_cosine", {"min_lr": 0.0}, 100, None, "schedule.min_lr"),
        ("warmup_cosine", {"min_lr": 1e-3}, 100, None, "schedule.min_lr"),
        ("warmup_cosine", {"warmup_steps": -1}, 100, None, "schedule.warmup_steps"),
        ("warmup_cosine", {"warmup_steps": 100}, 100, None, "schedule.warmup_steps"),
        ("warmup_cosine", {"warmup_steps": 101}, 100, None, "schedule.warmup_steps"),
        ("rewarm", {"warmup_steps": 200}, 100, START, "schedule.warmup_steps"),
        ("rewarm", {"warmup_steps": 10}, 100, -1e-5, "schedule.start_lr"),
        ("rewarm", {"warmup_steps": 10}, 100, 1e-3, "schedule.start_lr"),
        ("rewarm", {"min_lr": 1e-3}, 100, None, "schedule.min_lr"),
        ("wsd", {"decay_shape": "step"}, 100, None, "schedule.decay_shape"),
        ("wsd", {"decay_steps": -3}, 100, None, "schedule.decay_steps"),
        ("wsd", {"decay_steps": 101}, 100, None, "schedule.decay_steps"),
        ("wsd", {"warmup_steps": 95}, 100, None, "schedule.warmup_steps"),
        ("wsd", {"warmup_steps": 50, "decay_steps": 51}, 100, None, "schedule.warmup_steps"),
        ("wsd", {"min_lr": 4e-4}, 100, None, "schedule.min_lr"),
        ("wsd", {"peak_lr": 0.0}, 100, None, "schedule.peak_lr"),
        ("infinite", {"const_lr": 0.0}, 100, None, "schedule.const_lr"),
        ("infinite", {"const_lr": 1e-3, "cooldown_steps": 10}, 100, None, "schedule.const_lr"),
        ("infinite", {"cooldown_steps": 10, "peak_lr": -1.0}, 100, None, "schedule.peak_lr"),
        ("infinite", {"anneal_steps": 10, "min_lr": 2e-4}, 100, None, "schedule.min_lr"),
        ("infinite", {"anneal_steps": 10, "min_lr": 0.0}, 100, None, "schedule.min_lr"),
        ("infinite", {"anneal_steps": -1}, 100, None, "schedule.anneal_steps"),
        ("infinite", {"cooldown_steps": -1}, 100, None, "schedule.cooldown_steps"),
        ("infinite", {"warmup_steps": 10}, 100, None, "schedule.cooldown_steps"),
        (
            "infinite",
            {"warmup_steps": 40, "cooldown_steps": 40, "anneal_steps": 40},
            100,
            None,
            "schedule.warmup_steps + cooldown_steps + anneal_steps",
        ),
    ],
)
def test_config_errors(name, overrides, steps, start_lr, key):
    with pytest.raises(ConfigError) as err:
        schedules.build(section(name, **overrides), steps, start_lr)
    message = str(err.value)
    assert message.startswith(key + ":"), message
    assert "\n" not in message and "expected" in message


def test_unknown_name_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        schedules.build(section("cosine"), 100, START)
    assert all(n in str(err.value) for n in schedules.NAMES)


@pytest.mark.parametrize("name", ["recipe", "constant"])
def test_start_lr_required(name):
    with pytest.raises(ConfigError) as err:
        schedules.build(section(name), 100, None)
    assert str(err.value) == (
        "schedule.start_lr: None and no init_from checkpoint lr_min; set --config.schedule.start_lr=X"
    )


def test_start_lr_ignored_where_unused():
    # warmup_cosine, wsd and infinite never read start_lr; None is fine.
    for name in ("warmup_cosine", "wsd", "infinite"):
        assert schedules.build(section(name), 100, None).steps == 100
