"""Racing rules against their definitions: optuna's own pruners on the same values, scipy's Wilcoxon test,
the empirical-Bernstein formula, published Pocock constants, and simulated false-stop rates under the null."""

from __future__ import annotations

import time
import warnings

import numpy as np
import optuna
import pytest
from scipy import stats

from evomerge.fidelity import racing
from evomerge.fidelity.racing import (
    alpha_nominal,
    bernstein_upper_bound,
    halving_promotes,
    item_order,
    paired_worse,
    rung_sizes,
)

# ----------------------------------------------------------------------------- helpers


def optuna_halving_decisions(values: list[float], eta: int) -> list[bool]:
    """Promote/stop of optuna's SuccessiveHalvingPruner for trials reporting `values` in turn at rung 0.

    min_resource 1, rate 0: every trial reaches rung 0 at step 1 and competes with all earlier trials.
    """
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=eta)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    decisions = []
    for v in values:
        trial = study.ask()
        trial.report(v, step=1)
        pruned = trial.should_prune()
        decisions.append(not pruned)
        study.tell(
            trial, state=optuna.trial.TrialState.PRUNED if pruned else None, values=None if pruned else v
        )
    return decisions


def null_false_stop_rate(test: str, sizes: list[int], races: int, alpha: float, *, discrete: bool,
                         looks_for_level: int | None = None, seed: int = 0) -> float:  # fmt: skip
    """Share of races that stop a candidate exactly as good as the incumbent at some look (nested prefixes).

    discrete: paired 0/1 items, the two disagree on 30% of items, each way equally often; else U(-1, 1).
    looks_for_level: correct for this many looks instead (to show what no correction does).
    """
    rng = np.random.default_rng(seed)
    corrected = looks_for_level is None
    looks = len(sizes) if corrected else looks_for_level
    stops = 0
    for _ in range(races):
        if discrete:
            d = rng.choice([-1.0, 0.0, 1.0], size=sizes[-1], p=[0.15, 0.7, 0.15])
        else:
            d = rng.uniform(-1.0, 1.0, size=sizes[-1])
        for n in sizes:
            kw = {"sizes": sizes} if corrected else {}
            if paired_worse(d[:n], test=test, alpha=alpha, looks=looks, **kw):
                stops += 1
                break
    return stops / races


# ----------------------------------------------------------------------------- rung sizes, item order


def test_rung_sizes_caps_dedups_and_ends_with_full_task():
    assert rung_sizes([32, 96], 1000) == [32, 96, 1000]
    assert rung_sizes([32, 96], 50) == [32, 50]
    assert rung_sizes([32, 96], 96) == [32, 96]
    assert rung_sizes([32, 96], 20) == [20]
    assert rung_sizes([96, 32, 32], 100) == [32, 96, 100]
    assert rung_sizes([], 7) == [7]
    for bad_rungs, bad_n in (([0], 10), ([32], 0), ([2.5], 10)):
        with pytest.raises(ValueError):
            rung_sizes(bad_rungs, bad_n)


def test_item_order_is_a_deterministic_permutation_per_task_and_seed():
    order = item_order("gsm8k", 500, seed=0)
    assert sorted(order.tolist()) == list(range(500))
    assert np.array_equal(order, item_order("gsm8k", 500, seed=0))
    assert not np.array_equal(order, np.arange(500))
    assert not np.array_equal(order, item_order("arc", 500, seed=0))
    assert not np.array_equal(order, item_order("gsm8k", 500, seed=1))
    # sha256 of "0:gsm8k", not Python's salted hash(): pinned across processes and versions
    assert item_order("gsm8k", 10, seed=0).tolist() == item_order("gsm8k", 10, seed=0).tolist()
    assert len(item_order("t", 0, seed=0)) == 0


# ----------------------------------------------------------------------------- successive halving


def test_halving_promotes_the_top_third_of_nine_like_optuna():
    values = [0.31, 0.72, 0.55, 0.18, 0.64, 0.90, 0.42, 0.27, 0.80]
    promoted = [halving_promotes(np.array([v]), np.array([w for w in values if w != v]), 3) for v in values]
    assert sorted(v for v, p in zip(values, promoted) if p) == [0.72, 0.80, 0.90]  # floor(9 / 3) = 3
    for j, v in enumerate(values):  # optuna: the 8 rivals report first, then the candidate
        rivals = values[:j] + values[j + 1 :]
        assert optuna_halving_decisions([*rivals, v], eta=3)[-1] == promoted[j]


@pytest.mark.parametrize("eta", [2, 3, 4])
def test_halving_agrees_with_optuna_on_every_sequential_decision_with_ties(eta):
    rng = np.random.default_rng(eta)
    for _ in range(12):
        values = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], size=int(rng.integers(1, 25))).tolist()
        ours = [halving_promotes(np.array([v]), np.array(values[:i]), eta) for i, v in enumerate(values)]
        assert ours == optuna_halving_decisions(values, eta), values


def test_halving_with_few_rivals_promotes_only_the_best_so_far_like_optuna():
    # 2 rivals + candidate < eta = 4: optuna promotes iff the candidate is the best (ties pass)
    assert halving_promotes([0.5], [0.4, 0.5], 4)
    assert not halving_promotes([0.45], [0.4, 0.5], 4)
    assert halving_promotes([0.2], [], 3)
    assert halving_promotes([0.2, 0.1], np.empty((0, 2)), 3)


def test_halving_nan_candidate_stops_and_nan_rivals_are_ignored():
    assert not halving_promotes([np.nan], [0.1, 0.2], 3)
    assert halving_promotes([0.3], [np.nan, 0.2], 3)
    assert not halving_promotes([0.5, np.nan], [[0.1, 0.1]], 3)


def test_halving_multi_objective_stops_dominated_and_promotes_non_dominated():
    x = np.linspace(0.1, 0.9, 8)
    front = np.column_stack([x, 1 - x])  # 8 mutually non-dominated rivals
    assert not halving_promotes([0.2, 0.2], front, 3)  # dominated: 8 better points >= 3 promoted
    assert halving_promotes([0.55, 0.45], front, 3)  # on the front: nobody in a better front
    assert halving_promotes([0.3, 0.7], front, 3)  # a duplicate of a rival shares its front
    # second front behind 2 first-front points: 2 < floor(9 / 3) = 3 better ones -> promoted
    rivals = np.array([[0.9, 0.9], [0.95, 0.85], *[[0.1, 0.1]] * 6])
    assert halving_promotes([0.8, 0.8], rivals, 3)
    assert not halving_promotes([0.8, 0.8], np.vstack([rivals[:-1], [0.85, 0.95]]), 3)


def test_halving_multi_objective_reduces_to_optunas_rule_with_a_constant_objective():
    rng = np.random.default_rng(7)
    for _ in range(40):
        rivals = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], size=int(rng.integers(0, 15)))
        v = float(rng.choice([0.0, 0.25, 0.5, 0.75, 1.0]))
        with_constant = halving_promotes([v, 0.5], np.column_stack([rivals, np.full(len(rivals), 0.5)]), 3)
        assert with_constant == halving_promotes([v], rivals, 3)


def test_halving_rejects_bad_input():
    with pytest.raises(ValueError, match="eta"):
        halving_promotes([0.5], [0.1], 1.0)
    with pytest.raises(ValueError, match="rivals"):
        halving_promotes([0.5, 0.5], [[0.1, 0.2, 0.3]], 3)


# ----------------------------------------------------------------------------- repeated looks


def test_pocock_level_is_at_most_alpha_decreasing_and_above_bonferroni():
    for alpha in (0.05, 0.1, 0.2):
        levels = [alpha_nominal(alpha, k) for k in range(1, 6)]
        assert levels[0] == alpha
        assert all(b < a for a, b in zip(levels, levels[1:]))
        assert all(level > alpha / k for k, level in enumerate(levels, start=1) if k > 1)
    assert [round(alpha_nominal(0.1, k), 4) for k in (1, 2, 3, 4)] == [0.1, 0.0634, 0.0494, 0.0418]


def test_pocock_constants_match_published_table():
    # Jennison & Turnbull (2000) Table 2.1, Pocock C_P for two-sided 0.05 == one-sided 0.025 to 3 decimals
    for looks, c in ((2, 2.178), (3, 2.289), (4, 2.361), (5, 2.413)):
        assert stats.norm.isf(alpha_nominal(0.025, looks)) == pytest.approx(c, abs=2e-3)


def test_pocock_unequal_looks_match_multivariate_normal_and_brownian_simulation():
    sizes = [32, 96, 1000]
    level = alpha_nominal(0.1, 3, sizes)
    c = stats.norm.isf(level)
    t = np.array(sizes, dtype=float)
    cov = np.sqrt(np.minimum.outer(t, t) / np.maximum.outer(t, t))
    mvn = stats.multivariate_normal.cdf(
        np.full(3, c), mean=np.zeros(3), cov=cov, rng=np.random.default_rng(0)
    )
    assert 1 - mvn == pytest.approx(0.1, abs=5e-4)
    # Brownian motion observed at the looks: P(any standardized value > c) ~ alpha
    rng = np.random.default_rng(1)
    w = np.cumsum(rng.standard_normal((200_000, 3)) * np.sqrt(np.diff(t, prepend=0.0)), axis=1)
    assert (w / np.sqrt(t) > c).any(axis=1).mean() == pytest.approx(0.1, abs=0.003)
    assert level < alpha_nominal(0.1, 3)  # less correlated looks need a smaller level


def test_alpha_nominal_rejects_bad_input():
    for kwargs in ({"alpha": 0.0, "looks": 2}, {"alpha": 0.1, "looks": 0}, {"alpha": 0.1, "looks": 2, "sizes": [5]},
                   {"alpha": 0.1, "looks": 2, "sizes": [9, 5]}):  # fmt: skip
        with pytest.raises(ValueError):
            alpha_nominal(**kwargs)


# ----------------------------------------------------------------------------- wilcoxon


def paired_items(n: int, p_incumbent: float, p_candidate: float, seed: int) -> np.ndarray:
    """diffs of two 0/1 score vectors sharing a latent item difficulty (so most items agree)."""
    u = np.random.default_rng(seed).random(n)
    return (u < p_candidate).astype(float) - (u < p_incumbent).astype(float)


def test_wilcoxon_stops_a_clearly_worse_candidate_only():
    worse = paired_items(300, 0.7, 0.4, seed=0)
    assert paired_worse(worse, test="wilcoxon", alpha=0.1, looks=3)
    assert not paired_worse(-worse, test="wilcoxon", alpha=0.1, looks=3)  # better
    assert not paired_worse(np.zeros(300), test="wilcoxon", alpha=0.1, looks=3)  # identical
    assert not paired_worse(worse[:1], test="wilcoxon", alpha=0.1, looks=3)  # < 2 items


def test_wilcoxon_never_stops_when_the_mean_is_not_below_the_incumbents():
    # many small losses, a few large wins: the signed-rank test says "worse", the mean says otherwise
    diffs = np.array([-0.1] * 30 + [1.0] * 4)
    assert stats.wilcoxon(diffs, alternative="less", zero_method="zsplit").pvalue < 0.01
    assert not paired_worse(diffs, test="wilcoxon", alpha=0.1, looks=1)
    assert not racing._wilcoxon_worse(diffs, 0.1)  # optuna's own safety rule, without our shortcut
    rng = np.random.default_rng(3)
    for _ in range(100):
        d = rng.choice([-1.0, 0.0, 1.0], size=int(rng.integers(2, 200)))
        if d.sum() >= 0:
            assert not paired_worse(d, test="wilcoxon", alpha=0.5, looks=1)


def test_wilcoxon_agrees_with_scipy_zsplit_one_sided():
    rng = np.random.default_rng(11)
    outcomes = []
    for i in range(150):
        n = int(rng.integers(2, 400))
        looks = int(rng.integers(1, 5))
        if i % 3 == 0:
            d = rng.normal(-0.1, 1.0, n)
        elif i % 3 == 1:
            d = paired_items(n, 0.6, 0.6 - rng.uniform(0, 0.2), seed=i)
        else:
            d = np.round(rng.normal(-0.2, 1.0, n), 1)  # ties and zeros
        level = alpha_nominal(0.1, looks)
        p = stats.wilcoxon(d, alternative="less", zero_method="zsplit").pvalue if d.any() else 1.0
        expected = bool(d.sum() < 0 and p < level)
        assert paired_worse(d, test="wilcoxon", alpha=0.1, looks=looks) == expected, (i, n, p, level)
        outcomes.append(expected)
    assert 20 < sum(outcomes) < 130  # both answers were exercised


def test_wilcoxon_is_quiet_and_cheap(capfd):
    d = paired_items(3000, 0.55, 0.5, seed=1)
    verbosity = optuna.logging.get_verbosity()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        racing._wilcoxon_pruner.cache_clear()
        paired_worse(d, test="wilcoxon", alpha=0.1, looks=3)
    assert caught == []
    assert capfd.readouterr().err == ""
    assert optuna.logging.get_verbosity() == verbosity
    times = []
    for _ in range(5):
        start = time.perf_counter()
        racing._wilcoxon_worse(d, 0.05)
        times.append(time.perf_counter() - start)
    assert np.median(times) < 0.05


def test_wilcoxon_false_stop_rate_under_the_null_is_at_most_alpha():
    sizes = [32, 96, 300]
    # realistic paired 0/1 items: zsplit makes the test conservative
    assert null_false_stop_rate("wilcoxon", sizes, 600, 0.1, discrete=True) <= 0.1
    # continuous differences: the corrected level is near-exact (20,000 races with scipy: 0.0975), so allow
    # 3 standard errors of a 600-race estimate
    assert null_false_stop_rate("wilcoxon", sizes, 600, 0.1, discrete=False) <= 0.1 + 3 * np.sqrt(0.09 / 600)
    # uncorrected, the same three looks stop far more often than alpha: the check can see inflation
    assert null_false_stop_rate("wilcoxon", sizes, 600, 0.1, discrete=False, looks_for_level=1) > 0.13


# ----------------------------------------------------------------------------- bernstein


def test_bernstein_bound_is_the_documented_formula():
    d = np.array([-1.0, 0.0, 0.0, -1.0, 1.0, 0.0, -1.0, 0.0])
    delta, t = 0.05, len(d)
    m, v = d.mean(), np.mean((d - d.mean()) ** 2)
    x = np.log(3 / delta)
    hand = m + np.sqrt(2 * v * x / t) + 3 * 2.0 * x / t
    assert bernstein_upper_bound(d, delta) == pytest.approx(hand, rel=1e-12)
    assert bernstein_upper_bound(2 * d, delta, value_range=2.0) == pytest.approx(2 * hand, rel=1e-12)


def test_bernstein_worse_iff_upper_bound_below_zero():
    rng = np.random.default_rng(5)
    seen = set()
    for i in range(200):
        n = int(rng.integers(2, 600))
        d = paired_items(n, 0.7, 0.7 - rng.uniform(0, 0.4), seed=i)
        looks = int(rng.integers(1, 4))
        expected = bool(d.any()) and bernstein_upper_bound(d, alpha_nominal(0.1, looks)) < 0
        assert paired_worse(d, test="bernstein", alpha=0.1, looks=looks) == expected
        seen.add(expected)
    assert seen == {True, False}
    worse = paired_items(300, 0.7, 0.4, seed=0)
    assert paired_worse(worse, test="bernstein", alpha=0.1, looks=3)
    assert not paired_worse(worse[:30], test="bernstein", alpha=0.1, looks=3)  # too few items yet
    assert not paired_worse(-worse, test="bernstein", alpha=0.1, looks=3)
    assert not paired_worse(np.zeros(300), test="bernstein", alpha=0.1, looks=3)


def test_bernstein_false_stop_rate_under_the_null_is_at_most_alpha():
    for discrete in (True, False):
        assert null_false_stop_rate("bernstein", [32, 96, 300], 2000, 0.1, discrete=discrete) <= 0.1


def test_paired_worse_rejects_bad_input():
    with pytest.raises(ValueError, match="test"):
        paired_worse(np.zeros(5), test="ttest", alpha=0.1, looks=1)
    with pytest.raises(ValueError, match="diffs"):
        paired_worse(np.array([0.1, np.nan]), test="wilcoxon", alpha=0.1, looks=1)
    with pytest.raises(ValueError, match="diffs"):
        paired_worse(np.array([-1.5, 0.0, 0.2]), test="bernstein", alpha=0.1, looks=1)
