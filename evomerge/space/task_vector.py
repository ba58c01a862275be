"""TaskVectorSpace: one coefficient per source, theta(c) = theta0 + sum_i c_i tau_i (MAP, ALGORITHMS.md 4.6).

`decode` emits a task_arithmetic recipe (`models:`, weight c_i per source, lambda 1, normalize false);
`encode` reads any task_arithmetic recipe with scalar weights back (c_i = lambda * w_i). Driver side: no
torch, no tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import PurePath

import numpy as np

from evomerge.errors import ConfigError
from evomerge.merge.recipe import Conditional, ModelSource, Parameters, Recipe
from evomerge.space.base import Space
from evomerge.space.layerwise import check_genome, clip_encoded, scope_number, source_labels

METHOD = "task_arithmetic"


def _scalar(scopes: list[Parameters | None], name: str, where: str) -> float | bool | str | None:
    """The first scope's value of `name`, which must be one scalar (no gradient or filter list)."""
    for scope in scopes:
        if scope and name in scope:
            value = scope[name]
            if isinstance(value, (list, Conditional)):
                raise ConfigError(
                    f"{where}: {name} must be a single number for a task-vector space (got {value!r})"
                )
            return value
    return None


class TaskVectorSpace(Space):
    """Genes `weight/<label>` in [low, high], one per source; the base carries no gene."""

    def __init__(
        self,
        base: str | PurePath,
        sources: Sequence[str | PurePath] | Mapping[str, str | PurePath],
        low: float = 0.0,
        high: float = 1.0,
    ) -> None:
        if base is None:
            raise ConfigError("a task-vector space needs a base model")
        labels, refs = source_labels(sources)
        self.base = str(base)
        if self.base in refs:
            raise ConfigError(f"base {self.base} is also listed among the sources; give it only as base")
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ConfigError(f"task-vector space needs finite low < high (got low {low}, high {high})")
        self.labels, self.models = tuple(labels), tuple(refs)
        self.names = tuple(f"weight/{lab}" for lab in labels)
        self.lower = np.full(len(refs), float(low))
        self.upper = np.full(len(refs), float(high))

    def decode(self, x: np.ndarray) -> Recipe:
        x = self.clip(check_genome(x, self.names))
        return Recipe(
            merge_method=METHOD,
            base_model=self.base,
            models=[
                ModelSource(model=ref, parameters={"weight": float(c)}) for ref, c in zip(self.models, x)
            ],
            parameters={"lambda": 1.0, "normalize": False},
        )

    def encode(self, recipe: Recipe) -> np.ndarray:
        """c_i = lambda * w_i of a task_arithmetic recipe over the same base and sources (`models:` or one
        slice); normalize must be false. Values outside [low, high] are clipped (logged)."""
        if recipe.merge_method != METHOD:
            raise ConfigError(
                f"recipe uses method {recipe.merge_method!r}; a task-vector space needs {METHOD!r}"
            )
        if recipe.slices is not None and len(recipe.slices) != 1:
            raise ConfigError(f"recipe has {len(recipe.slices)} slices; a task-vector space encodes one")
        if recipe.slices is not None:
            slice_ = recipe.slices[0]
            entries = [(s.model, s.parameters) for s in slice_.sources]
            shared: list[Parameters | None] = [slice_.parameters, recipe.parameters]
            base = slice_.base_model or recipe.base_model
        else:
            entries = [(m.model, m.parameters) for m in recipe.models or []]
            shared, base = [recipe.parameters], recipe.base_model
        if base != self.base:
            raise ConfigError(f"recipe base_model is {base}; this space's base is {self.base}")
        given = {ref: params for ref, params in entries if ref != self.base}
        if set(given) != set(self.models):
            missing, extra = sorted(set(self.models) - set(given)), sorted(set(given) - set(self.models))
            raise ConfigError(
                "recipe models differ from the space's"
                + (f"; missing {', '.join(missing)}" if missing else "")
                + (f"; not in the space {', '.join(extra)}" if extra else "")
            )
        normalize = _scalar(shared, "normalize", "recipe")
        if normalize is not None and str(normalize).lower() not in ("false", "0"):
            raise ConfigError("recipe has normalize: true; a task-vector space encodes normalize: false")
        lam = _scalar(shared, "lambda", "recipe")
        lam = 1.0 if lam is None else scope_number(lam, "recipe: lambda")
        x = np.empty(len(self.models), dtype=np.float64)
        for i, ref in enumerate(self.models):
            w = _scalar([given[ref], *shared], "weight", f"{ref}")
            if w is None:
                raise ConfigError(f"{ref}: recipe gives no weight")
            x[i] = lam * scope_number(w, f"{ref}: weight")
        return clip_encoded(x, self.lower, self.upper, self.names)
