"""Cheap synthetic objectives of a recipe (no model): for tests, strategy sanity checks and scheduler
benchmarks. Use them with `evaluator: {type: function, function: "evomerge.evaluate.synthetic:<name>"}`."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from evomerge.merge.recipe import Recipe


def numeric_params(recipe: Recipe) -> np.ndarray:
    """Every number in the recipe's per-source and slice parameters, in recipe order."""
    values: list[float] = []

    def collect(params: dict[str, Any] | None) -> None:
        for v in (params or {}).values():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                values.append(float(v))

    for m in recipe.models or []:
        collect(m.parameters)
    for s in recipe.slices or []:
        collect(s.parameters)
        for src in s.sources:
            collect(src.parameters)
    return np.asarray(values)


def quadratic(recipe: Recipe, targets: list[list[float]] | None = None) -> dict[str, float]:
    """Objective k = -||x - targets[k]||^2 over the recipe's numbers x (maximum 0 at the target).
    Default: two targets, all 0.2 and all 0.8: a real trade-off with a known front."""
    x = numeric_params(recipe)
    targets = targets or [[0.2] * len(x), [0.8] * len(x)]
    return {f"q{k}": -float(np.sum((x - np.asarray(t)) ** 2)) for k, t in enumerate(targets)}


def sleep(recipe: Recipe, seconds: float = 0.0) -> dict[str, float]:
    """Wait `seconds` and return the quadratic objectives: a stand-in for a slow evaluator."""
    time.sleep(seconds)
    return quadratic(recipe)
