"""Full-score estimators against their formulas and against the subset mean on simulated populations."""

from __future__ import annotations

import functools
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import expit

from evomerge.errors import ConfigError
from evomerge.fidelity.estimators import (
    ESTIMATORS,
    GmpIRTEstimator,
    MergeAwareEstimator,
    allocate,
    anchor_subset,
    build_estimator,
    pirt_blend,
)

# ----------------------------------------------------------------------------- simulations


def simulate_2pl(models: int, items: int, seed: int, dims: int = 2) -> np.ndarray:
    """0/1 answers of `models` models drawn from a known multidimensional 2PL."""
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal((models, dims))
    a = np.abs(rng.normal(1.0, 0.5, (items, dims)))
    b = rng.normal(0.0, 1.5, items)
    return (rng.random((models, items)) < expit(theta @ a.T - b)).astype(float)


def simulate_merges(endpoints: int, items: int, candidates: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(endpoint rows, candidate rows): sources are the base with ~20% of items flipped (mostly gained);
    a candidate answers each item like an endpoint drawn from its own Dirichlet mixture, plus 5% flips."""
    rng = np.random.default_rng(seed)
    base = (rng.random(items) < 0.55).astype(float)
    rows = [base]
    for _ in range(endpoints - 1):
        flip = rng.random(items) < 0.2 * rng.uniform(0.5, 1.5)
        gain = rng.random(items) < 0.7
        rows.append(np.where(flip & (base == 0) & gain, 1.0, np.where(flip & (base == 1) & ~gain, 0.0, base)))
    ends = np.stack(rows)
    mixtures = rng.dirichlet(np.full(endpoints, 0.5), size=candidates)
    cands = np.empty((candidates, items))
    for c, mix in enumerate(mixtures):
        picked = ends[rng.choice(endpoints, size=items, p=mix), np.arange(items)]
        cands[c] = np.where(rng.random(items) < 0.05, 1.0 - picked, picked)
    return ends, cands


def mean_abs_error(name: str, reference: np.ndarray, held_out: np.ndarray, n: int, seeds, **kw) -> float:
    """MAE of one method's estimates of the held-out rows' full means, over subset seeds."""
    errors = []
    for seed in seeds:
        est = build_estimator(name, reference, n, seed, **kw)
        errors += [abs(est.estimate(row[est.items]) - row.mean()) for row in held_out]
    return float(np.mean(errors))


@functools.cache
def small_reference() -> np.ndarray:
    """5 endpoint rows of 0/1 answers on 120 items: few distinct column patterns, like a real run."""
    ends, _ = simulate_merges(5, 120, 1, seed=3)
    return ends


@functools.cache
def built(name: str) -> object:
    return build_estimator(name, small_reference(), 15, seed=7)


# ----------------------------------------------------------------------------- every method


@pytest.mark.parametrize("name", ESTIMATORS)
def test_subset_is_n_distinct_sorted_positions_with_weights_summing_to_one(name):
    est = built(name)
    assert est.name == name and est.n_total == 120
    assert est.items.dtype == np.int64 and est.items.shape == (15,)
    assert np.all(np.diff(est.items) > 0) and est.items[0] >= 0 and est.items[-1] < 120
    assert est.weights.shape == (15,) and np.all(est.weights > 0)
    assert est.weights.sum() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_full_subset_gives_the_exact_full_mean(name):
    reference = small_reference()[:, :40]
    candidate = np.random.default_rng(0).random(40)
    est = build_estimator(name, reference, 40, seed=1)
    assert est.estimate(candidate[est.items]) == pytest.approx(candidate.mean(), abs=1e-12)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_same_seed_same_estimator_other_seed_other_items(name):
    first, again = (build_estimator(name, small_reference(), 15, seed=11) for _ in range(2))
    other = build_estimator(name, small_reference(), 15, seed=12)
    candidate = small_reference()[2]
    assert np.array_equal(first.items, again.items)
    assert first.estimate(candidate[first.items]) == again.estimate(candidate[again.items])
    assert not np.array_equal(first.items, other.items)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_estimator_survives_pickle_and_its_arrays_are_read_only(name):
    est = built(name)
    copy = pickle.loads(pickle.dumps(est))
    y = small_reference()[1][est.items]
    assert copy.estimate(y) == est.estimate(y)
    with pytest.raises(ValueError):
        est.items[0] = 3


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(ESTIMATORS),
    answers=st.lists(st.sampled_from([0.0, 1.0, 0.5, 0.25]), min_size=15, max_size=15),
)
def test_estimates_are_finite_and_in_unit_interval(name, answers):
    value = built(name).estimate(np.array(answers))
    assert np.isfinite(value) and 0.0 <= value <= 1.0


@pytest.mark.parametrize("name", ESTIMATORS)
@pytest.mark.parametrize("constant", [0.0, 1.0])
def test_all_wrong_or_all_right_subset_saturates_without_error(name, constant):
    """Unpenalized directions (gmp lambdas, logistic intercept) diverge here; the estimate must not."""
    value = built(name).estimate(np.full(15, constant))
    assert np.isfinite(value) and 0.0 <= value <= 1.0


def test_methods_without_anchors_share_the_random_subset():
    items = {name: built(name).items for name in ESTIMATORS if name != "anchor"}
    assert all(np.array_equal(v, items["mean"]) for v in items.values())


# ----------------------------------------------------------------------------- mean and blend


def test_mean_estimate_is_the_subset_mean():
    est = built("mean")
    y = np.random.default_rng(5).random(15)
    assert est.estimate(y) == pytest.approx(y.mean(), rel=1e-12)


def test_pirt_blend_weighs_observed_items_by_their_share():
    assert pirt_blend(0.5, np.array([1.0, 1.0, 0.0]), n_total=4) == pytest.approx(0.25 * 0.5 + 0.75 * 2 / 3)
    assert pirt_blend(0.3, np.array([]), n_total=7) == 0.3


# ----------------------------------------------------------------------------- anchor


@pytest.mark.parametrize(
    ("sizes", "n", "expected"),
    [
        ([50, 30, 20], 10, [5, 3, 2]),  # exact quotas
        ([1, 1, 98], 5, [1, 1, 3]),  # at least one per cluster, taken from the largest
        ([3, 3, 94], 50, [2, 1, 47]),  # largest remainder, ties to the first
        ([2, 2], 4, [2, 2]),  # capped by cluster size
        ([5, 1, 1], 7, [5, 1, 1]),
    ],
)
def test_allocate_is_proportional_by_largest_remainder(sizes, n, expected):
    assert allocate(np.array(sizes), n).tolist() == expected


@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=12),
    data=st.data(),
)
def test_allocate_sums_to_n_with_one_to_size_picks_per_cluster(sizes, data):
    n = data.draw(st.integers(len(sizes), sum(sizes)))
    picks = allocate(np.array(sizes), n)
    assert picks.sum() == n and np.all(picks >= 1) and np.all(picks <= np.array(sizes))


def three_pattern_reference() -> np.ndarray:
    """2 models x 30 items with only three column patterns: (1,1) x 15, (1,0) x 10, (0,0) x 5."""
    columns = [(1, 1)] * 15 + [(1, 0)] * 10 + [(0, 0)] * 5
    order = np.random.default_rng(0).permutation(30)
    return np.array(columns, dtype=float)[order].T


@pytest.mark.parametrize("n", [3, 4, 7, 12])
def test_anchor_stratifies_by_pattern_and_is_exact_on_reference_rows(n):
    reference = three_pattern_reference()
    items, weights = anchor_subset(reference, n, seed=4)
    patterns = {tuple(reference[:, i]) for i in items}
    assert len(items) == n == len(set(items.tolist())) and len(patterns) == 3
    assert weights.sum() == pytest.approx(1.0)
    est = build_estimator("anchor", reference, n, seed=4)
    for row in reference:  # constant inside each pattern, so the stratified estimate is exact
        assert est.estimate(row[est.items]) == pytest.approx(row.mean(), abs=1e-12)


def test_anchor_uses_kmeans_when_patterns_outnumber_n():
    reference = np.random.default_rng(2).random((6, 200))  # 200 distinct columns
    items, weights = anchor_subset(reference, 12, seed=0)
    assert len(set(items.tolist())) == 12 and weights.sum() == pytest.approx(1.0)
    assert not np.allclose(weights, 1 / 12)  # cluster shares, not uniform
    again, _ = anchor_subset(reference, 12, seed=0)
    assert np.array_equal(items, again)


# ----------------------------------------------------------------------------- IRT


@functools.cache
def population_2pl() -> tuple[np.ndarray, np.ndarray]:
    """60 reference models and 20 held-out models from one 2PL over 400 items."""
    answers = simulate_2pl(80, 400, seed=11)
    return answers[:60], answers[60:]


@pytest.mark.parametrize("name", ["irt", "gmp_irt"])
def test_irt_methods_beat_the_subset_mean_on_2pl_data(name):
    reference, held_out = population_2pl()
    seeds = range(4)
    irt = mean_abs_error(name, reference, held_out, 20, seeds)
    subset_mean = mean_abs_error("mean", reference, held_out, 20, seeds)
    assert irt < 0.93 * subset_mean, (irt, subset_mean)


def test_gmp_irt_with_delta_one_is_the_subset_mean():
    est = build_estimator("gmp_irt", small_reference(), 15, seed=7, delta=1.0)
    y = np.random.default_rng(8).random(15)
    assert est.estimate(y) == pytest.approx(y.mean(), rel=1e-12)


def test_gmp_irt_on_an_endpoint_row_is_near_that_rows_mean():
    ends, _ = simulate_merges(5, 600, 1, seed=10)
    errors, baseline = [], []
    for seed in range(3):
        est = build_estimator("gmp_irt", ends, 50, seed)
        assert isinstance(est, GmpIRTEstimator)
        errors += [abs(est.estimate(row[est.items]) - row.mean()) for row in ends]
        baseline += [abs(row[est.items].mean() - row.mean()) for row in ends]
    assert max(errors) < 0.08 and np.mean(errors) < np.mean(baseline), (errors, baseline)


def test_gmp_irt_endpoints_limit_the_span_to_the_leading_rows():
    est = build_estimator("gmp_irt", small_reference(), 15, seed=7, endpoints=2)
    assert est.endpoints == 2 and est.abilities.shape == (5, 2)


# ----------------------------------------------------------------------------- merge-aware


def test_merge_aware_on_a_reference_row_is_near_that_rows_mean():
    ends, _ = simulate_merges(5, 600, 1, seed=10)
    errors, baseline = [], []
    for seed in range(3):
        est = build_estimator("merge_aware", ends, 50, seed)
        assert isinstance(est, MergeAwareEstimator) and est.delta == 0.0
        errors += [abs(est.estimate(row[est.items]) - row.mean()) for row in ends]
        baseline += [abs(row[est.items].mean() - row.mean()) for row in ends]
    assert max(errors) < 0.06 and np.mean(errors) < np.mean(baseline), (errors, baseline)


def test_merge_aware_beats_the_subset_mean_on_a_merge_population():
    ends, candidates = simulate_merges(5, 600, 30, seed=12)
    seeds = range(4)
    merge_aware = mean_abs_error("merge_aware", ends, candidates, 20, seeds)
    subset_mean = mean_abs_error("mean", ends, candidates, 20, seeds)
    assert merge_aware < 0.8 * subset_mean, (merge_aware, subset_mean)


def test_merge_aware_with_a_huge_penalty_falls_back_to_the_subset_mean():
    """beta -> 0 leaves the unpenalized intercept, calibrated so that every p_i = mean_S y."""
    est = build_estimator("merge_aware", small_reference(), 15, seed=7, l2=1e9)
    y = small_reference()[3][est.items]
    assert est.estimate(y) == pytest.approx(y.mean(), abs=1e-5)


def test_merge_aware_with_delta_one_is_the_subset_mean():
    est = build_estimator("merge_aware", small_reference(), 15, seed=7, delta=1.0)
    y = np.random.default_rng(9).random(15)
    assert est.estimate(y) == pytest.approx(y.mean(), rel=1e-12)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "irtt"}, "unknown estimator 'irtt'. Did you mean 'irt'"),
        ({"n": 121}, r"n must be in \[1, 120\]"),
        ({"n": 0}, r"n must be in \[1, 120\]"),
        ({"n": 2.5}, "n must be an integer"),
        ({"reference": np.ones(120)}, "2-D"),
        ({"reference": np.full((5, 120), 2.0)}, r"in \[0, 1\]"),
        ({"reference": np.full((5, 120), np.nan)}, "NaN"),
        ({"delta": 1.5}, r"delta must be in \[0, 1\]"),
        ({"endpoints": 6}, r"endpoints must be in \[1, 5\]"),
        ({"dims": 0}, "dims must be >= 1"),
        ({"l2": 0.0}, "l2 must be"),
        ({"l2": "big"}, "l2 must be"),
        ({"delta": float("nan")}, r"delta must be in \[0, 1\]"),
        ({"seed": -1}, "seed must be >= 0"),
    ],
)
def test_bad_input_is_a_config_error(kwargs, match):
    args = {"name": "irt", "reference": small_reference(), "n": 10, "seed": 0} | kwargs
    with pytest.raises(ConfigError, match=match):
        build_estimator(args.pop("name"), args.pop("reference"), args.pop("n"), args.pop("seed"), **args)


def test_wrong_length_answers_are_a_value_error():
    with pytest.raises(ValueError, match="shape"):
        built("mean").estimate(np.zeros(14))
