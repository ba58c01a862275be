"""MAP: amortized Pareto fronts of merges via per-objective quadratic surrogates (ALGORITHMS.md 4.6).

Li et al. 2024, "MAP: Low-compute Model Merging with Amortized Pareto Fronts via Quadratic
Approximation" (arXiv:2406.07529). Meant for a task-vector space (one coefficient c_i per expert, see
`evomerge/space/task_vector.py`) with one objective per task, but any box space works: every objective
gets a surrogate over every gene.

The loop, one phase after another (each candidate's `info["phase"]` names it):

1. **design**: the one-hot points plus a subsampled grid of the box, without one-hot, sum-to-1 and
   isotropic points (optional isotropic and jittered points); (K+1)(K+2) points by default, twice the
   parameter count of a K-gene quadratic.
2. **bayes** (option `bayes_rounds`): Bayesian MAP; each round draws `bayes_points` points where the
   surrogates fit worst (hyperspherical angle bins scored by residual + bootstrap std, softmax at
   temperature 0.07).
3. **front**: fit the surrogates (sigmoid or identity link, a bit-reproducible Levenberg-Marquardt from
   p0 = ones and from a second start, see `fit_surrogate`), run optuna's NSGA-III on them in process (population 100), and
   ask for up to `front_points` points of the predicted front (greedily by the hypervolume their
   predictions add to the measured points [ours; the paper evaluates the front]; or well spread). Each
   carries `info["predicted"]` = {objective index: predicted value} and `info["fit"]` (R^2 on the fit
   points, k-fold held-out RMSE and R^2 per objective). When those are asked, refit on everything told
   and repeat.

**Nested MAP** (option `nested`): for many tasks; objective i must score the task of gene i. The K
experts are evaluated (one-hot points), then the two models whose mean scores on their own tasks are
closest are merged by a 2-task MAP over c = a*u + b*v (u, v their coefficient vectors; `nested_points`
design points, 20% isotropic); c is picked on the predicted front by the tasks each side carries, the
merged model is evaluated (phase "merge") and replaces the pair, until one model remains; a budget left
after that goes to plain MAP (its design without one-hot points, then fronts), since points on the nested
planes leave a K-gene quadratic underdetermined. Pairs are chosen among models whose score is known (told, or
predicted for a merge still in flight), so asks never wait.

Asks never wait for results: a fit uses whatever is told when it is needed; while too few successes are
told to fit (fewer than the quadratic's parameter count), asks return uniform points of the box (phase
"extra"). A surrogate fit that fails (no finite coefficients) is a `StrategyError` naming the objective.
Determinism: every draw comes from `self.rng` (NSGA-III gets a seed drawn from it), the fits use the told
points in ask order and are bit-reproducible in any process (`levenberg`: no BLAS, no SIMD transcendental
loops), so replaying the journal's calls rebuilds the same candidates.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from evomerge.space.base import Space
from evomerge.strategies.base import STRATEGIES, Candidate, Result, Strategy, StrategyError
from evomerge.strategies.levenberg import (
    LINK_FUNCTIONS,
    apply,
    levenberg_marquardt,
    linear_least_squares,
    linear_predictor,
)

log = logging.getLogger(__name__)

LINKS = ("auto", "sigmoid", "identity", "softplus")


# ----------------------------------------------------------------------------------------- surrogate


def n_params(k: int) -> int:
    """Parameters of a quadratic in k variables: (k+1)(k+2)/2."""
    return (k + 1) * (k + 2) // 2


def quadratic_features(x: np.ndarray) -> np.ndarray:
    """(n, k) -> (n, (k+1)(k+2)/2): squares, cross terms i<j, linear terms, constant (the paper's order)."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    n, k = x.shape
    cross = [x[:, i] * x[:, j] for i, j in itertools.combinations(range(k), 2)]
    return np.column_stack([x**2, *cross, x, np.ones(n)]) if cross else np.column_stack([x**2, x, np.ones(n)])


def resolve_link(link: str, y: np.ndarray) -> str:
    """`auto`: sigmoid for scores in [0, 1] (accuracies), identity otherwise."""
    if link != "auto":
        return link
    return "sigmoid" if np.all((y >= 0.0) & (y <= 1.0)) else "identity"


def predict(beta: np.ndarray, x: np.ndarray, link: str) -> np.ndarray:
    """phi(q(x)) for the fitted coefficients beta, computed bit-reproducibly (see `levenberg`)."""
    q = linear_predictor(quadratic_features(x), np.asarray(beta, dtype=np.float64))
    return apply(LINK_FUNCTIONS[link][0], q)


class SurrogateFitError(StrategyError):
    pass


def _inverse_link(y: np.ndarray, link: str) -> np.ndarray:
    """phi^-1 of the targets, clipped into the link's range (a starting point for the fit)."""
    if link == "sigmoid":
        p = np.clip(y, 0.01, 0.99)
        return apply(math.log, p / (1 - p))
    if link == "softplus":
        return apply(lambda v: math.log(math.expm1(v)), np.maximum(y, 1e-3))
    return y


def fit_surrogate(x: np.ndarray, y: np.ndarray, link: str) -> np.ndarray:
    """Least squares of y ~ phi(q(x)), bit-reproducible in any process (`levenberg`: a journal replay refits
    every surrogate to the same last bit). Levenberg-Marquardt from p0 = ones (the paper) and, for a
    non-identity link, from the linear least-squares fit of phi^-1(y): from ones a sigmoid starts saturated and
    often stalls far from the optimum. The start with the lower squared error wins. The identity link is
    linear least squares, solved in closed form. Raises SurrogateFitError when no start gives finite
    coefficients."""
    feats = quadratic_features(x)
    p = feats.shape[1]
    y = np.asarray(y, dtype=np.float64)
    if len(y) < p:
        raise SurrogateFitError(f"{len(y)} points cannot fit {p} quadratic parameters")
    if link == "identity":
        try:
            return linear_least_squares(feats, y)
        except ValueError as e:
            raise SurrogateFitError(str(e)) from None
    starts = [np.ones(p)]
    with contextlib.suppress(ValueError):  # degenerate design: the ones start alone
        starts.append(linear_least_squares(feats, _inverse_link(y, link)))
    best, best_sse = None, math.inf
    for p0 in starts:
        beta, err = levenberg_marquardt(feats, y, p0, link)
        if np.all(np.isfinite(beta)) and err < best_sse:
            best, best_sse = beta, err
    if best is None:
        raise SurrogateFitError("non-finite coefficients")
    return best


def r2_score(y: np.ndarray, pred: np.ndarray) -> float:
    """1 - SS_res/SS_tot (nan when y is constant)."""
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return float("nan") if ss_tot == 0 else 1.0 - float(np.sum((y - pred) ** 2)) / ss_tot


def fit_quality(x: np.ndarray, y: np.ndarray, link: str, beta: np.ndarray, folds: int = 5) -> dict[str, Any]:
    """R^2 on the fit points and k-fold held-out RMSE / R^2 (folds by index mod k; a fold whose training
    part is too small or whose fit fails is left out and counted)."""
    report: dict[str, Any] = {"link": link, "n": len(y), "r2": r2_score(y, predict(beta, x, link))}
    held, truth, skipped = [], [], 0
    k = min(folds, len(y))
    for f in range(k):
        test = np.arange(len(y)) % k == f
        try:
            b = fit_surrogate(x[~test], y[~test], link)
        except SurrogateFitError:
            skipped += 1
            continue
        held.append(predict(b, x[test], link))
        truth.append(y[test])
    if held:
        h, t = np.concatenate(held), np.concatenate(truth)
        report.update(cv_rmse=float(np.sqrt(np.mean((h - t) ** 2))), cv_r2=r2_score(t, h))
    else:
        report.update(cv_rmse=float("nan"), cv_r2=float("nan"))
    report["cv_folds_skipped"] = skipped
    return {key: (None if isinstance(v, float) and not math.isfinite(v) else v) for key, v in report.items()}


# ----------------------------------------------------------------------------------------- design


def initial_design(
    k: int,
    lower: np.ndarray,
    upper: np.ndarray,
    rng: np.random.Generator,
    *,
    total: int | None = None,
    isotropic: float = 0.0,
    jitter: float = 0.0,
    one_hot: bool = True,
) -> np.ndarray:
    """The paper's sampling: one-hot points, then grid points of the box with g = ceil((n/0.5)^(1/k))
    levels (no one-hot, sum-to-1 or isotropic points) subsampled to n, then `isotropic` (fraction of
    `total`) points u*1 and `jitter` (fraction) jittered copies (N(0, 0.1^2) of the range, clipped)."""
    lower, upper = np.asarray(lower, dtype=np.float64), np.asarray(upper, dtype=np.float64)
    total = (k + 1) * (k + 2) if total is None else total
    hot = np.clip(np.eye(k), lower, upper) if one_hot else np.zeros((0, k))
    n_iso, n_jit = int(round(isotropic * total)), int(round(jitter * total))
    n_grid = max(total - len(hot) - n_iso - n_jit, 0)
    points = [hot]
    if n_grid:
        g = max(2, math.ceil((n_grid / 0.5) ** (1.0 / k)))
        levels = np.linspace(lower, upper, g)  # (g, k): level j of gene i
        grid = np.array(
            [[levels[j, i] for i, j in enumerate(idx)] for idx in itertools.product(range(g), repeat=k)]
        )
        keep = ~(
            _is_one_hot(grid)
            | np.isclose(grid.sum(axis=1), 1.0)
            | np.all(np.isclose(grid, grid[:, :1]), axis=1)
        )
        grid = grid[keep]
        points.append(grid[np.sort(rng.choice(len(grid), size=min(n_grid, len(grid)), replace=False))])
    if n_iso:
        u = rng.uniform(0.0, 1.0, size=(n_iso, 1))
        points.append(np.clip(lower + u * (upper - lower), lower, upper))
    base = np.concatenate(points)
    if n_jit and len(base):
        src = base[rng.integers(len(base), size=n_jit)]
        points.append(np.clip(src + rng.normal(0.0, 0.1, size=src.shape) * (upper - lower), lower, upper))
    return np.concatenate(points)


def _is_one_hot(x: np.ndarray) -> np.ndarray:
    nonzero = ~np.isclose(x, 0.0)
    return (nonzero.sum(axis=1) == 1) & np.any(np.isclose(x, 1.0) & nonzero, axis=1)


# ----------------------------------------------------------------------------------------- front


def surrogate_front(
    fn: Callable[[np.ndarray], np.ndarray],
    lower: np.ndarray,
    upper: np.ndarray,
    *,
    seed: int,
    population: int = 100,
    generations: int = 15,
) -> tuple[np.ndarray, np.ndarray]:
    """NSGA-III (optuna's NSGAIIISampler, seeded) maximizing fn: (n, k) -> (n, m) over the box; returns the
    non-dominated (x, predicted y) of every trial. Each generation is asked as one batch and told at once."""
    import optuna

    from evomerge.pareto import non_dominated
    from evomerge.strategies.optuna import _quiet_optuna

    _quiet_optuna(optuna)
    names = [f"x{i}" for i in range(len(lower))]
    m = fn(np.atleast_2d((lower + upper) / 2)).shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.NSGAIIISampler(population_size=population, seed=seed)
        study = optuna.create_study(sampler=sampler, directions=["maximize"] * m)
        xs, ys = [], []
        for _ in range(generations):
            trials = [study.ask() for _ in range(population)]
            x = np.array(
                [[t.suggest_float(n, lo, hi) for n, lo, hi in zip(names, lower, upper)] for t in trials]
            )
            y = fn(x)
            for t, v in zip(trials, y):
                study.tell(t, [float(a) for a in v])
            xs.append(x)
            ys.append(y)
    x, y = np.concatenate(xs), np.concatenate(ys)
    mask = non_dominated(y)
    return x[mask], y[mask]


def spread_pick(y: np.ndarray, count: int) -> list[int]:
    """Farthest-point selection in objective space normalized over y: start from the best mean, then add
    the point farthest from those picked (ties: lowest index)."""
    if len(y) == 0 or count <= 0:
        return []
    span = y.max(axis=0) - y.min(axis=0)
    z = (y - y.min(axis=0)) / np.where(span > 0, span, 1.0)
    picked = [int(np.argmax(z.mean(axis=1)))]
    dist = _norm(z - z[picked[0]])
    while len(picked) < min(count, len(y)):
        i = int(np.argmax(dist))
        if dist[i] <= 0:
            break
        picked.append(i)
        dist = np.minimum(dist, _norm(z - z[i]))
    return picked


def hypervolume_pick(y: np.ndarray, measured: np.ndarray, count: int) -> list[int]:
    """Greedy predicted-hypervolume selection: repeatedly add the point of y whose prediction adds the most
    hypervolume to the measured points plus those picked (reference: 1% below the minimum of both)."""
    from evomerge.pareto import hypervolume, non_dominated, reference_point

    if len(y) == 0 or count <= 0:
        return []
    ref = reference_point(np.concatenate([y, measured]) if len(measured) else y)
    chosen = measured[non_dominated(measured)] if len(measured) else np.zeros((0, y.shape[1]))
    base = hypervolume(chosen, ref) if len(chosen) else 0.0
    picked: list[int] = []
    while len(picked) < min(count, len(y)):
        gains = np.full(len(y), -np.inf)
        for i in range(len(y)):
            if i not in picked and not np.any(np.all(chosen >= y[i], axis=1)):
                gains[i] = hypervolume(np.vstack([chosen, y[i]]), ref) - base
        i = int(np.argmax(gains))
        if not np.isfinite(gains[i]) or gains[i] <= 0:
            break
        picked.append(i)
        chosen = np.vstack([chosen, y[i]])
        chosen = chosen[non_dominated(chosen)]
        base += gains[i]
    return picked


# ----------------------------------------------------------------------------------------- bayesian MAP


def _norm(x: np.ndarray) -> np.ndarray:
    """Row norms with exactly rounded sums (alignment-independent, see `levenberg`)."""
    return np.sqrt(linear_predictor(x * x, np.ones(x.shape[1])))


def to_hyperspherical(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, k) -> radius (n,), angles (n, k-1); angles are in [0, pi/2] for points of the positive orthant."""
    x = np.atleast_2d(x)
    r = _norm(x)
    k = x.shape[1]
    angles = np.zeros((len(x), max(k - 1, 0)))
    for i in range(k - 1):
        tail = _norm(x[:, i:])
        if i < k - 2:
            angles[:, i] = np.arccos(
                np.clip(np.divide(x[:, i], tail, out=np.ones(len(x)), where=tail > 0), -1, 1)
            )
        else:
            angles[:, i] = np.arctan2(x[:, k - 1], x[:, k - 2])
    return r, angles


def from_hyperspherical(r: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Inverse of `to_hyperspherical`."""
    n, k = len(r), angles.shape[1] + 1
    x = np.empty((n, k))
    sin_prod = np.ones(n)
    for i in range(k - 1):
        x[:, i] = r * sin_prod * np.cos(angles[:, i])
        sin_prod = sin_prod * np.sin(angles[:, i])
    x[:, k - 1] = r * sin_prod
    return x


def bin_of(angles: np.ndarray, bins: int) -> np.ndarray:
    """Flat bin index of each point: every angle cut into `bins` equal parts of [0, pi/2]."""
    cells = np.clip((angles / (np.pi / 2) * bins).astype(int), 0, bins - 1)
    return (
        np.ravel_multi_index(cells.T, (bins,) * angles.shape[1])
        if angles.shape[1]
        else np.zeros(len(angles), int)
    )


def bin_scores(
    cells: np.ndarray, sq_residuals: np.ndarray, n_bins: int, rng: np.random.Generator, *,
    lam: float = 0.5, resamples: int = 30, drop: float = 0.2,
) -> np.ndarray:  # fmt: skip
    """Per bin: mean squared residual + lam * std of that mean over `resamples` subsets dropping `drop` of
    the bin's points; an empty bin scores -inf."""
    scores = np.full(n_bins, -np.inf)
    for b in range(n_bins):
        res = sq_residuals[cells == b]
        if len(res) == 0:
            continue
        keep = max(1, int(round(len(res) * (1 - drop))))
        means = [res[rng.choice(len(res), size=keep, replace=False)].mean() for _ in range(resamples)]
        scores[b] = res.mean() + lam * float(np.std(means))
    return scores


def softmax(scores: np.ndarray, temperature: float) -> np.ndarray:
    z = scores / temperature
    z = np.where(np.isfinite(z), z - np.max(z[np.isfinite(z)]), -np.inf)
    p = apply(math.exp, z)  # math.exp(-inf) = 0; element by element: alignment-independent bits
    return p / math.fsum(p)


def bayes_sample(
    cells_probs: np.ndarray, bins: int, k: int, count: int, rng: np.random.Generator
) -> np.ndarray:
    """`count` points: a bin drawn from the probabilities, angles uniform inside it, radius ~ U(0.2, 0.8)."""
    flat = rng.choice(len(cells_probs), size=count, p=cells_probs)
    cells = np.array(np.unravel_index(flat, (bins,) * (k - 1))).T.reshape(count, k - 1)
    width = np.pi / 2 / bins
    angles = (cells + rng.uniform(size=cells.shape)) * width
    r = np.clip(rng.uniform(0.2, 0.8, size=count), 0.0, 1.5)
    return from_hyperspherical(r, angles)


# ----------------------------------------------------------------------------------------- strategy


def _check(name: str, value: Any, ok: bool, want: str) -> None:
    if not ok:
        raise StrategyError(f"strategy 'map': {name} must be {want} (got {value!r})")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class MAP(Strategy):
    """MAP (see the module docstring). Options:

    - `link` ("auto"): surrogate link, auto = sigmoid for scores in [0, 1], identity otherwise; or
      "sigmoid", "identity", "softplus".
    - `design_points` (None = (K+1)(K+2)), `isotropic` (0.0), `jitter` (0.0): the initial design.
    - `select` ("hypervolume"): which predicted-front points to ask, greedily by the hypervolume their
      predictions add to the measured points, or "spread" (farthest points in objective space).
    - `front_points` (20): predicted-front points asked per fit; `population` (100) and `generations`
      (15) of the NSGA-III run on the surrogates; `bounds` ([low, high], default the space's box).
    - `folds` (5): k of the held-out fit check.
    - `bayes_rounds` (0), `bayes_points` (10), `bins` (None = 4 if K < 4 else 2), `temperature` (0.07).
    - `nested` (False), `nested_points` (20), `nested_isotropic` (0.2).
    """

    name = "map"
    multi_objective = True

    def __init__(self, space: Space, *, n_objectives: int = 1, seed: int = 0,
                 weights: Sequence[float] | None = None, budget: int | None = None,
                 link: str = "auto", design_points: int | None = None, isotropic: float = 0.0,
                 jitter: float = 0.0, front_points: int = 20, population: int = 100, generations: int = 15,
                 bounds: Sequence[float] | None = None, folds: int = 5, bayes_rounds: int = 0,
                 bayes_points: int = 10, bins: int | None = None, temperature: float = 0.07,
                 nested: bool = False, nested_points: int = 20, nested_isotropic: float = 0.2,
                 select: str = "hypervolume",
                 **unknown: Any) -> None:  # fmt: skip
        if unknown:
            raise StrategyError(f"strategy 'map': unknown option(s) {', '.join(sorted(unknown))}")
        super().__init__(space, n_objectives=n_objectives, seed=seed, weights=weights, budget=budget)
        k = space.dim
        _check("link", link, link in LINKS, f"one of {', '.join(LINKS)}")
        _check("select", select, select in ("spread", "hypervolume"), "'spread' or 'hypervolume'")
        self.select = select
        _check("design_points", design_points, design_points is None or (_is_int(design_points) and design_points >= 1), "an integer >= 1")  # fmt: skip
        for opt, v in (("isotropic", isotropic), ("jitter", jitter), ("nested_isotropic", nested_isotropic)):
            _check(opt, v, isinstance(v, (int, float)) and 0.0 <= v <= 1.0, "a fraction in [0, 1]")
        for opt, v, low in (("front_points", front_points, 1), ("population", population, 4),
                            ("generations", generations, 1), ("folds", folds, 2), ("bayes_rounds", bayes_rounds, 0),
                            ("bayes_points", bayes_points, 1), ("nested_points", nested_points, 6)):  # fmt: skip
            _check(opt, v, _is_int(v) and v >= low, f"an integer >= {low}")
        _check("bins", bins, bins is None or (_is_int(bins) and bins >= 1), "an integer >= 1")
        _check("temperature", temperature, isinstance(temperature, (int, float)) and temperature > 0, "> 0")
        if nested and n_objectives != k:
            raise StrategyError(
                f"strategy 'map': nested needs one objective per gene (task i scored by objective i); "
                f"got {n_objectives} objectives for {k} genes"
            )
        if bayes_rounds and k < 2:
            raise StrategyError("strategy 'map': bayes_rounds needs at least 2 genes")
        self.lower, self.upper = space.lower.copy(), space.upper.copy()
        if bounds is not None:
            _check(
                "bounds", bounds, len(bounds) == 2 and bounds[0] < bounds[1], "[low, high] with low < high"
            )
            self.lower = np.clip(np.full(k, float(bounds[0])), space.lower, space.upper)
            self.upper = np.clip(np.full(k, float(bounds[1])), space.lower, space.upper)
        self.link, self.front_points, self.population, self.generations = (
            link,
            front_points,
            population,
            generations,
        )
        self.folds, self.bayes_rounds, self.bayes_points = folds, bayes_rounds, bayes_points
        self.bins = bins if bins is not None else (4 if k < 4 else 2)
        self.temperature = temperature
        self.design_options = {"total": design_points, "isotropic": isotropic, "jitter": jitter}
        self.nested, self.nested_points, self.nested_isotropic = nested, nested_points, nested_isotropic
        self.fit_report: dict[str, dict[str, Any]] = {}  # the latest fit, per objective index
        self.fit_history: list[dict[str, Any]] = []
        self._queue: list[tuple[np.ndarray, dict[str, Any]]] = []
        self._round = 0  # generation of the candidates asked next
        self._design_done = False
        self._bayes_left = bayes_rounds
        self._models: list[dict[str, Any]] = []  # nested: {vec, tasks, cid, predicted}
        self._stage: dict[str, Any] | None = None

    # ---------------------------------------------------------------------------- data
    def _told_ok(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Successful told candidates in ask order: ids, genomes (n, k), objectives (n, m)."""
        ids = [cid for cid in self.asked if cid in self.told and not self.told[cid].failed]
        x = np.array([self.asked[c].genome for c in ids]).reshape(len(ids), self.space.dim)
        y = np.array([self.told[c].objectives for c in ids]).reshape(len(ids), self.n_objectives)
        return ids, x, y

    def _fit(self, x: np.ndarray, y: np.ndarray, labels: Sequence[str]) -> list[tuple[np.ndarray, str]]:
        """One surrogate per column of y, with its fit report logged and kept in `fit_report`."""
        models, report = [], {}
        for j, label in enumerate(labels):
            link = resolve_link(self.link, y[:, j])
            try:
                beta = fit_surrogate(x, y[:, j], link)
            except SurrogateFitError as e:
                raise StrategyError(
                    f"strategy 'map': surrogate fit failed for objective {label}: {e}"
                ) from None
            report[label] = fit_quality(x, y[:, j], link, beta, self.folds)
            models.append((beta, link))
            log.info("map: objective %s (%s link, %d points): R2 %s, held-out RMSE %s", label, link, len(y),
                     report[label]["r2"], report[label]["cv_rmse"])  # fmt: skip
        self.fit_report = report
        self.fit_history.append({"round": self._round, "n": len(y), "fit": report})
        return models

    @staticmethod
    def _predictor(models: list[tuple[np.ndarray, str]]) -> Callable[[np.ndarray], np.ndarray]:
        return lambda x: np.column_stack([predict(b, x, link) for b, link in models])

    # ---------------------------------------------------------------------------- ask/tell
    def _ask(self, n: int) -> list[Candidate]:
        batch = []
        for _ in range(n):
            genome, info = self._next()
            batch.append(self.make_candidate(genome, generation=self._round, **info))
            if self._models and info.get("phase") in ("design", "merge") and "model" in info:
                self._models[info["model"]]["cid"] = batch[-1].id
        return batch

    def _tell(self, results: list[Result]) -> None:
        pass  # the fits read `self.told` when they are needed

    def _extra(self) -> tuple[np.ndarray, dict[str, Any]]:
        """A uniform point of the box while too few successes are told to fit."""
        return self.rng.uniform(self.lower, self.upper), {"phase": "extra"}

    def _next(self) -> tuple[np.ndarray, dict[str, Any]]:
        if self._queue:
            return self._queue.pop(0)
        if self.nested and not self._models:
            return self._start_nested()
        if self.nested and (len(self._models) > 1 or self._stage is not None):
            return self._nested_next()
        if not self._design_done:
            return self._start_design()
        _, x, y = self._told_ok()
        if len(y) < n_params(self.space.dim):
            return self._extra()
        self._round += 1
        if self._bayes_left > 0:
            self._bayes_left -= 1
            self._queue = self._bayes_round(x, y)
        else:
            self._queue = self._front_round(x, y)
        return self._queue.pop(0) if self._queue else self._extra()

    def _start_design(self) -> tuple[np.ndarray, dict[str, Any]]:
        """The initial design; after a nested run (one-hot points already asked) without one-hot points."""
        self._design_done = True
        self._round += 1 if self.nested else 0
        design = initial_design(self.space.dim, self.lower, self.upper, self.rng, one_hot=not self.nested,
                                **self.design_options)  # fmt: skip
        self._queue = [(x, {"phase": "design"}) for x in design]
        return self._queue.pop(0)

    def _start_nested(self) -> tuple[np.ndarray, dict[str, Any]]:
        """Nested MAP starts from the experts themselves: one model (and one-hot point) per gene."""
        k = self.space.dim
        hot = np.clip(np.eye(k), self.space.lower, self.space.upper)
        self._models = [{"vec": hot[i], "tasks": (i,), "cid": None, "predicted": None} for i in range(k)]
        self._queue = [(hot[i], {"phase": "design", "model": i}) for i in range(k)]
        return self._queue.pop(0)

    # ---------------------------------------------------------------------------- front
    def _front_round(self, x: np.ndarray, y: np.ndarray) -> list[tuple[np.ndarray, dict[str, Any]]]:
        labels = [str(j) for j in range(self.n_objectives)]
        fn = self._predictor(self._fit(x, y, labels))
        seed = int(self.rng.integers(2**31 - 1))
        fx, fy = surrogate_front(fn, self.lower, self.upper, seed=seed, population=self.population,
                                 generations=self.generations)  # fmt: skip
        fresh = self._not_asked(fx)
        fx, fy = fx[fresh], fy[fresh]
        if self.select == "hypervolume":
            picks = hypervolume_pick(fy, y, self.front_points)
        else:
            picks = spread_pick(fy, self.front_points)
        log.info("map: round %d: predicted front of %d points, asking %d", self._round, len(fx), len(picks))
        return [
            (
                fx[i],
                {"phase": "front", "predicted": dict(zip(labels, map(float, fy[i]))), "fit": self.fit_report},
            )
            for i in picks
        ]

    def _not_asked(self, xs: np.ndarray) -> np.ndarray:
        """Mask of points farther than 1e-3 of the box range from every asked genome."""
        asked = np.array([c.genome for c in self.asked.values()]).reshape(-1, self.space.dim)
        if not len(asked):
            return np.ones(len(xs), bool)
        span = np.where(self.upper > self.lower, self.upper - self.lower, 1.0)
        d = np.abs((xs[:, None, :] - asked[None, :, :]) / span).max(axis=2).min(axis=1)
        return d > 1e-3

    # ---------------------------------------------------------------------------- bayesian MAP
    def _bayes_round(self, x: np.ndarray, y: np.ndarray) -> list[tuple[np.ndarray, dict[str, Any]]]:
        labels = [str(j) for j in range(self.n_objectives)]
        models = self._fit(x, y, labels)
        k, bins = self.space.dim, self.bins
        _, angles = to_hyperspherical(x)
        cells = bin_of(angles, bins)
        probs = []
        for beta, link in models:  # where each objective's surrogate misses most
            sq = (y[:, len(probs)] - predict(beta, x, link)) ** 2
            probs.append(softmax(bin_scores(cells, sq, bins ** (k - 1), self.rng), self.temperature))
        out = []
        for j in range(self.bayes_points):  # the round's points go to the objectives in turn
            t = j % self.n_objectives
            point = bayes_sample(probs[t], bins, k, 1, self.rng)[0]
            out.append((np.clip(point, self.lower, self.upper), {"phase": "bayes", "task": t}))
        return out

    # ---------------------------------------------------------------------------- nested MAP
    def _model_score(self, m: dict[str, Any]) -> float | None:
        """Mean score of a model on its own tasks: told, else predicted (a merge in flight), else None."""
        r = self.told.get(m["cid"]) if m["cid"] else None
        if r is not None and not r.failed:
            return float(np.mean(r.objectives[list(m["tasks"])]))
        return m["predicted"]

    def _nested_next(self) -> tuple[np.ndarray, dict[str, Any]]:
        if self._stage is None:
            scored = [(i, s) for i, m in enumerate(self._models) if (s := self._model_score(m)) is not None]
            if len(scored) < 2:
                return self._extra()
            pairs = [(abs(a[1] - b[1]), a[0], b[0]) for a, b in itertools.combinations(scored, 2)]
            _, i, j = min(pairs)
            self._round += 1
            ab = initial_design(2, np.zeros(2), np.ones(2), self.rng, total=self.nested_points,
                                isotropic=self.nested_isotropic, one_hot=False)  # fmt: skip
            u, v = self._models[i]["vec"], self._models[j]["vec"]
            self._stage = {"pair": (i, j), "ab": ab, "ids": []}
            tasks = [list(self._models[i]["tasks"]), list(self._models[j]["tasks"])]
            self._queue = [(a * u + b * v, {"phase": "nested", "pair": tasks, "ab": [float(a), float(b)]})
                           for a, b in ab]  # fmt: skip
            return self._queue.pop(0)
        return self._nested_merge()

    def _nested_merge(self) -> tuple[np.ndarray, dict[str, Any]]:
        """Fit the stage's two side surrogates on (a, b), pick c on their front, merge the pair."""
        i, j = self._stage["pair"]
        mi, mj = self._models[i], self._models[j]
        sides = [list(mi["tasks"]), list(mj["tasks"])]
        ab, y = [], []
        for cid, c in self.asked.items():
            r = self.told.get(cid)
            if r is None or r.failed:
                continue
            if c.info.get("phase") == "nested" and c.info.get("pair") == sides:
                ab.append(c.info["ab"])
            elif cid == mi["cid"]:
                ab.append([1.0, 0.0])
            elif cid == mj["cid"]:
                ab.append([0.0, 1.0])
            else:
                continue
            y.append([float(np.mean(r.objectives[s])) for s in sides])
        if len(y) < n_params(2):
            return self._extra()
        ab_arr, y_arr = np.array(ab), np.array(y)
        labels = ["+".join(map(str, s)) for s in sides]
        fn = self._predictor(self._fit(ab_arr, y_arr, labels))
        seed = int(self.rng.integers(2**31 - 1))
        fx, fy = surrogate_front(fn, np.zeros(2), np.ones(2), seed=seed, population=self.population,
                                 generations=self.generations)  # fmt: skip
        pref = np.array([len(s) for s in sides], dtype=np.float64)
        best = int(np.argmax(linear_predictor(fy, pref / math.sqrt(math.fsum(pref * pref)))))
        a, b = fx[best]
        merged = {
            "vec": a * mi["vec"] + b * mj["vec"],
            "tasks": tuple(sorted(mi["tasks"] + mj["tasks"])),
            "cid": None,
            "predicted": math.fsum(fy[best] * pref) / math.fsum(pref),
        }
        self._models = [m for n, m in enumerate(self._models) if n not in (i, j)] + [merged]
        self._stage = None
        log.info("map nested: merged tasks %s + %s at a=%.3f b=%.3f (predicted %s)", *sides, a, b, fy[best])
        info = {"phase": "merge", "model": len(self._models) - 1, "pair": sides, "ab": [float(a), float(b)],
                "predicted_sides": dict(zip(labels, map(float, fy[best]))), "fit": self.fit_report}  # fmt: skip
        return np.clip(merged["vec"], self.space.lower, self.space.upper), info


STRATEGIES.add(MAP.name, MAP)
