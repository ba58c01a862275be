"""Pareto tools over objective vectors that are all maximized (negate losses first)."""

from __future__ import annotations

import numpy as np


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
