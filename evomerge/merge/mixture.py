"""Model-space recipes: members of niche-preserving searches (M2N2, GENOME) as exact, rebuildable recipes.

A merge in model space is not a mergekit method with a few knobs: after a few generations of split-point
crossover a member is a different linear combination of the sources in every stretch of its parameters.
Two recipe kinds express that without the driver ever holding weights:

- `Mixture`: piecewise-constant coefficients over the resident pool along the **flat order** (the target
  model's parameters in module order, each row-major; see `FlatLayout`). Segment `i` covers flat indices
  `[starts[i], starts[i+1])` and holds one coefficient per model: `x[j] = sum_k c_{i,k} theta_k[j]`. A
  worker applies it with one `torch.mv` per (tensor, segment) into the target. Any split-point SLERP child
  of two mixtures is again a mixture (the driver computes its coefficients from pool Gram matrices), so an
  LLM search needs no storage beyond the pool.
- `Offspring`: a child built from one or two *stored* members (directories of the member store in the run
  dir) by the reference M2N2 crossover plus seeded Gaussian noise, then saved to the store. Mutation adds a
  fresh noise vector every generation, so as a mixture a member would carry one noise term per mutated
  ancestor (tens of thousands in a from-scratch run); storing members keeps each recipe constant-size and
  still exact: rebuilding = applying the recipe to the stored parents.

`candidate_recipe(d)` parses any recipe a journal holds (mergekit `Recipe`, `Mixture`, `Offspring`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator

from evomerge.errors import ConfigError
from evomerge.merge.recipe import Recipe


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def referenced_models(self) -> list[str]:
        return list(getattr(self, "models", None) or getattr(self, "parents", []))


class Mixture(_Frozen):
    """Per-segment linear combination of pool models over the flat parameter order."""

    kind: Literal["mixture"] = "mixture"
    models: list[str]
    size: int
    starts: list[int]
    coefficients: list[list[float]]

    @model_validator(mode="after")
    def _check(self) -> Mixture:
        if not self.models:
            raise ValueError("a mixture needs at least one model")
        if not self.starts or self.starts[0] != 0 or self.starts[-1] >= self.size:
            raise ValueError(f"segment starts must begin at 0 and stay below size {self.size}")
        if any(b <= a for a, b in zip(self.starts, self.starts[1:])):
            raise ValueError("segment starts must be strictly increasing")
        if len(self.coefficients) != len(self.starts):
            raise ValueError(f"{len(self.coefficients)} coefficient rows for {len(self.starts)} segments")
        for row in self.coefficients:
            if len(row) != len(self.models) or not all(math.isfinite(v) for v in row):
                raise ValueError(f"each segment needs {len(self.models)} finite coefficients (got {row})")
        return self

    def segment_bounds(self) -> list[tuple[int, int]]:
        ends = [*self.starts[1:], self.size]
        return list(zip(self.starts, ends))

    def dense(self) -> np.ndarray:
        """Coefficients per flat index, `[size, K]` (small models and tests only)."""
        out = np.empty((self.size, len(self.models)))
        for (lo, hi), row in zip(self.segment_bounds(), self.coefficients):
            out[lo:hi] = row
        return out


class Offspring(_Frozen):
    """M2N2 child of stored members: `t[i] = weight` for `i < split` else `1 - weight` (the weight of parent
    b); SLERP with one global angle (or linear when `slerp` is false or the angle is degenerate); one parent
    = a copy. Then `+ N(0, noise_std^2)` from `noise_seed`, and the result is saved to `save`."""

    kind: Literal["offspring"] = "offspring"
    parents: list[str]
    size: int
    weight: float = 0.5
    split: int | None = None
    slerp: bool = True
    noise_seed: int | None = None
    noise_std: float = 0.0
    save: str

    @model_validator(mode="after")
    def _check(self) -> Offspring:
        if len(self.parents) not in (1, 2):
            raise ValueError(f"offspring needs one or two parents (got {len(self.parents)})")
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"offspring weight must be in [0, 1] (got {self.weight})")
        if self.split is not None and not 0 <= self.split <= self.size:
            raise ValueError(f"split {self.split} outside [0, {self.size}]")
        if self.noise_std < 0 or (self.noise_std > 0 and self.noise_seed is None):
            raise ValueError("noise needs noise_std >= 0 and a noise_seed")
        return self


AnyRecipe = Recipe | Mixture | Offspring


def candidate_recipe(data: Mapping[str, Any] | AnyRecipe) -> AnyRecipe:
    """The recipe of a journal/candidate dict, by its `kind` (no kind: a mergekit recipe)."""
    if isinstance(data, (Recipe, Mixture, Offspring)):
        return data
    kind = data.get("kind")
    if kind == "mixture":
        return Mixture.model_validate(data)
    if kind == "offspring":
        return Offspring.model_validate(data)
    if kind is not None:
        raise ConfigError(f"unknown recipe kind {kind!r} (known: mixture, offspring, or a mergekit recipe)")
    return Recipe.model_validate(data)


@dataclass(frozen=True)
class FlatLayout:
    """Where each tensor sits in the flat order: tensors in the target model's parameter order, restricted
    to floating tensors every pool model has with the model's shape; each contributes `numel` elements."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    size: int

    @classmethod
    def build(
        cls, params: Iterable[tuple[str, Sequence[int]]], pool_shapes: Sequence[Mapping[str, Any]]
    ) -> FlatLayout:
        names, shapes, offsets, total = [], [], [], 0
        for name, shape in params:
            shape = tuple(int(d) for d in shape)
            if all(name in s and tuple(s[name]) == shape for s in pool_shapes):
                names.append(name)
                shapes.append(shape)
                offsets.append(total)
                total += math.prod(shape)
        if not names:
            raise ConfigError("no tensor is shared by the target model and every pool model")
        return cls(tuple(names), tuple(shapes), tuple(offsets), total)

    def tensor_bounds(self) -> list[int]:
        """Flat index of every tensor start, plus the end."""
        return [*self.offsets, self.size]

    def pieces(self, starts: Sequence[int]) -> Iterable[tuple[int, int, int, int]]:
        """(tensor index, segment index, lo, hi) in tensor-local indices, for segments starting at `starts`."""
        seg = 0
        ends = [*starts[1:], self.size]
        for t, (off, shape) in enumerate(zip(self.offsets, self.shapes)):
            n = math.prod(shape)
            while ends[seg] <= off:
                seg += 1
            s = seg
            while s < len(starts) and starts[s] < off + n:
                yield t, s, max(starts[s], off) - off, min(ends[s], off + n) - off
                s += 1


def chunk_boundaries(layout: FlatLayout, chunk: str | int) -> np.ndarray:
    """Allowed split points (ascending, 0 and size included): tensor starts (`"tensor"`), or multiples of
    a block of `chunk` elements (1 = any element, the reference's exact split points)."""
    if chunk == "tensor":
        return np.asarray(layout.tensor_bounds(), dtype=np.int64)
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ConfigError(f"chunk must be 'tensor' or a block size >= 1 (got {chunk!r})")
    return np.unique(np.append(np.arange(0, layout.size, chunk, dtype=np.int64), layout.size))


def snap_split(s: int, boundaries: np.ndarray) -> int:
    """The chunk boundary at or below flat index `s` (so each chunk gets one interpolation weight)."""
    return int(boundaries[np.searchsorted(boundaries, s, side="right") - 1])
