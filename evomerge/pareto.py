"""Pareto tools over objective vectors that are all maximized (negate losses first).

Owns dominance, non-dominated sorting, crowding distance, hypervolume, IGD+ and the knee point
(docs: ALGORITHMS.md section 5). Pure numpy functions over an ``(n, m)`` array of n points and m
objectives; no logging, no state. Bad input (NaN or inf, wrong shape, mismatched dimensions) is a
``ValueError`` naming the argument.

Conventions:

- **Maximization.** ``a`` dominates ``b`` iff ``a >= b`` everywhere and ``a > b`` somewhere. Exact
  duplicates: the first (lowest index) stays on the front, later copies count as dominated by it,
  so every front holds distinct points and ``non_dominated_sort(p)[0]`` matches ``non_dominated(p)``.
- **Reference point r** (hypervolume): r must be worse than every point of interest. For scores
  in [0, 1] (accuracies) use the zero vector; otherwise ``reference_point(all_evaluated)``, i.e.
  the per-objective minimum minus 1% of the range. **Record r with the value and never change it
  within a run**: hypervolumes under different r are not comparable, and a progress curve with a
  moving r is meaningless. A point not strictly better than r in every objective contributes
  nothing.
- **Normalization.** Hypervolume, IGD+ and crowding distance work in raw objective units (crowding
  divides each objective by its range over the front itself). Only ``knee_point`` normalizes, to
  [0, 1] over the front, because a knee must not depend on the units of the objectives. To compare
  hypervolumes across runs, normalize the objectives with fixed bounds before calling, not after.
- **>= 3 objectives**: the hypervolume is computed by moocore (minimization, so it is given
  ``-points`` and ``-r``); 1-D and 2-D are exact closed forms here.
"""

from __future__ import annotations

import numpy as np

# Pairwise comparisons are done in row blocks so memory stays ~O(block * n * m), not O(n^2 * m).
_BLOCK = 512


def dominates(a: np.ndarray, b: np.ndarray) -> bool:
    """a dominates b: no worse in every objective and better in at least one."""
    return bool(np.all(a >= b) and np.any(a > b))


def non_dominated(points: np.ndarray) -> np.ndarray:
    """Boolean mask of the first front. Exact duplicates: the first (lowest index) stays on the front."""
    points = np.asarray(points, dtype=np.float64)
    n = len(points)
    mask = np.ones(n, dtype=bool)
    for i in range(n):
        if not mask[i]:
            continue
        p = points[i]
        dominated_by_others = np.all(points >= p, axis=1) & np.any(points > p, axis=1)
        duplicate_before = np.all(points[:i] == p, axis=1)
        if dominated_by_others.any() or duplicate_before.any():
            mask[i] = False
    return mask


# ----------------------------------------------------------------------------- validation


def _float_array(value: object, name: str) -> np.ndarray:
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: cannot convert to a float array ({e})") from None


def _as_points(points: object, name: str = "points", *, allow_empty: bool = True) -> np.ndarray:
    """Float (n, m) array with m >= 1 and finite values; the one place input is checked."""
    arr = _float_array(points, name)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (n points, m objectives), got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise ValueError(f"{name}: need at least one objective, got shape {arr.shape}")
    if arr.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name}: need at least one point, got shape {arr.shape}")
    bad = ~np.isfinite(arr)
    if bad.any():
        row = int(np.flatnonzero(bad.any(axis=1))[0])
        raise ValueError(f"{name}: NaN or inf in row {row}: {arr[row].tolist()}")
    return arr


def _as_ref(ref: object, m: int) -> np.ndarray:
    """Finite reference point of length m (the points' number of objectives)."""
    r = _float_array(ref, "ref")
    if r.ndim != 1:
        raise ValueError(f"ref: expected a 1-D array of length {m}, got shape {r.shape}")
    if len(r) != m:
        raise ValueError(f"ref: has {len(r)} objectives, points have {m}")
    if not np.isfinite(r).all():
        raise ValueError(f"ref: NaN or inf in {r.tolist()}")
    return r


# ----------------------------------------------------------------------------- sorting


def _domination_matrix(points: np.ndarray) -> np.ndarray:
    """D[i, j]: i dominates j, or i is an earlier exact duplicate of j (so copies fall to later fronts)."""
    n = len(points)
    d = np.empty((n, n), dtype=bool)
    later = np.arange(n)[None, :]
    for start in range(0, n, _BLOCK):
        block = points[start : start + _BLOCK, None, :]
        ge = np.all(block >= points[None, :, :], axis=2)
        gt = np.any(block > points[None, :, :], axis=2)
        earlier = np.arange(start, start + len(block))[:, None] < later
        d[start : start + len(block)] = ge & (gt | earlier)
    return d


def non_dominated_sort(points: np.ndarray) -> list[np.ndarray]:
    """Deb's fast non-dominated sort: fronts F1, F2, ... as ascending index arrays.

    Vectorized pairwise comparison (O(m n^2) time, O(n^2) bools): fine up to a few thousand points.
    Exact duplicates: a later copy counts as dominated by the first ("dominated-equal"), so the
    k-th copy lands k - 1 fronts later and still dominates what its original dominates: every
    front stays an antichain of distinct points, and Deb's layering holds for copies too.
    """
    pts = _as_points(points)
    n = len(pts)
    if n == 0:
        return []
    dom = _domination_matrix(pts)
    count = dom.sum(axis=0)  # how many points dominate j
    remaining = np.ones(n, dtype=bool)
    fronts: list[np.ndarray] = []
    while remaining.any():
        front = np.flatnonzero(remaining & (count == 0))
        # Cannot be empty: dominance (with the index tie-break) is a strict partial order.
        fronts.append(front)
        remaining[front] = False
        count = count - dom[front].sum(axis=0)
    return fronts


def crowding_distance(points: np.ndarray) -> np.ndarray:
    """NSGA-II crowding distance of each point within one front (larger = more isolated).

    Per objective, sorted ascending: the two ends get +inf (they anchor the front's extent); an
    interior point adds (next - previous) / (max - min). An objective with max == min carries no
    spread information and is skipped entirely. Sorting is stable, so among tied values the lowest
    index takes the low end and the highest index the high end. With <= 2 points all are +inf.
    """
    pts = _as_points(points)
    n, m = pts.shape
    dist = np.zeros(n)
    if n <= 2:
        dist[:] = np.inf
        return dist
    for k in range(m):
        f = pts[:, k]
        span = f.max() - f.min()
        if span <= 0:
            continue
        order = np.argsort(f, kind="stable")
        dist[order[1:-1]] += (f[order[2:]] - f[order[:-2]]) / span
        dist[order[0]] = dist[order[-1]] = np.inf
    return dist


# ----------------------------------------------------------------------------- hypervolume


def _hv_2d(pts: np.ndarray, ref: np.ndarray) -> float:
    """Exact 2-D sweep over points already strictly better than ref.

    Sorted by f1 descending, each point adds the strip (f1 - r1) x (f2 - best f2 so far), so
    dominated points and duplicates add zero without being removed first.
    """
    order = np.lexsort((-pts[:, 1], -pts[:, 0]))
    f1, f2 = pts[order, 0], pts[order, 1]
    prev = np.maximum.accumulate(np.concatenate(([ref[1]], f2)))[:-1]
    return float(np.sum((f1 - ref[0]) * np.maximum(f2 - prev, 0.0)))


def _hv(pts: np.ndarray, ref: np.ndarray) -> float:
    """Hypervolume of validated input: drop points not strictly better than ref, then dispatch."""
    pts = pts[np.all(pts > ref, axis=1)]
    if len(pts) == 0:
        return 0.0
    m = pts.shape[1]
    if m == 1:
        return float(pts[:, 0].max() - ref[0])
    if m == 2:
        return _hv_2d(pts, ref)
    import moocore  # lazy: only >= 3 objectives need it

    return float(moocore.hypervolume(-pts, ref=-ref))


_HV_MAX_OBJECTIVES = 31  # moocore 0.3's compiled MOOCORE_HV_DIMENSION_MAX (private attribute there)


def _check_hv_dims(m: int) -> None:
    """moocore's limit on objectives, raised up front as a ValueError naming the count."""
    if m > _HV_MAX_OBJECTIVES:
        raise ValueError(f"hypervolume: at most {_HV_MAX_OBJECTIVES} objectives, got {m}")


def hypervolume(points: np.ndarray, ref: np.ndarray) -> float:
    """Volume of the region dominated by points and bounded below by ref (maximization).

    Points not strictly better than ref in every objective contribute nothing: they are dropped
    before any algorithm sees them, so the result never depends on how a library treats points
    beyond r. Dominated points and duplicates are harmless. 1-D: max - r; 2-D: exact sweep;
    >= 3-D: moocore on -points, -r.
    """
    pts = _as_points(points)
    r = _as_ref(ref, pts.shape[1])
    _check_hv_dims(pts.shape[1])
    return _hv(pts, r)


def reference_point(points: np.ndarray, margin: float = 0.01) -> np.ndarray:
    """Per-objective min over all evaluated points minus margin * range.

    The margin keeps the worst points strictly better than r, so they still count. A zero range
    uses margin * max(1, |min|) instead, so r never coincides with the points. Compute it once
    from the first evaluations (or from known bounds), **record r with the value and never change
    it within a run**.
    """
    pts = _as_points(points, allow_empty=False)
    if not (np.isfinite(margin) and margin > 0):
        raise ValueError(f"margin: must be a finite number > 0, got {margin}")
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    span = hi - lo
    pad = np.where(span > 0, margin * span, margin * np.maximum(1.0, np.abs(lo)))
    return lo - pad


def hypervolume_history(points_in_order: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Hypervolume after each evaluation (a search-progress curve under a fixed r).

    Incremental: keep the current non-dominated archive; a new point that is worse than r or
    weakly dominated adds 0; otherwise it adds its exclusive contribution, box(p) - HV(archive
    clipped to p), and the points it dominates leave the archive. The curve is non-decreasing by
    construction. Cost per step is one hypervolume of the archive (2-D sweep or moocore).
    """
    pts = _as_points(points_in_order, "points_in_order")
    n, m = pts.shape
    r = _as_ref(ref, m)
    _check_hv_dims(m)
    out = np.zeros(n)
    archive = np.empty((0, m))
    total = 0.0
    for i, p in enumerate(pts):
        if np.all(p > r) and not np.any(np.all(archive >= p, axis=1)):
            box = float(np.prod(p - r))
            covered = _hv(np.minimum(archive, p), r) if len(archive) else 0.0
            total += max(box - covered, 0.0)
            archive = np.vstack([archive[~np.all(p >= archive, axis=1)], p])
        out[i] = total
    return out


# ----------------------------------------------------------------------------- indicators


def igd_plus(front: np.ndarray, reference_front: np.ndarray) -> float:
    """IGD+ of front against reference_front Z (lower is better; 0 iff front covers Z).

    Maximization: d+(z, a) = sqrt(sum_k max(z_k - a_k, 0)^2), so only the shortfall of a below z
    counts; IGD+ = mean over z in Z of min over a in front of d+(z, a). Unlike plain IGD it is
    weakly Pareto compliant: a front that weakly dominates another never scores worse.
    """
    a = _as_points(front, "front", allow_empty=False)
    z = _as_points(reference_front, "reference_front", allow_empty=False)
    if a.shape[1] != z.shape[1]:
        raise ValueError(f"front has {a.shape[1]} objectives, reference_front has {z.shape[1]}")
    best = np.empty(len(z))
    for start in range(0, len(z), _BLOCK):
        short = np.maximum(z[start : start + _BLOCK, None, :] - a[None, :, :], 0.0)
        best[start : start + _BLOCK] = np.sqrt(np.sum(short**2, axis=2)).min(axis=1)
    return float(best.mean())


def knee_point(points: np.ndarray) -> int:
    """Index (into points) of the knee of the first front: the best-balanced trade-off.

    Only the non-dominated points are candidates. Their objectives are normalized to [0, 1] over
    the front (so units do not matter); the knee is the point farthest beyond the hyperplane
    through the per-objective extreme points, measured toward the ideal point (1, ..., 1), so a
    point in a concave dent is never chosen over the extremes. 2-D: the line through the two ends.
    Fronts of 1 or 2 points, or extremes that do not span a hyperplane: best normalized sum.
    Ties (within 1e-12): lowest index.
    """
    pts = _as_points(points, allow_empty=False)
    idx = np.flatnonzero(non_dominated(pts))
    f = pts[idx]
    lo, hi = f.min(axis=0), f.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    x = (f - lo) / span
    score = x.sum(axis=1)
    if len(x) > 2:
        extremes = x[np.argmax(x, axis=0)]  # argmax: lowest index among ties
        w, _, rank, _ = np.linalg.lstsq(extremes, np.ones(x.shape[1]), rcond=None)
        if rank == x.shape[1] and np.linalg.norm(w) > 0:
            # Plane {x: w.x = 1}; signed so the ideal point (all ones) is on the positive side.
            sign = 1.0 if w.sum() >= 1.0 else -1.0
            score = sign * (x @ w - 1.0) / np.linalg.norm(w)
    best = np.flatnonzero(score >= score.max() - 1e-12)
    return int(idx[best[0]])
