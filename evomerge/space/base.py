"""Search spaces: a genome vector <-> Recipe mapping with bounds and a name for every gene.

Strategies see only vectors x with lower <= x <= upper; the space turns a vector into a Recipe (pure,
deterministic) and, where possible, a Recipe back into a vector (to seed a search from a mergekit YAML).
Driver side: no torch, no tensors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from evomerge.merge.recipe import Recipe


class Space(ABC):
    """A box-bounded genome space. Subclasses set `names`, `lower`, `upper` and implement decode/encode."""

    names: tuple[str, ...]
    lower: np.ndarray
    upper: np.ndarray

    @property
    def dim(self) -> int:
        return len(self.names)

    def clip(self, x: np.ndarray) -> np.ndarray:
        return np.clip(np.asarray(x, dtype=np.float64), self.lower, self.upper)

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """A uniform random point of the box."""
        return rng.uniform(self.lower, self.upper)

    def initial(self) -> np.ndarray:
        """A sensible starting point (defaults to the box centre)."""
        return (self.lower + self.upper) / 2

    @abstractmethod
    def decode(self, x: np.ndarray) -> Recipe:
        """The recipe of genome x (x is clipped into the box first)."""

    def encode(self, recipe: Recipe) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} cannot encode recipes")
