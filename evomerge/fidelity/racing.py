"""Racing rules: stop a candidate at a rung of nested item prefixes when it cannot beat the bar.

Every candidate visits a task's items in one fixed, seeded, shuffled order (`item_order`), scored on
nested prefixes (`rung_sizes`, e.g. 32 -> 96 -> all), so promoting a candidate costs only the extra items
and every comparison to another candidate is paired. After each rung the driver asks two pure questions:

- `halving_promotes`: is the candidate in the top 1/eta of the reference candidates at this rung
  (optuna's successive-halving rule; non-dominated sorting for several objectives)?
- `paired_worse`: do the per-item differences to the incumbent show, at a level corrected for the repeated
  looks (`alpha_nominal`, Pocock), that the candidate is worse (Wilcoxon through optuna's WilcoxonPruner,
  or an empirical-Bernstein bound)?

Objectives are maximized; per-item scores lie in [0, 1]. Pure functions, no state, no logging of our own:
which candidates are compared and what is journaled is the caller's business (docs: CHEAP_FITNESS.md 3).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from scipy import optimize, stats

from evomerge.pareto import non_dominated_sort

TESTS = ("wilcoxon", "bernstein")

# Grid points per look in the Pocock recursion; 400 gives the boundary to ~1e-5 (checked against
# Jennison & Turnbull's table and scipy's multivariate normal cdf).
_POCOCK_GRID = 400
_POCOCK_SPAN = 10.0  # the grid covers 10 standard deviations below the boundary


# ----------------------------------------------------------------------------- item order and rungs


def rung_sizes(rungs: Sequence[int], n_items: int) -> list[int]:
    """The nested prefix sizes for a task of n_items: each configured rung capped at n_items, duplicates dropped,
    and the full task (n_items) always the last rung.

    Sorted ascending, so a small task simply has fewer rungs (rungs [32, 96] on 50 items: [32, 50]).
    """
    if isinstance(n_items, bool) or int(n_items) != n_items or n_items < 1:
        raise ValueError(f"n_items: must be a positive integer, got {n_items!r}")
    bad = [r for r in rungs if isinstance(r, bool) or int(r) != r or r < 1]
    if bad:
        raise ValueError(f"rungs: must be positive integers, got {list(rungs)}")
    return sorted({min(int(r), int(n_items)) for r in rungs} | {int(n_items)})


def item_order(task: str, n_items: int, seed: int) -> np.ndarray:
    """One fixed, seeded, shuffled order of a task's items shared by every candidate: a permutation of
    range(n_items) from numpy's default_rng seeded by sha256(f"{seed}:{task}").

    A stable hash (not Python's salted `hash()`) keeps the order the same across processes and resumes;
    prefixes of a shuffled order are uniform random subsets, unlike lm-eval's `limit` on a sorted data set.
    """
    if isinstance(n_items, bool) or int(n_items) != n_items or n_items < 0:
        raise ValueError(f"n_items: must be a non-negative integer, got {n_items!r}")
    digest = hashlib.sha256(f"{seed}:{task}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest, "big")).permutation(int(n_items))


# ----------------------------------------------------------------------------- successive halving


def _n_promoted(n_competing: int, eta: float) -> int:
    """How many of n competitors (candidate included) optuna's SuccessiveHalvingPruner promotes.

    `_is_trial_promotable_to_next_rung`: index n // eta - 1, raised to 0 when fewer than eta compete
    (optuna cannot pause trials, so the first ones pass if they are the best so far).
    """
    return max(int(n_competing // eta), 1)


def _n_in_better_fronts(value: np.ndarray, rivals: np.ndarray) -> int:
    """Rivals in Pareto fronts strictly better than the candidate's.

    Exact duplicates share a front here (pareto.non_dominated_sort would push later copies back), so a
    rival equal to the candidate never counts as better: the multi-objective analogue of optuna's `>=`.
    With one objective this is the number of rivals with a strictly larger value.
    """
    points = np.vstack([value[None, :], rivals])
    unique, inverse = np.unique(points, axis=0, return_inverse=True)
    front_of = np.empty(len(unique), dtype=int)
    for rank, front in enumerate(non_dominated_sort(unique)):
        front_of[front] = rank
    ranks = front_of[np.ravel(inverse)]
    return int(np.sum(ranks[1:] < ranks[0]))


def _as_halving_input(value: Any, rivals: Any) -> tuple[np.ndarray, np.ndarray]:
    v = np.atleast_1d(np.asarray(value, dtype=np.float64))
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"value: expected an objective vector of shape (k,), got shape {v.shape}")
    r = np.asarray(rivals, dtype=np.float64)
    if r.size == 0:
        r = r.reshape(0, v.size)
    elif r.ndim == 1 and v.size == 1:
        r = r[:, None]
    if r.ndim != 2 or r.shape[1] != v.size:
        raise ValueError(f"rivals: expected shape (m, {v.size}) to match value, got shape {r.shape}")
    return v, r


def halving_promotes(value: np.ndarray, rivals: np.ndarray, eta: float) -> bool:
    """Successive halving at one rung: is the candidate in the top 1/eta of rivals + itself?

    value: the candidate's objective vector (k,); rivals: (m, k), the reference candidates' values at the
    same rung. With n = m + 1 competitors, n_promoted = max(floor(n / eta), 1).

    Single objective: optuna's SuccessiveHalvingPruner rule, `_is_trial_promotable_to_next_rung` in
    optuna/pruners/_successive_halving.py (optuna 5.1): promote iff value >= the n_promoted-th largest
    competing value. Ties therefore promote (all tied candidates at the cut pass), and with fewer than eta
    competitors the candidate passes only if it is the best so far (ties included). No rivals: promote.
    Multi-objective: rank by non-dominated sorting (duplicates share a front); promote iff fewer than
    n_promoted rivals lie in fronts strictly better than the candidate's. With k == 1 this is the same
    rule, since value >= the n-th largest iff fewer than n values are strictly larger.

    NaN, as in optuna: a NaN candidate stops; NaN rivals are dropped (optuna never records them at a rung).
    Multi-objective values must otherwise be finite (pareto's check).
    """
    if not (isinstance(eta, (int, float)) and not isinstance(eta, bool) and eta > 1):
        raise ValueError(f"eta: must be a number > 1, got {eta!r}")
    v, r = _as_halving_input(value, rivals)
    if np.isnan(v).any():
        return False
    r = r[~np.isnan(r).any(axis=1)]
    if len(r) == 0:
        return True
    n_promoted = _n_promoted(len(r) + 1, eta)
    if v.size == 1:
        competing = np.sort(np.append(r[:, 0], v[0]))
        return bool(v[0] >= competing[-n_promoted])
    return _n_in_better_fronts(v, r) < n_promoted


# ----------------------------------------------------------------------------- repeated looks


def _crossing_probability(c: float, times: np.ndarray) -> float:
    """P(Z_k > c for some look k), Z_k = W(t_k) / sqrt(t_k) for a standard Brownian motion W.

    Recursive numerical integration (Armitage, McPherson & Rowe 1969; Jennison & Turnbull 2000, ch. 19):
    carry the sub-density of W(t_k) on the continuation region W(t_k) <= c sqrt(t_k) look to look on a
    trapezoid grid; each step adds the Gaussian-increment probability of crossing the next boundary.
    """
    bounds = c * np.sqrt(times)
    total = float(stats.norm.sf(c))
    sd = math.sqrt(times[0])
    u = np.linspace(bounds[0] - _POCOCK_SPAN * sd, bounds[0], _POCOCK_GRID)
    density = stats.norm.pdf(u, scale=sd) * _trapezoid_weights(u)
    for k in range(1, len(times)):
        step = math.sqrt(times[k] - times[k - 1])
        total += float(density @ stats.norm.sf((bounds[k] - u) / step))
        if k == len(times) - 1:
            break
        # The increment's kernel must span several grid cells, whatever the spacing of the looks.
        n = int(min(4000, max(_POCOCK_GRID, math.ceil(4 * _POCOCK_SPAN * math.sqrt(times[k]) / step))))
        s = np.linspace(bounds[k] - _POCOCK_SPAN * math.sqrt(times[k]), bounds[k], n)
        density = (stats.norm.pdf((s[:, None] - u[None, :]) / step) / step) @ density
        density *= _trapezoid_weights(s)
        u = s
    return total


def _trapezoid_weights(grid: np.ndarray) -> np.ndarray:
    w = np.full(len(grid), grid[1] - grid[0])
    w[[0, -1]] /= 2
    return w


@functools.lru_cache(maxsize=256)
def _pocock_level(alpha: float, times: tuple[float, ...]) -> float:
    """Nominal one-sided level 1 - Phi(c) with P(any Z_k > c) = alpha under the null."""
    if len(times) == 1:
        return alpha
    t = np.asarray(times, dtype=np.float64) / times[-1]
    lo, hi = stats.norm.isf(alpha), stats.norm.isf(alpha / len(t))  # single look, Bonferroni
    c = optimize.brentq(lambda x: _crossing_probability(x, t) - alpha, lo, hi, xtol=1e-10)
    return float(stats.norm.sf(c))


def alpha_nominal(alpha: float, looks: int, sizes: Sequence[float] | None = None) -> float:
    """Per-look one-sided level whose overall false-stop rate over `looks` interim looks is alpha (Pocock).

    Pocock's boundary: one constant c on the standardized statistic at every look, with
    P(max_k Z_k > c) = alpha for a Brownian motion observed at information times t_k (here: items seen),
    so corr(Z_i, Z_j) = sqrt(t_i / t_j). Solved numerically (recursive integration + brentq) and cached.
    Bonferroni (alpha / looks) would ignore that nested prefixes share items and over-correct: Pocock is
    between the two (alpha 0.1: 0.1, 0.0634, 0.0494, 0.0418 for 1..4 equally spaced looks; Bonferroni
    0.1, 0.05, 0.0333, 0.025).

    sizes: the prefix size at each look (e.g. `rung_sizes(...)`); None means equally spaced. Pass them
    when the rungs are far from equally spaced: 32 -> 96 -> 1000 items are less correlated than equal
    steps, so they need a smaller level (0.0391 instead of 0.0494 at alpha 0.1) to keep alpha overall.

    The Brownian model is the large-sample limit of both statistics used here; for the empirical-Bernstein
    bound the rigorous union bound is Bonferroni, but that bound is conservative enough that the Pocock level
    keeps the false-stop rate far below alpha (see tests).
    """
    if not (isinstance(alpha, (int, float)) and 0.0 < alpha < 1.0):
        raise ValueError(f"alpha: must be in (0, 1), got {alpha!r}")
    if isinstance(looks, bool) or not isinstance(looks, (int, np.integer)) or looks < 1:
        raise ValueError(f"looks: must be an integer >= 1, got {looks!r}")
    if sizes is None:
        times = tuple(float(k) for k in range(1, int(looks) + 1))
    else:
        times = tuple(float(s) for s in sizes)
        if len(times) != looks:
            raise ValueError(f"sizes: need one prefix size per look ({looks}), got {list(sizes)}")
        if times[0] <= 0 or any(b <= a for a, b in zip(times, times[1:])):
            raise ValueError(f"sizes: must be positive and strictly increasing, got {list(sizes)}")
    return _pocock_level(float(alpha), times)


# ----------------------------------------------------------------------------- paired tests


def bernstein_upper_bound(diffs: np.ndarray, delta: float, value_range: float = 1.0) -> float:
    """Upper confidence bound on the mean paired difference: m + sqrt(2 v ln(3/delta) / t) + 3 R ln(3/delta) / t.

    t items, m their mean, v their empirical variance (1/t, not 1/(t-1)), R = 2 * value_range the range of a
    difference of two scores in [0, value_range]. Audibert, Munos & Szepesvari 2009 (Theor. Comput. Sci. 410,
    Theorem 1), the bound behind Mnih, Szepesvari & Audibert's Empirical Bernstein Stopping (ICML 2008):
    |m - mu| <= sqrt(2 v x / t) + 3 R x / t with probability >= 1 - 3 exp(-x); x = ln(3 / delta). It is
    two-sided, so its upper side alone holds with probability >= 1 - delta (conservative by up to 2x).
    Much tighter than Hoeffding's R sqrt(ln(1/delta) / 2t) on merges of the same endpoints, where most
    items agree and v is small.
    """
    d = np.asarray(diffs, dtype=np.float64)
    t = len(d)
    x = math.log(3.0 / delta)
    r = 2.0 * value_range
    return float(d.mean() + math.sqrt(2.0 * d.var() * x / t) + 3.0 * r * x / t)


@contextlib.contextmanager
def _quiet_optuna(optuna: Any) -> Iterator[None]:
    """Mute optuna's "study created" INFO line and ExperimentalWarning, restoring both afterwards.

    Both are process-wide switches (optuna's logger level, the warnings filters), so this is not
    thread-safe: concurrent callers may see optuna muted for the few milliseconds of a call.
    """
    verbosity = optuna.logging.get_verbosity()
    if verbosity < optuna.logging.WARNING:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)


@functools.lru_cache(maxsize=64)
def _wilcoxon_pruner(p_threshold: float) -> Any:
    """optuna's WilcoxonPruner keeps no state between prune() calls, so one per threshold is enough."""
    import optuna

    with _quiet_optuna(optuna):
        return optuna.pruners.WilcoxonPruner(p_threshold=p_threshold, n_startup_steps=2)


def _wilcoxon_worse(diffs: np.ndarray, p_threshold: float) -> bool:
    """optuna's WilcoxonPruner.prune on a throwaway in-memory study holding only the incumbent.

    Only the differences matter to the pruner (its test is on candidate - best per shared step, its safety
    rule compares the two means), so the incumbent is given 0 on every item and the candidate the diffs:
    exactly diffs reach scipy.stats.wilcoxon(alternative="less", zero_method="zsplit"), and the safety
    rule reads "never prune when mean(diffs) >= 0". Steps are item positions in the shared order.
    Cost (measured on a shared 2-core CPU): ~1.6 ms at 1,000 items, ~4 ms at 3,000, of which scipy is
    ~0.35 ms and create_study ~0.1 ms; the rest is optuna building and copying the per-item dicts
    (create_trial, add_trial, the deepcopy in study.best_trial, prune's dict-to-array).
    """
    import optuna
    from optuna.trial import TrialState, create_trial

    steps = range(len(diffs))
    incumbent = create_trial(value=0.0, intermediate_values=dict.fromkeys(steps, 0.0))
    candidate = create_trial(state=TrialState.RUNNING, intermediate_values=dict(zip(steps, diffs.tolist())))
    pruner = _wilcoxon_pruner(p_threshold)
    with _quiet_optuna(optuna):
        study = optuna.create_study(direction="maximize")
        study.add_trial(incumbent)
        return bool(pruner.prune(study, candidate))


def paired_worse(
    diffs: np.ndarray,
    *,
    test: str,
    alpha: float,
    looks: int,
    value_range: float = 1.0,
    sizes: Sequence[float] | None = None,
) -> bool:
    """True iff the per-item paired differences diffs = candidate - incumbent (on the same items) show, at the
    corrected level, that the candidate's mean is below the incumbent's.

    test: "wilcoxon" (optuna's WilcoxonPruner: one-sided signed-rank test, zsplit ties, p < level, never when
    mean(diffs) >= 0) or "bernstein" (`bernstein_upper_bound(diffs, level, value_range) < 0`). looks: how
    many rungs (interim looks) the race has; level = `alpha_nominal(alpha, looks, sizes)` (Pocock), so over
    all looks of one race the chance of stopping a candidate that is not worse stays <= alpha. sizes: the
    prefix sizes of the looks (None: equally spaced). Fewer than 2 items, or all differences 0: False.
    """
    if test not in TESTS:
        raise ValueError(f"test: unknown {test!r}; use one of {', '.join(TESTS)}")
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 1:
        raise ValueError(f"diffs: expected a 1-D array of per-item differences, got shape {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError(f"diffs: NaN or inf at item {int(np.flatnonzero(~np.isfinite(d))[0])}")
    level = alpha_nominal(alpha, looks, sizes)
    if len(d) < 2 or not d.any():
        return False
    if test == "bernstein":
        if not value_range > 0:
            raise ValueError(f"value_range: must be > 0, got {value_range!r}")
        if np.abs(d).max() > value_range * (1 + 1e-12):
            raise ValueError(
                f"diffs: must lie in [-{value_range}, {value_range}], got max |diff| {np.abs(d).max()}"
            )
        return bernstein_upper_bound(d, level, value_range) < 0
    if d.sum() >= 0:  # optuna's safety rule, checked here first to skip building the study
        return False
    return _wilcoxon_worse(d, level)
