"""Full-score estimators: a candidate's answers on a fixed item subset -> its mean score on all N items.

Owns, per task, the choice of the subset S (n of the task's N items) and the map from a candidate's
per-item scores on S to an estimate of its mean over all N items (formulas: docs CHEAP_FITNESS.md,
section 2). Everything is fitted once per run from the task's reference matrix ``Y``: shape
``(models, N)``, values in [0, 1]; rows are the merge endpoints (base first, then the sources),
optionally followed by other fully evaluated models (extra rows help the IRT item fit; ``endpoints``
says how many leading rows are endpoints). Driver side: numpy, scipy and scikit-learn only; no torch,
no logging, no mutable state. Subsets depend on the reference and the seed alone, never on a candidate,
so every candidate of a run is scored on the same items and comparisons stay paired.

Methods (``ESTIMATORS``):

- ``mean``: uniform random subset, plain mean. The baseline the others must beat at equal n.
- ``anchor``: tinyBenchmarks anchor points. Items are embedded by their reference columns and clustered
  (k-means; on the distinct column patterns when there are no more of them than n, which is the usual
  case with a handful of 0/1 reference rows); picks are spread over clusters in proportion to size and
  each pick weighs its cluster's share of N divided by the picks in that cluster.
- ``irt``: multidimensional 2PL ``p_i(theta) = sigmoid(a_i . theta - b_i)``; items and reference
  abilities fitted jointly by penalized maximum likelihood; a candidate's theta is the MAP on its subset
  answers under a Gaussian prior fitted to the reference abilities (see ``ability_prior``); p-IRT blend
  ``(n/N) mean_S y + (1 - n/N) mean_U p_i(theta)``.
- ``gmp_irt``: MERGE³ gmp-IRT. theta restricted to the span of the endpoint abilities,
  ``theta = sum_j lambda_j theta_j``, lambdas unconstrained (as Mergenetic), same p-IRT blend, then
  ``delta * mean_S y + (1 - delta) * blend`` (default delta 0.5, Mergenetic's constant).
- ``merge_aware``: IRT-free. ``p_i = sigmoid(c + sum_j beta_j Y[j, i])`` over the endpoint rows, fitted on
  S by L2-penalized logistic regression (fractional targets allowed), same p-IRT blend; default delta 0
  (see ``MergeAwareEstimator``).

``mean``, ``irt``, ``gmp_irt`` and ``merge_aware`` draw the same subset for the same (N, n, seed), so
methods can be compared on identical items. Every estimate is finite and lies in [0, 1].
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, logit
from sklearn.cluster import KMeans

from evomerge.errors import ConfigError

ESTIMATORS: tuple[str, ...] = ("mean", "anchor", "irt", "gmp_irt", "merge_aware")

# Blend weight on the subset mean when the caller gives none; methods without a blend ignore delta.
DEFAULT_DELTA: dict[str, float] = {"gmp_irt": 0.5, "merge_aware": 0.0}

_KMEANS_INITS = 5
# Added to the reference abilities' covariance: keeps the candidate prior proper with one reference row.
_ABILITY_PRIOR_RIDGE = 0.1
# Difficulty prior is 10x weaker than the ability/discrimination prior: items that every reference
# model gets right (or wrong) are common and their b must be free to move far from 0.
_DIFFICULTY_L2_SCALE = 0.1
_JOINT_FIT_MAXITER = 3000
_CANDIDATE_FIT_MAXITER = 200

_Objective = Callable[[np.ndarray], tuple[float, np.ndarray]]


# ----------------------------------------------------------------------------- estimators


@dataclass(frozen=True, eq=False)
class TaskEstimator:
    """One task's fixed subset and how a candidate's answers on it become an estimate of the full score.

    This base class is the weighted subset mean (``mean``: uniform weights, ``anchor``: cluster shares).
    """

    name: str
    items: np.ndarray  # positions (0..N-1) of the subset S, int64, sorted ascending
    weights: np.ndarray  # one weight per subset item, sums to 1
    n_total: int  # N

    def estimate(self, y_subset: np.ndarray) -> float:
        """Estimated mean score over all N items; ``y_subset`` is aligned with ``items``."""
        return _unit(float(self.weights @ self._answers(y_subset)))

    def _answers(self, y_subset: np.ndarray) -> np.ndarray:
        """The candidate's subset scores as float64; a wrong shape or value is a caller bug."""
        y = np.asarray(y_subset, dtype=np.float64)
        if y.shape != self.items.shape:
            raise ValueError(f"{self.name}: y_subset must have shape {self.items.shape}, got {y.shape}")
        if not np.all(np.isfinite(y)) or y.min(initial=0.0) < 0.0 or y.max(initial=0.0) > 1.0:
            raise ValueError(f"{self.name}: y_subset values must be finite and in [0, 1]")
        return y

    def _rest(self) -> np.ndarray:
        """Positions of U, the items not in the subset."""
        keep = np.ones(self.n_total, dtype=bool)
        keep[self.items] = False
        return np.flatnonzero(keep)


@dataclass(frozen=True, eq=False)
class IRTEstimator(TaskEstimator):
    """p-IRT: the candidate's MAP ability predicts the items it did not answer."""

    discrimination: np.ndarray  # a, (N, dims)
    difficulty: np.ndarray  # b, (N,)
    abilities: np.ndarray  # theta of the reference rows, (models, dims)
    prior_mean: np.ndarray  # candidate ability prior, (dims,)
    prior_precision: np.ndarray  # (dims, dims)

    def estimate(self, y_subset: np.ndarray) -> float:
        """p-IRT blend with theta = MAP of the candidate's subset answers under the fitted items."""
        y = self._answers(y_subset)
        if self.items.size == self.n_total:
            return _unit(float(y.mean()))
        a, b = self.discrimination[self.items], self.difficulty[self.items]
        objective = _ability_objective(y, a, b, self.prior_mean, self.prior_precision)
        theta = _minimize(objective, self.prior_mean.copy())
        return self._blend(y, theta)

    def _blend(self, y: np.ndarray, theta: np.ndarray) -> float:
        """``(n/N) mean_S y + (1 - n/N) mean_U p_i(theta)``."""
        rest = self._rest()
        p_rest = expit(self.discrimination[rest] @ theta - self.difficulty[rest])
        return _unit(pirt_blend(float(y.mean()), p_rest, self.n_total))


@dataclass(frozen=True, eq=False)
class GmpIRTEstimator(IRTEstimator):
    """MERGE³ gmp-IRT: ability in the span of the endpoints' abilities, blended with the subset mean."""

    endpoints: int  # the first `endpoints` reference rows are the merge's endpoints
    delta: float  # weight of the subset mean; 1 gives the subset mean exactly

    def estimate(self, y_subset: np.ndarray) -> float:
        """``delta * mean_S y + (1 - delta) * Z_mp``."""
        y = self._answers(y_subset)
        subset_mean = float(y.mean())
        if self.delta == 1.0 or self.items.size == self.n_total:
            return _unit(subset_mean)
        a, b = self.discrimination[self.items], self.difficulty[self.items]
        basis = self.abilities[: self.endpoints]
        lambdas = _minimize(_mixture_objective(y, a, b, basis), np.full(self.endpoints, 1.0 / self.endpoints))
        z_mp = self._blend(y, basis.T @ lambdas)
        return _unit(self.delta * subset_mean + (1.0 - self.delta) * z_mp)


@dataclass(frozen=True, eq=False)
class MergeAwareEstimator(TaskEstimator):
    """IRT-free merge-aware predictor: a logistic regression of the candidate on the endpoints' items.

    Default delta is 0: the fit already contains its own shrinkage toward the subset mean. The
    intercept is unpenalized, so at the optimum ``mean_S p = mean_S y`` (calibration on S), and as the
    L2 penalty grows beta -> 0 and the estimate -> the subset mean. ``l2`` is the knob between
    "trust the endpoints" and "trust the subset"; a delta on top would only repeat it.
    """

    endpoint_scores: np.ndarray  # the endpoint rows of the reference, (endpoints, N)
    l2: float  # penalty on beta (not on the intercept)
    delta: float

    def estimate(self, y_subset: np.ndarray) -> float:
        """``delta * mean_S y + (1 - delta) * [(n/N) mean_S y + (1 - n/N) mean_U p_i]``."""
        y = self._answers(y_subset)
        subset_mean = float(y.mean())
        if self.delta == 1.0 or self.items.size == self.n_total:
            return _unit(subset_mean)
        features = self.endpoint_scores[:, self.items].T
        start = np.concatenate([[logit(np.clip(subset_mean, 0.05, 0.95))], np.zeros(features.shape[1])])
        w = _minimize(_logistic_objective(y, features, self.l2), start)
        rest = self._rest()
        p_rest = expit(w[0] + self.endpoint_scores[:, rest].T @ w[1:])
        z = pirt_blend(subset_mean, p_rest, self.n_total)
        return _unit(self.delta * subset_mean + (1.0 - self.delta) * z)


# ----------------------------------------------------------------------------- construction


def build_estimator(
    name: str,
    reference: np.ndarray,
    n: int,
    seed: int,
    *,
    delta: float | None = None,
    dims: int = 2,
    l2: float = 1.0,
    endpoints: int | None = None,
) -> TaskEstimator:
    """Choose the subset of ``n`` items from ``reference`` (models x N) and fit what ``name`` needs.

    ``delta``: weight of the subset mean in gmp_irt / merge_aware (None: ``DEFAULT_DELTA``; ignored by
    the other methods). ``dims``: IRT ability dimensions. ``l2``: penalty of the joint IRT fit (see
    ``fit_irt``) and on beta in merge_aware. ``endpoints``: how many leading reference rows are merge
    endpoints (None: all rows).
    """
    _check_name(name)
    y = _check_reference(reference)
    n_models, n_total = y.shape
    _check_int("n", n, 1, n_total, " (the number of items in the reference)")
    _check_int("seed", seed, 0, None)
    _check_int("dims", dims, 1, None)
    if not (_is_number(l2) and l2 > 0):
        raise ConfigError(f"estimator l2 must be a finite number > 0, got {l2!r}")
    k = n_models if endpoints is None else endpoints
    _check_int("endpoints", k, 1, n_models, " (the number of reference rows)")
    blend = DEFAULT_DELTA.get(name, 0.0) if delta is None else delta
    if not (_is_number(blend) and 0.0 <= blend <= 1.0):
        raise ConfigError(f"estimator delta must be in [0, 1], got {delta!r}")

    if name == "anchor":
        items, weights = anchor_subset(y, n, seed)
        return TaskEstimator(name, _frozen(items), _frozen(weights), n_total)
    items = _frozen(random_subset(n_total, n, seed))
    weights = _frozen(np.full(n, 1.0 / n))
    if name == "mean":
        return TaskEstimator(name, items, weights, n_total)
    if name == "merge_aware":
        return MergeAwareEstimator(name, items, weights, n_total, _frozen(y[:k]), float(l2), float(blend))
    abilities, a, b = fit_irt(y, dims, l2, seed)
    fitted = (_frozen(a), _frozen(b), _frozen(abilities), *map(_frozen, ability_prior(abilities)))
    if name == "irt":
        return IRTEstimator(name, items, weights, n_total, *fitted)
    return GmpIRTEstimator(name, items, weights, n_total, *fitted, k, float(blend))


def random_subset(n_total: int, n: int, seed: int) -> np.ndarray:
    """n distinct positions of 0..n_total-1, uniform without replacement, sorted; fixed by the seed."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_total, size=n, replace=False)).astype(np.int64)


def anchor_subset(reference: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """tinyBenchmarks anchors: (sorted items, weights summing to 1), exactly n distinct items.

    Items are embedded by their reference columns. With more distinct column patterns than n, k-means
    (n clusters, lowest inertia of several seeded starts) runs on the patterns weighted by their counts;
    otherwise every pattern is its own cluster, since k-means cannot make n clusters from fewer points.
    Inside a cluster, the items nearest the centre come first (seeded random order among ties).
    """
    n_total = reference.shape[1]
    columns = reference.T
    patterns, pattern_of_item, counts = np.unique(columns, axis=0, return_inverse=True, return_counts=True)
    pattern_of_item = pattern_of_item.reshape(-1)
    if len(patterns) > n:
        km = KMeans(n_clusters=n, n_init=_KMEANS_INITS, random_state=seed % 2**32)
        km.fit(patterns, sample_weight=counts)
        cluster_of_pattern, centers = km.labels_, km.cluster_centers_
    else:
        cluster_of_pattern, centers = np.arange(len(patterns)), patterns
    used, cluster = np.unique(cluster_of_pattern[pattern_of_item], return_inverse=True)
    cluster, centers = cluster.reshape(-1), centers[used]
    sizes = np.bincount(cluster)
    picks = allocate(sizes, n)

    distance = np.sum((columns - centers[cluster]) ** 2, axis=1)
    tie_break = np.random.default_rng(seed).permutation(n_total)
    order = np.lexsort((tie_break, distance, cluster))
    starts = np.cumsum(sizes) - sizes
    rank_in_cluster = np.arange(n_total) - starts[cluster[order]]
    chosen = np.sort(order[rank_in_cluster < picks[cluster[order]]])
    weights = sizes[cluster[chosen]] / n_total / picks[cluster[chosen]]
    return chosen.astype(np.int64), weights


def allocate(sizes: np.ndarray, n: int) -> np.ndarray:
    """Picks per cluster, proportional to size by largest remainder, each in [1, size], summing to n.

    Needs ``len(sizes) <= n <= sizes.sum()``.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    quota = n * sizes / sizes.sum()
    picks = np.minimum(np.maximum(np.floor(quota).astype(np.int64), 1), sizes)
    while (total := int(picks.sum())) != n:
        gap = quota - picks
        if total < n:
            open_ = np.flatnonzero(picks < sizes)
            picks[open_[np.argmax(gap[open_])]] += 1
        else:
            spare = np.flatnonzero(picks > 1)
            picks[spare[np.argmin(gap[spare])]] -= 1
    return picks


def fit_irt(reference: np.ndarray, dims: int, l2: float, seed: int) -> tuple[np.ndarray, ...]:
    """Joint MAP fit of a multidimensional 2PL: (abilities (models, dims), a (N, dims), b (N,)).

    Penalty ``l2/2 (|theta|^2 + |a|^2) + l2 * 0.1 / 2 |b|^2``: with a handful of reference rows the plain
    MLE is degenerate (items everyone solves push b to -inf; theta and a trade scale freely).
    Deterministic: the random start (needed to leave the theta = a = 0 saddle) comes from the seed.
    """
    n_models, n_total = reference.shape
    rng = np.random.default_rng(seed)
    theta0 = 0.1 * rng.standard_normal((n_models, dims))
    a0 = 0.1 * rng.standard_normal((n_total, dims))
    b0 = -logit(np.clip(reference.mean(axis=0), 0.05, 0.95))
    x0 = np.concatenate([theta0.ravel(), a0.ravel(), b0])
    split = (n_models * dims, n_models * dims + n_total * dims)
    b_l2 = l2 * _DIFFICULTY_L2_SCALE

    def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
        theta = x[: split[0]].reshape(n_models, dims)
        a = x[split[0] : split[1]].reshape(n_total, dims)
        b = x[split[1] :]
        logits = theta @ a.T - b
        resid = expit(logits) - reference
        value = _bernoulli_nll(logits, reference)
        value += 0.5 * l2 * (np.sum(theta**2) + np.sum(a**2)) + 0.5 * b_l2 * np.sum(b**2)
        grad = np.concatenate(
            [
                (resid @ a + l2 * theta).ravel(),
                (resid.T @ theta + l2 * a).ravel(),
                -resid.sum(axis=0) + b_l2 * b,
            ]
        )
        return value, grad

    res = minimize(objective, x0, jac=True, method="L-BFGS-B", options={"maxiter": _JOINT_FIT_MAXITER})
    x = res.x
    return (
        x[: split[0]].reshape(n_models, dims),
        x[split[0] : split[1]].reshape(n_total, dims),
        x[split[1] :].copy(),
    )


def ability_prior(abilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian prior for a candidate's ability: (mean, precision) of the reference abilities.

    Empirical Bayes rather than a fixed N(0, I/l2): the joint fit pins neither the centre nor the scale
    of theta (with few rows the abilities sit far from 0; with many they spread wider than 1), and a
    prior at the wrong place or scale biases every estimate. A candidate of a merge search is a model
    like the reference ones, so their spread is the right prior. Measured on simulated 2PL data (60
    reference rows, n=20): N(0, I) gave a higher MAE than the plain subset mean, this prior a lower one.
    """
    dims = abilities.shape[1]
    centred = abilities - abilities.mean(axis=0)
    covariance = centred.T @ centred / len(abilities) + _ABILITY_PRIOR_RIDGE * np.eye(dims)
    return abilities.mean(axis=0), np.linalg.inv(covariance)


def pirt_blend(subset_mean: float, p_rest: np.ndarray, n_total: int) -> float:
    """tinyBenchmarks p-IRT: observed items count as observed, unobserved ones by their predicted p."""
    if p_rest.size == 0:
        return subset_mean
    share = (n_total - p_rest.size) / n_total
    return share * subset_mean + (1.0 - share) * float(p_rest.mean())


# ----------------------------------------------------------------------------- objectives and helpers


def _ability_objective(
    y: np.ndarray, a: np.ndarray, b: np.ndarray, mean: np.ndarray, precision: np.ndarray
) -> _Objective:
    """Negative log-posterior of one ability vector given subset answers, with its gradient."""

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        logits = a @ theta - b
        resid = expit(logits) - y
        pull = precision @ (theta - mean)
        return _bernoulli_nll(logits, y) + 0.5 * float((theta - mean) @ pull), a.T @ resid + pull

    return objective


def _mixture_objective(y: np.ndarray, a: np.ndarray, b: np.ndarray, basis: np.ndarray) -> _Objective:
    """Negative log-likelihood of lambdas, theta = basis.T @ lambdas (MERGE³ mp-IRT, no prior)."""

    def objective(lambdas: np.ndarray) -> tuple[float, np.ndarray]:
        logits = a @ (basis.T @ lambdas) - b
        resid = expit(logits) - y
        return _bernoulli_nll(logits, y), basis @ (a.T @ resid)

    return objective


def _logistic_objective(y: np.ndarray, features: np.ndarray, l2: float) -> _Objective:
    """Penalized logistic loss of w = (c, beta) with fractional targets; c is not penalized."""

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        beta = w[1:]
        logits = w[0] + features @ beta
        resid = expit(logits) - y
        value = _bernoulli_nll(logits, y) + 0.5 * l2 * float(beta @ beta)
        return value, np.concatenate([[resid.sum()], features.T @ resid + l2 * beta])

    return objective


def _minimize(objective: _Objective, start: np.ndarray) -> np.ndarray:
    """BFGS from ``start``; keeps the start if the optimizer wandered off to non-finite values.

    Unpenalized directions (gmp_irt lambdas, merge_aware intercept) diverge when every subset answer
    is 0 or every one is 1; the iteration cap keeps them finite and the prediction saturates at 0 or 1.
    """
    res = minimize(objective, start, jac=True, method="BFGS", options={"maxiter": _CANDIDATE_FIT_MAXITER})
    return res.x if np.all(np.isfinite(res.x)) else start


def _bernoulli_nll(logits: np.ndarray, y: np.ndarray) -> float:
    """Sum of -[y log sigmoid(l) + (1 - y) log(1 - sigmoid(l))], stable for large |l|."""
    return float(np.sum(np.logaddexp(0.0, logits) - y * logits))


def _unit(x: float) -> float:
    """Clip to [0, 1]: blends of probabilities can leave it only by rounding."""
    return float(min(1.0, max(0.0, x)))


def _frozen(a: np.ndarray) -> np.ndarray:
    """A read-only copy, so a frozen estimator's arrays cannot be changed in place."""
    out = np.array(a, copy=True)
    out.flags.writeable = False
    return out


# ----------------------------------------------------------------------------- validation


def _check_name(name: str) -> None:
    if name not in ESTIMATORS:
        close = difflib.get_close_matches(str(name), ESTIMATORS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown estimator {name!r}.{hint} Available: {', '.join(ESTIMATORS)}")


def _check_reference(reference: np.ndarray) -> np.ndarray:
    try:
        y = np.asarray(reference, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"estimator reference must be a numeric (models, items) array: {exc}") from None
    if y.ndim != 2 or y.shape[0] < 1 or y.shape[1] < 1:
        raise ConfigError(f"estimator reference must be a 2-D (models, items) array, got shape {y.shape}")
    if not np.all(np.isfinite(y)):
        raise ConfigError("estimator reference holds NaN or inf scores")
    if y.min() < 0.0 or y.max() > 1.0:
        raise ConfigError(
            f"estimator reference scores must be in [0, 1], got min {y.min()} and max {y.max()}"
        )
    return y


def _check_int(what: str, value: int, low: int, high: int | None, about_high: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"estimator {what} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]{about_high}" if high is not None else f">= {low}"
        raise ConfigError(f"estimator {what} must be {bound}, got {value}")


def _is_number(value: object) -> bool:
    """A finite real number (bools are not)."""
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, bool)
        and bool(np.isfinite(value))
    )
