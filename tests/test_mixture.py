"""Tests of the schedule-aware mixture: the interleave, phases resolved through the LR schedule,
positions carried across phases, the grain selection hook and every config mistake."""

from __future__ import annotations

import math
import pickle

import grain
import numpy as np
import pytest

from cpt_jax import schedules
from cpt_jax.config import ConfigError, default_config
from cpt_jax.data import mixture as mx


def _schedule(steps: int = 1000, start_lr: float = 4.5e-5, final_ratio: float = 0.01):
    cfg = default_config().schedule
    cfg.final_ratio = final_ratio
    return schedules.build(cfg, steps, start_lr)


def _prefix_counts(sources: np.ndarray, num_sources: int) -> np.ndarray:
    """[len+1, S] counts of each source among the first j entries."""
    onehot = np.zeros((len(sources) + 1, num_sources), dtype=np.int64)
    onehot[np.arange(1, len(sources) + 1), sources] = 1
    return np.cumsum(onehot, axis=0)


def _phase(index: int, start: int, weights: dict[str, float]) -> mx.Phase:
    total = sum(weights.values())
    return mx.Phase(index, start, {k: v / total for k, v in weights.items()}, None if index == 0 else {"step": start})


# ----------------------------------------------------------------------------- the interleave


@pytest.mark.parametrize(
    "weights",
    [
        [0.9, 0.1],
        [1, 1, 1],
        [0.5, 0.3, 0.2, 0.0],
        [0.0, 0.7, 0.0, 0.2, 0.1],
        [0.45, 0.25, 0.15, 0.1, 0.05],
        [5.3e11, 1.2e11, 3e9],
        [1, 2, 3, 4, 5, 6, 7],
    ],
)
def test_interleave_prefix_counts_track_the_exact_weights(weights):
    w = np.array(weights, dtype=np.float64) / np.sum(weights)
    counts = mx.quantize(w)
    period = int(counts.sum())
    # These are ratios with small denominators: represented exactly.
    np.testing.assert_allclose(counts / period, w, rtol=0, atol=1e-15)
    order = mx.interleave(counts)
    # Three periods: the property must also hold across the period boundary.
    seq = np.tile(order, 3)
    cum = _prefix_counts(seq, len(w))
    j = np.arange(len(seq) + 1)[:, None]
    dev = np.abs(cum - j * w[None, :])
    assert dev.max() < 1.0
    # Zero weights never appear; every positive weight does within one period.
    assert set(np.unique(order)) == set(np.flatnonzero(w > 0))
    # Windows anywhere are within 2 (difference of two prefixes).
    for length in (1, 7, period // 2 + 1, period + 3):
        win = cum[length:] - cum[:-length]
        assert np.abs(win - length * w[None, :]).max() < 2.0


def test_two_sources_are_spread_not_bunched():
    # 9:1 puts the minority example mid-period (deviation 1/2), not at the end (deviation 0.9).
    order = mx.interleave([9, 1])
    assert order.tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 0, 0]
    rng = np.random.default_rng(0)
    for _ in range(30):
        counts = rng.integers(1, 60, size=2)
        w = counts / counts.sum()
        cum = _prefix_counts(mx.interleave(counts), 2)
        dev = np.abs(cum - np.arange(len(cum))[:, None] * w[None, :])
        assert dev.max() <= 0.5 + 1e-12


def test_random_weights_stay_within_one_of_the_quantized_weights():
    rng = np.random.default_rng(1)
    for n in (3, 4, 6):
        w = rng.random(n)
        w[rng.random(n) < 0.3] = 0.0
        w[0] += 0.1
        w = w / w.sum()
        counts = mx.quantize(w)
        assert counts.sum() == mx.MAX_PERIOD  # arbitrary floats: quantized to 1/2^16
        assert np.abs(counts / mx.MAX_PERIOD - w).max() <= 1.0 / mx.MAX_PERIOD
        assert np.all((counts > 0) == (w > 0))
        order = mx.interleave(counts)
        cum = _prefix_counts(order, n)
        q = counts / counts.sum()
        assert np.abs(cum - np.arange(len(cum))[:, None] * q[None, :]).max() < 1.0


def test_tiny_positive_weight_keeps_a_slot():
    counts = mx.quantize([1.0 - 1e-7, 1e-7])
    assert counts[1] == 1 and counts.sum() == mx.MAX_PERIOD


# ----------------------------------------------------------------------------- Mixture


def _three_phase_mixture(batch: int = 6) -> mx.Mixture:
    names = ["code", "qa", "web"]
    phases = [
        _phase(0, 0, {"code": 0.2, "qa": 0.0, "web": 0.8}),
        _phase(1, 5, {"code": 0.1, "qa": 0.3, "web": 0.6}),
        _phase(2, 9, {"code": 1 / 3, "qa": 1 / 3, "web": 1 / 3}),
    ]
    return mx.Mixture(phases, names, batch)


def _select(m: mx.Mixture, idx: np.ndarray) -> np.ndarray:
    """[source ids, k] of global example indices, one `select_one` each."""
    return np.array([m.select_one(i) for i in np.asarray(idx).tolist()], dtype=np.int64).reshape(-1, 2).T


def _walk(m: mx.Mixture, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(source id, k) of global examples [0, n) by the definition: each phase repeats its period's
    order from its start, and k counts the source's earlier examples in the whole run."""
    idx = np.arange(n)
    phase = np.searchsorted(m.start_examples, idx, side="right") - 1
    src = np.empty(n, np.int64)
    for p, start in enumerate(m.start_examples.tolist()):
        src[phase == p] = m.orders[p][(idx[phase == p] - start) % m.periods[p]]
    k = np.empty(n, np.int64)
    for s in range(len(m.source_names)):
        k[src == s] = np.arange(np.sum(src == s))
    return src, k


def test_select_follows_each_phase_weights_in_every_prefix():
    m = _three_phase_mixture()
    idx = np.arange(20 * m.batch_size)
    src, _ = _select(m, idx)
    for p, phase in enumerate(m.phases):
        lo = phase.start_step * m.batch_size
        hi = m.phases[p + 1].start_step * m.batch_size if p + 1 < len(m.phases) else len(idx)
        w = np.array([phase.weights[n] for n in m.source_names])
        cum = _prefix_counts(src[lo:hi], 3)
        assert np.abs(cum - np.arange(hi - lo + 1)[:, None] * w[None, :]).max() < 1.0
    # qa has weight 0 in phase 0: none of its examples before step 5.
    assert not np.any(src[: 5 * m.batch_size] == 1)


def test_positions_carry_across_phases():
    m = _three_phase_mixture()
    idx = np.arange(40 * m.batch_size)
    src, k = _select(m, idx)
    for s in range(3):
        # Every source's draws are 0, 1, 2, ... in order of the global index: nothing skipped
        # or repeated when a phase changes its weight (or picks it up again).
        np.testing.assert_array_equal(k[src == s], np.arange(np.sum(src == s)))
    # The first web example of phase 1 continues right after phase 0's web examples.
    start1 = 5 * m.batch_size
    web_before = int(np.sum(src[:start1] == 2))
    first_web_in_1 = np.flatnonzero(src[start1:] == 2)[0] + start1
    assert k[first_web_in_1] == web_before
    assert m.offsets[1].tolist() == [np.sum(src[:start1] == s) for s in range(3)]


def test_select_one_matches_a_walk_through_the_periods_in_any_order():
    m = _three_phase_mixture()
    src, k = _walk(m, 300)
    perm = np.random.default_rng(0).permutation(300)
    np.testing.assert_array_equal(_select(m, perm), [src[perm], k[perm]])
    with pytest.raises(ValueError, match=">= 0"):
        m.select_one(-1)


def test_select_one_is_exact_with_quantized_weights_and_far_into_the_run():
    """The per-example path grain takes: on every index of the first phases, across each switch,
    with quantized weights (a period of MAX_PERIOD slots), and far into the run (against the closed
    form of the per-source counts)."""
    quantized = mx.Mixture([_phase(0, 0, {"a": 0.123457, "b": 0.5, "c": 0.376543}),
                            _phase(1, 3, {"a": 0.0, "b": math.pi / 10, "c": 1 - math.pi / 10})], ["a", "b", "c"], 7)
    assert quantized.periods.tolist() == [mx.MAX_PERIOD, mx.MAX_PERIOD]
    for m in (_three_phase_mixture(), quantized, pickle.loads(pickle.dumps(quantized))):
        near = np.arange(3 * mx.MAX_PERIOD)
        np.testing.assert_array_equal(_select(m, near), _walk(m, len(near)))
        far = np.random.default_rng(1).integers(0, 10**12, size=2000).tolist() + [10**15]
        for i in far:
            s, k = m.select_one(i)
            name = m.source_names[s]
            assert m.examples_per_source(i, i + 1)[name] == 1 and m.examples_per_source(0, i)[name] == k
        assert all(type(s) is int and type(n) is int for s, n in map(m.select_one, far[:10]))
    with pytest.raises(ValueError, match=">= 0"):
        quantized.select_one(-1)


def test_mixture_pickles_and_gives_the_same_answers():
    m = _three_phase_mixture()
    m2 = pickle.loads(pickle.dumps(m))
    idx = np.arange(0, 500, 7)
    for a, b in zip(_select(m, idx), _select(m2, idx), strict=True):
        np.testing.assert_array_equal(a, b)


def test_phase_at_and_per_source_counts_in_closed_form():
    m = _three_phase_mixture()
    assert [m.phase_at(s) for s in (0, 4, 5, 8, 9, 1000)] == [0, 0, 1, 1, 2, 2]
    src, _ = _select(m, np.arange(30 * m.batch_size))
    for step in (0, 1, 4, 5, 7, 9, 13, 30):
        expected = {n: int(np.sum(src[: step * m.batch_size] == s)) * 128 for s, n in enumerate(m.source_names)}
        assert m.tokens_per_source(step, 128) == expected
        assert sum(m.tokens_per_source(step, 128).values()) == step * m.batch_size * 128
    for a, b in ((0, 7), (13, 61), (29, 29), (50, 179)):
        expected = {n: int(np.sum(src[a:b] == s)) for s, n in enumerate(m.source_names)}
        assert m.examples_per_source(a, b) == expected
    # Far beyond anything materialised: still exact, still sums up.
    big = m.tokens_per_source(10**9, 4096)
    assert sum(big.values()) == 10**9 * m.batch_size * 4096
    with pytest.raises(ValueError):
        m.examples_per_source(5, 4)


def test_grain_selection_map_matches_select_one():
    m = _three_phase_mixture()
    B, steps = m.batch_size, 15
    smap = mx.ProcessSelection(m, slice(0, B), steps)
    assert isinstance(smap, grain.transforms.DatasetSelectionMap)
    assert len(smap) == steps * B
    # Component s yields (s, k) for its k-th draw: the mixed dataset then exposes the map.
    components = [grain.MapDataset.range(10**6).map(lambda k, s=s: (s, k)) for s in range(3)]
    mixed = grain.MapDataset.select_from_datasets(components, smap)
    src, k = _select(m, np.arange(steps * B))
    got = [mixed[i] for i in range(steps * B)]
    assert got == list(zip(src.tolist(), k.tolist(), strict=True))
    # Batched access through grain's _getitems path agrees too.
    assert list(mixed._getitems(list(range(0, steps * B, 3)))) == got[::3]
    assert pickle.loads(pickle.dumps(smap))[17] == got[17]
    with pytest.raises(IndexError):
        smap[steps * B]
    # A process holding rows [2, 5) of every batch: local index i is row 2 + i % 3 of step i // 3.
    local = mx.ProcessSelection(m, slice(2, 5), steps)
    assert len(local) == steps * 3
    assert [local[i] for i in range(len(local))] == [got[s * B + r] for s in range(steps) for r in range(2, 5)]


# ----------------------------------------------------------------------------- resolve_phases


def _recipe_phases(start_at: dict, weights1: dict | None = None) -> tuple:
    return (
        {"weights": {"gb": 1.0}},
        {"weights": weights1 or {"gb": 0.9, "qa": 0.1}, "start_at": start_at},
    )


def test_lr_ratio_switch_is_the_analytic_crossing_of_the_recipe_cosine():
    steps = 1000
    sched = _schedule(steps)
    phases = mx.resolve_phases(_recipe_phases({"lr_ratio": 0.2}), ["gb", "qa"], sched, 8, 128)
    t_star = steps * math.acos(2 * (0.2 - 0.01) / (1 - 0.01) - 1) / math.pi  # 711.31...
    assert phases[1].start_step == math.ceil(t_star) == 712
    assert abs(phases[1].start_step / steps - 0.711) < 0.002
    # The LR just before the switch is above start/5; at the switch it is at or below it.
    lrs = schedules.values(sched)
    assert lrs[711] > 0.2 * 4.5e-5 >= lrs[712] - 1e-12
    assert phases[0].weights == {"gb": 1.0, "qa": 0.0}
    assert phases[1].weights == pytest.approx({"gb": 0.9, "qa": 0.1})
    assert phases[1].start_at == {"lr_ratio": 0.2} and phases[0].start_at is None


def test_recipe_15b_switch_at_71_1_percent():
    steps = 300_000_000_000 // (1152 * 4096)
    sched = _schedule(steps)
    phases = mx.resolve_phases(_recipe_phases({"lr_ratio": 0.2}), ["gb", "qa"], sched, 1152, 4096)
    frac = phases[1].start_step / steps
    assert abs(frac - 0.7113) < 1e-4
    assert abs(phases[1].start_step * 1152 * 4096 / 1e9 - 213.4) < 0.1


@pytest.mark.parametrize(
    "start_at, expected",
    [
        ({"step": 250}, 250),
        ({"fraction": 0.25}, 250),
        ({"fraction": 0.2506}, 251),
        ({"tokens": 1024 * 100}, 100),
        ({"tokens": 1024 * 100 + 1}, 101),
        ({"lr": 9e-6}, 712),
        ({"lr": 4.5e-5}, None),  # lr(0) is already at the threshold: step 0, not after phase 0
    ],
)
def test_every_kind_of_start(start_at, expected):
    sched = _schedule(1000)
    if expected is None:
        with pytest.raises(ConfigError, match="phases must start in order"):
            mx.resolve_phases(_recipe_phases(start_at), ["gb", "qa"], sched, 8, 128)
        return
    phases = mx.resolve_phases(_recipe_phases(start_at), ["gb", "qa"], sched, 8, 128)
    assert phases[1].start_step == expected


def test_three_phases_and_config_dict_phases():
    cfg = default_config()
    cfg.data.phases = (
        {"weights": {"a": 1}},
        {"weights": {"a": 1, "b": 1}, "start_at": {"fraction": 0.3}},
        {"weights": {"b": 2, "c": 2}, "start_at": {"lr_ratio": 0.1}},
    )
    phases = mx.resolve_phases(cfg.data.phases, ["a", "b", "c"], _schedule(1000), 8, 128)
    assert [p.start_step for p in phases] == [0, 300, phases[2].start_step]
    assert phases[2].start_step > 712
    assert phases[2].weights == {"a": 0.0, "b": 0.5, "c": 0.5}
    assert [p.index for p in phases] == [0, 1, 2]


# ----------------------------------------------------------------------------- bad configs


BAD = [
    ((), r"^data\.phases: empty, expected at least one phase"),
    (
        ({"weights": {"gb": 1, "news": 1}},),
        r"^data\.phases\[0\]\.weights\.news: unknown source; known sources are: gb, qa",
    ),
    (
        ({"weights": {"gb": 1}}, {"weights": {"gb": 1, "qa": -0.5}, "start_at": {"step": 5}}),
        r"^data\.phases\[1\]\.weights\.qa: -0\.5, expected a weight >= 0$",
    ),
    (({"weights": {"gb": "x"}},), r"^data\.phases\[0\]\.weights\.gb: 'x', expected a weight >= 0"),
    (({"weights": {"gb": 0, "qa": 0.0}},), r"^data\.phases\[0\]\.weights: all weights are 0"),
    (({"weights": {}},), r"^data\.phases\[0\]\.weights: \{\}, expected a dict"),
    (({"weight": {"gb": 1}},), r"^data\.phases\[0\]\.weight: unknown key"),
    (("gb",), r"^data\.phases\[0\]: 'gb', expected a dict"),
    (
        ({"weights": {"gb": 1}, "start_at": {"step": 3}},),
        r"^data\.phases\[0\]\.start_at: .*first phase starts at step 0",
    ),
    (({"weights": {"gb": 1}}, {"weights": {"qa": 1}}), r"^data\.phases\[1\]\.start_at: missing"),
    (
        ({"weights": {"gb": 1}}, {"weights": {"qa": 1}, "start_at": {"lr_at_most": 1e-5}}),
        r"^data\.phases\[1\]\.start_at\.lr_at_most: unknown key, expected exactly one of step, fraction, tokens, lr, "
        r"lr_ratio",
    ),
    (
        ({"weights": {"gb": 1}}, {"weights": {"qa": 1}, "start_at": {"step": 5, "lr": 1e-5}}),
        r"^data\.phases\[1\]\.start_at: has step, lr; expected exactly one of",
    ),
    (
        ({"weights": {"gb": 1}}, {"weights": {"qa": 1}, "start_at": {"fraction": 1.5}}),
        r"^data\.phases\[1\]\.start_at\.fraction: 1\.5, expected a fraction of the run in \(0, 1\)",
    ),
    (
        ({"weights": {"gb": 1}}, {"weights": {"qa": 1}, "start_at": {"step": 2.5}}),
        r"^data\.phases\[1\]\.start_at\.step: 2\.5, expected an integer step >= 1",
    ),
    (
        ({"weights": {"gb": 1}}, {"weights": {"qa": 1}, "start_at": {"tokens": -1}}),
        r"^data\.phases\[1\]\.start_at\.tokens: -1, expected a value > 0",
    ),
    (
        ({"weights": {"gb": 1}}, {"weights": {"qa": 1}, "start_at": {"lr": "low"}}),
        r"^data\.phases\[1\]\.start_at\.lr: 'low', expected a number",
    ),
    (
        ({"weights": {"gb": 1}}, {"weights": {"qa": 1}, "start_at": {"lr": 1e-8}}),
        r"^data\.phases\[1\]\.start_at\.lr: 1e-08, the schedule never decays that far \(its lowest LR is 4\.5e-07\)",
    ),
    (
        ({"weights": {"gb": 1}}, {"weights": {"qa": 1}, "start_at": {"lr_ratio": 0.001}}),
        r"^data\.phases\[1\]\.start_at\.lr_ratio: 0\.001 \(LR 4\.5e-08 = .*never decays that far \(its lowest LR "
        r"is 4\.5e-07\)",
    ),
    (
        ({"weights": {"gb": 1}}, {"weights": {"qa": 1}, "start_at": {"step": 1000}}),
        r"^data\.phases\[1\]\.start_at\.step: 1000 resolves to step 1000, at or after the end of the run "
        r"\(train\.steps = 1000\)",
    ),
    (
        ({"weights": {"gb": 1}}, {"weights": {"qa": 1}, "start_at": {"tokens": 1e12}}),
        r"^data\.phases\[1\]\.start_at\.tokens: 1e\+12 resolves to step \d+, at or after the end of the run",
    ),
    (
        # lr_ratio 0.01 is the floor itself: reached only at step == steps, after the last step.
        ({"weights": {"gb": 1}}, {"weights": {"qa": 1}, "start_at": {"lr_ratio": 0.01}}),
        r"^data\.phases\[1\]\.start_at\.lr_ratio: 0\.01 .*resolves to step 1000, at or after the end",
    ),
    (
        (
            {"weights": {"gb": 1}},
            {"weights": {"qa": 1}, "start_at": {"lr_ratio": 0.2}},
            {"weights": {"gb": 1}, "start_at": {"fraction": 0.5}},
        ),
        r"^data\.phases\[2\]\.start_at\.fraction: 0\.5 resolves to step 500, at or before phase 1's start "
        r"\(step 712\); phases must start in order",
    ),
    (
        ({"weights": {"gb": 1}}, {"weights": {"qa": 1}, "start_at": {"step": 10}}, {"weights": {"gb": 1},
                                                                                    "start_at": {"step": 10}}),
        r"^data\.phases\[2\]\.start_at\.step: 10 resolves to step 10, at or before phase 1's start",
    ),
]


@pytest.mark.parametrize("phases, message", BAD)
def test_bad_phases_are_one_line_config_errors(phases, message):
    with pytest.raises(ConfigError, match=message) as info:
        mx.resolve_phases(phases, ["gb", "qa"], _schedule(1000), 8, 128)
    assert "\n" not in str(info.value)


def test_lr_ratio_needs_a_start_lr():
    cfg = default_config().schedule
    cfg.name = "warmup_cosine"
    cfg.warmup_steps = 10
    sched = schedules.build(cfg, 100, None)  # starts its warmup at 0
    with pytest.raises(ConfigError, match=r"^data\.phases\[1\]\.start_at\.lr_ratio: 0\.2, but schedule "
                                          r"'warmup_cosine' has no start_lr"):
        mx.resolve_phases(_recipe_phases({"lr_ratio": 0.2}), ["gb", "qa"], sched, 8, 128)
    # An absolute LR works there, and counts only from the peak on (not during the warmup).
    phases = mx.resolve_phases(_recipe_phases({"lr": 1e-4}), ["gb", "qa"], sched, 8, 128)
    assert phases[1].start_step > 10


def test_mixture_rejects_malformed_phase_lists():
    w = {"a": 1.0}
    with pytest.raises(ValueError, match="at least one phase"):
        mx.Mixture([], ["a"], 4)
    with pytest.raises(ValueError, match="must start at step 0"):
        mx.Mixture([mx.Phase(0, 3, w, None)], ["a"], 4)
    with pytest.raises(ValueError, match="must increase"):
        mx.Mixture([mx.Phase(0, 0, w, None), mx.Phase(1, 0, w, {"step": 0})], ["a"], 4)
    with pytest.raises(ValueError, match="all counts are 0"):
        mx.interleave([0, 0])
