"""Gateway aggregation rules, checked against independent computations of what each rule should give."""

from __future__ import annotations

import contextlib
import itertools
import math
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gossipfl.errors import AggregationError, ConfigError
from gossipfl.learning import aggregate as agg
from gossipfl.learning.aggregate import AggregatorConfig, ClientUpdate, aggregate, staleness_weight, trim_count

RULES = ["mean", "fedavgm", "trimmed_mean", "median"]


def small_chunks(enabled: bool = True):
    """Shrink the column chunks so that short test vectors cross several chunk boundaries."""
    if not enabled:
        return contextlib.nullcontext()
    return mock.patch.multiple(agg, _MEAN_CHUNK=5, _STACK_ELEMS=8, _MIN_CHUNK=3)


@st.composite
def rounds(draw, min_n: int = 1, max_n: int = 7, max_dim: int = 40):
    n = draw(st.integers(min_n, max_n))
    dim = draw(st.integers(1, max_dim))
    values = st.floats(-1e3, 1e3, width=32, allow_subnormal=False)
    deltas = [draw(hnp.arrays(np.float32, dim, elements=values)) for _ in range(n)]
    samples = draw(st.lists(st.integers(1, 10_000), min_size=n, max_size=n))
    return [ClientUpdate(d, s) for d, s in zip(deltas, samples, strict=True)]


def stacked(updates):
    return np.stack([u.delta for u in updates]).astype(np.float64)


# --- the rules agree with independent computations -------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(rounds(), st.booleans())
def test_mean_is_the_sample_weighted_average(updates, tiny_chunks):
    with small_chunks(tiny_chunks):
        res = aggregate(AggregatorConfig(rule="mean"), updates)
    weights = np.array([u.samples for u in updates], np.float64)
    expected = (weights[:, None] * stacked(updates)).sum(axis=0) / weights.sum()
    assert res.delta.dtype == np.float32 and res.delta.shape == updates[0].delta.shape
    np.testing.assert_allclose(res.delta, expected, rtol=1e-5, atol=1e-3)
    assert res.participants == len(updates) and res.samples == int(weights.sum())
    assert res.momentum is None and res.clipped == 0 and res.clip_threshold is None
    np.testing.assert_allclose(res.norms, np.linalg.norm(stacked(updates), axis=1), rtol=1e-9)
    assert res.aggregate_norm == pytest.approx(float(np.linalg.norm(res.delta.astype(np.float64))), rel=1e-9)


@settings(max_examples=150, deadline=None)
@given(rounds(), st.sampled_from([0.0, 0.1, 0.2, 0.34, 0.49]), st.booleans())
def test_trimmed_mean_drops_the_extremes_of_every_coordinate(updates, fraction, tiny_chunks):
    with small_chunks(tiny_chunks):
        res = aggregate(AggregatorConfig(rule="trimmed_mean", trim_fraction=fraction), updates)
    n = len(updates)
    k = trim_count(n, fraction)
    expected = np.sort(stacked(updates), axis=0)[k : n - k].mean(axis=0)
    assert res.trimmed == k
    np.testing.assert_allclose(res.delta, expected, rtol=1e-5, atol=1e-3)


@settings(max_examples=150, deadline=None)
@given(rounds(), st.booleans())
def test_median_is_the_coordinate_wise_median(updates, tiny_chunks):
    with small_chunks(tiny_chunks):
        res = aggregate(AggregatorConfig(rule="median"), updates)
    np.testing.assert_allclose(res.delta, np.median(stacked(updates), axis=0), rtol=1e-6, atol=1e-4)
    assert res.trimmed == 0


@settings(max_examples=100, deadline=None)
@given(
    hnp.arrays(np.float32, st.integers(1, 30), elements=st.floats(-100, 100, width=32)),
    st.integers(1, 7),
    st.lists(st.integers(1, 1000), min_size=7, max_size=7),
    st.sampled_from(RULES),
)
def test_identical_updates_aggregate_to_themselves(delta, n, samples, rule):
    updates = [ClientUpdate(delta.copy(), samples[i]) for i in range(n)]
    # clip_factor 1 bounds each update by the median norm, which identical updates all equal
    res = aggregate(AggregatorConfig(rule=rule, clip_factor=1.0), updates)
    np.testing.assert_allclose(res.delta, delta, rtol=1e-6, atol=1e-6)
    assert res.clipped == 0


def test_server_lr_scales_the_step():
    rng = np.random.default_rng(0)
    updates = [ClientUpdate(rng.normal(size=50).astype(np.float32), s) for s in (1, 2, 3)]
    for rule in ("mean", "trimmed_mean", "median"):
        one = aggregate(AggregatorConfig(rule=rule), updates)
        half = aggregate(AggregatorConfig(rule=rule, server_lr=0.5), updates)
        np.testing.assert_allclose(half.delta, 0.5 * one.delta, rtol=1e-6)
        assert half.aggregate_norm == pytest.approx(0.5 * one.aggregate_norm, rel=1e-6)


@pytest.mark.parametrize("rule", RULES)
def test_inputs_are_not_modified(rule):
    rng = np.random.default_rng(1)
    deltas = [rng.normal(size=3000).astype(np.float32) for _ in range(5)]
    deltas[2] *= 50
    copies = [d.copy() for d in deltas]
    state = rng.normal(size=3000).astype(np.float32) if rule == "fedavgm" else None
    state_copy = None if state is None else state.copy()
    cfg = AggregatorConfig(rule=rule, clip_factor=1.5, staleness="discount")
    with small_chunks():
        aggregate(cfg, [ClientUpdate(d, 10, staleness=i) for i, d in enumerate(deltas)], state)
    for d, c in zip(deltas, copies, strict=True):
        assert np.array_equal(d, c)
    if state is not None:
        assert np.array_equal(state, state_copy)


# --- robustness: one poisoned update -----------------------------------------------------------------


def poisoned_round(seed: int = 0):
    """Four honest clients near a common direction, and a fifth sending 100x an honest update."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=2000)
    honest = [(base + rng.normal(0, 0.1, base.size)).astype(np.float32) for _ in range(4)]
    attacker = (100 * (base + rng.normal(0, 0.1, base.size))).astype(np.float32)
    return honest, [ClientUpdate(d, 100) for d in [*honest, attacker]]


@pytest.mark.parametrize("rule", ["trimmed_mean", "median"])
def test_robust_rules_stay_within_the_honest_range_while_the_mean_does_not(rule):
    honest, updates = poisoned_round()
    lo, hi = np.min(honest, axis=0), np.max(honest, axis=0)
    robust = aggregate(AggregatorConfig(rule=rule, trim_fraction=0.2), updates).delta
    mean = aggregate(AggregatorConfig(rule="mean"), updates).delta
    assert np.all((robust >= lo) & (robust <= hi)), "every coordinate within the honest clients' range"
    outside = np.mean((mean < lo) | (mean > hi))
    assert outside > 0.95, f"the plain mean left the honest range on only {outside:.0%} of coordinates"
    honest_mean = np.mean(honest, axis=0)
    assert np.linalg.norm(mean - honest_mean) > 50 * np.linalg.norm(robust - honest_mean)


def test_robust_rules_ignore_claimed_sample_counts():
    _, updates = poisoned_round(1)
    shifted = [ClientUpdate(u.delta, 10**9 if i == 4 else u.samples) for i, u in enumerate(updates)]
    for rule in ("trimmed_mean", "median"):
        a = aggregate(AggregatorConfig(rule=rule), updates).delta
        b = aggregate(AggregatorConfig(rule=rule), shifted).delta
        assert np.array_equal(a, b)
    # while the weighted mean hands the round to whoever claims the most samples
    mean = aggregate(AggregatorConfig(rule="mean"), shifted).delta
    np.testing.assert_allclose(mean, updates[4].delta, rtol=1e-5)


def test_trim_count_rule():
    assert trim_count(10, 0.2) == 2
    assert trim_count(3, 0.1) == 1, "at least one from each end once there are 3 updates"
    assert trim_count(5, 0.05) == 1
    assert trim_count(2, 0.4) == 0, "nothing can be trimmed from both ends of 2"
    assert trim_count(9, 0.0) == 0
    assert trim_count(5, 0.49) == 2
    for n in range(1, 60):
        for f in (0.01, 0.1, 0.25, 0.4, 0.499):
            assert n - 2 * trim_count(n, f) >= 1


# --- clipping ----------------------------------------------------------------------------------------


def with_norm(vec: np.ndarray, norm: float) -> np.ndarray:
    return (vec / np.linalg.norm(vec) * norm).astype(np.float32)


def test_clip_norm_caps_each_update_before_averaging():
    rng = np.random.default_rng(2)
    raw = [with_norm(rng.normal(size=100), n) for n in (1.0, 2.0, 10.0)]
    updates = [ClientUpdate(d, s) for d, s in zip(raw, (1, 2, 3), strict=True)]
    res = aggregate(AggregatorConfig(rule="mean", clip_norm=3.0), updates)
    assert res.clipped == 1 and res.clip_threshold == 3.0
    np.testing.assert_allclose(res.norms, [1.0, 2.0, 10.0], rtol=1e-5)  # norms before clipping
    capped = [raw[0], raw[1], raw[2] * 0.3]
    expected = (1 * capped[0] + 2 * capped[1] + 3 * capped[2]) / 6
    np.testing.assert_allclose(res.delta, expected, rtol=1e-5, atol=1e-7)
    single = aggregate(AggregatorConfig(rule="median", clip_norm=3.0), [updates[2]])
    assert single.aggregate_norm == pytest.approx(3.0, rel=1e-5)


def test_clip_factor_uses_the_median_norm_of_the_round():
    rng = np.random.default_rng(3)
    raw = [with_norm(rng.normal(size=100), n) for n in (1.0, 2.0, 3.0, 4.0, 100.0)]
    updates = [ClientUpdate(d, 1) for d in raw]
    res = aggregate(AggregatorConfig(rule="mean", clip_factor=2.0), updates)
    assert res.clip_threshold == pytest.approx(6.0, rel=1e-5) and res.clipped == 1
    expected = (sum(raw[:4]) + raw[4] * (6.0 / 100.0)) / 5
    np.testing.assert_allclose(res.delta, expected, rtol=1e-5, atol=1e-6)
    # when an absolute bound is also set, the smaller bound applies
    both = aggregate(AggregatorConfig(rule="mean", clip_factor=2.0, clip_norm=2.5), updates)
    assert both.clip_threshold == 2.5 and both.clipped == 3
    unclipped = aggregate(AggregatorConfig(rule="mean"), updates)
    assert unclipped.aggregate_norm > 3 * res.aggregate_norm


# --- server momentum ---------------------------------------------------------------------------------


def test_fedavgm_momentum_accumulates_across_rounds():
    rng = np.random.default_rng(4)
    cfg = AggregatorConfig(rule="fedavgm", server_lr=0.5, server_momentum=0.9)
    r1 = [ClientUpdate(rng.normal(size=300).astype(np.float32), s) for s in (10, 30)]
    r2 = [ClientUpdate(rng.normal(size=300).astype(np.float32), s) for s in (5, 15, 20)]
    d1 = aggregate(AggregatorConfig(rule="mean"), r1).delta.astype(np.float64)
    d2 = aggregate(AggregatorConfig(rule="mean"), r2).delta.astype(np.float64)

    first = aggregate(cfg, r1)
    np.testing.assert_allclose(first.momentum, d1, rtol=1e-6)  # m1 = 0.9 * 0 + d1
    np.testing.assert_allclose(first.delta, 0.5 * d1, rtol=1e-6)
    second = aggregate(cfg, r2, first.momentum)
    m2 = 0.9 * d1 + d2
    np.testing.assert_allclose(second.momentum, m2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(second.delta, 0.5 * m2, rtol=1e-5, atol=1e-6)
    assert second.momentum is not first.momentum and second.delta is not second.momentum
    # without momentum the second step would be 0.5 * d2 alone
    assert np.linalg.norm(second.delta - 0.5 * d2) > 0.1 * np.linalg.norm(d1)


# --- staleness ---------------------------------------------------------------------------------------


def test_staleness_weights_decrease():
    weights = [staleness_weight(t) for t in range(200)]
    assert weights[0] == 1.0 and weights[3] == 0.5
    assert all(a > b for a, b in itertools.pairwise(weights))
    assert all(w == pytest.approx(1 / math.sqrt(1 + t)) for t, w in enumerate(weights))
    with pytest.raises(AggregationError, match="staleness"):
        staleness_weight(-1)


def test_discount_shrinks_stale_updates_and_drop_policy_ignores_staleness():
    rng = np.random.default_rng(5)
    fresh, stale = (rng.normal(size=64).astype(np.float32) for _ in range(2))
    updates = [ClientUpdate(fresh, 10, staleness=0), ClientUpdate(stale, 30, staleness=3)]
    got = aggregate(AggregatorConfig(rule="mean", staleness="discount"), updates).delta
    # FedBuff: the stale delta is scaled by s(3) = 0.5, and the mean still divides by all samples
    np.testing.assert_allclose(got, (10 * fresh + 30 * 0.5 * stale) / 40, rtol=1e-5, atol=1e-6)
    kept = aggregate(AggregatorConfig(rule="mean", staleness="drop"), updates).delta
    np.testing.assert_allclose(kept, (10 * fresh + 30 * stale) / 40, rtol=1e-5, atol=1e-6)
    only_stale = aggregate(AggregatorConfig(rule="median", staleness="discount"), [updates[1]]).delta
    np.testing.assert_allclose(only_stale, 0.5 * stale, rtol=1e-6)


# --- refusals ----------------------------------------------------------------------------------------


def vec(n: int = 8, value: float = 0.5) -> np.ndarray:
    return np.full(n, value, np.float32)


def nan_at(i: int) -> np.ndarray:
    v = vec(1000)
    v[i] = np.nan
    return v


@pytest.mark.parametrize(
    ("updates", "match"),
    [
        ([], "no client updates"),
        ([ClientUpdate(vec(8), 1), ClientUpdate(vec(9), 1)], "update 1: delta has 9 values but update 0 has 8"),
        ([ClientUpdate(vec(1000), 1), ClientUpdate(nan_at(777), 1)], "update 1: delta holds non-finite"),
        ([ClientUpdate(np.array([1.0, np.inf], np.float32), 1)], "update 0: delta holds non-finite"),
        ([ClientUpdate(vec(), 1), ClientUpdate(vec(), 0)], "update 1: samples must be a whole number > 0, got 0"),
        ([ClientUpdate(vec(), -3)], "update 0: samples .* got -3"),
        ([ClientUpdate(vec(), 2.5)], "update 0: samples .* got 2.5"),
        ([ClientUpdate(vec(), 1, staleness=-1)], "update 0: staleness .* got -1"),
        ([ClientUpdate(vec().astype(np.float64), 1)], "update 0: delta must be float32, got float64"),
        ([ClientUpdate(vec().reshape(2, 4), 1)], r"update 0: delta must be 1-D, got shape \(2, 4\)"),
        ([ClientUpdate(vec(0), 1)], "update 0: delta is empty"),
        ([ClientUpdate([0.5, 0.5], 1)], "update 0: delta must be a numpy array"),
    ],
)
@pytest.mark.parametrize("rule", RULES)
def test_bad_updates_are_refused_by_name(updates, match, rule):
    with pytest.raises(AggregationError, match=match):
        aggregate(AggregatorConfig(rule=rule), updates)


def test_bad_momentum_state_is_refused():
    updates = [ClientUpdate(vec(), 1)]
    with pytest.raises(AggregationError, match="momentum_state must be a float32 vector of 8 values"):
        aggregate(AggregatorConfig(rule="fedavgm"), updates, np.zeros(9, np.float32))
    with pytest.raises(AggregationError, match="momentum_state must be a float32"):
        aggregate(AggregatorConfig(rule="fedavgm"), updates, np.zeros(8, np.float64))
    with pytest.raises(AggregationError, match="only used by rule 'fedavgm', not 'mean'"):
        aggregate(AggregatorConfig(rule="mean"), updates, np.zeros(8, np.float32))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rule": "krum"}, "fedavg.rule: must be one of mean, fedavgm, trimmed_mean, median, got 'krum'"),
        ({"staleness": "ignore"}, "fedavg.staleness: must be one of drop, discount"),
        ({"clip_norm": 0.0}, "fedavg.clip_norm: must be a finite number > 0"),
        ({"clip_norm": float("inf")}, "fedavg.clip_norm"),
        ({"clip_factor": -1.0}, "fedavg.clip_factor"),
        ({"clip_factor": float("nan")}, "fedavg.clip_factor"),
        ({"trim_fraction": 0.5}, r"fedavg.trim_fraction: must be in \[0, 0.5\), got 0.5"),
        ({"trim_fraction": -0.1}, "fedavg.trim_fraction"),
        ({"server_lr": 0.0}, "fedavg.server_lr: must be a finite number > 0"),
        ({"server_momentum": 1.0}, r"fedavg.server_momentum: must be in \[0, 1\)"),
        ({"server_momentum": "0.9"}, "fedavg.server_momentum"),
    ],
)
def test_bad_config_is_refused_naming_the_field(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        AggregatorConfig(**kwargs)
