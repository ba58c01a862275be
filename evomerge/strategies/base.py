"""The ask/tell contract every search strategy implements.

    strategy = STRATEGIES.get("cma")(space, n_objectives=2, seed=0, **options)
    batch = strategy.ask(2)                  # Candidates: id, genome (or recipe), parents, generation
    strategy.tell([Result(batch[0].id, np.array([0.7, 0.4])),
                   Result(batch[1].id, None, failed=True)])
    strategy.best()

Rules the base class enforces (nevergrad/optuna style bookkeeping): ids are unique and come from the
strategy; telling an unknown id is an error; telling an id twice is a logged no-op; a failed or non-finite
result is mapped once, here, to `failed`. Objectives are always maximized (negate losses before telling).

Reduced fidelity (`fidelity.racing` / `fidelity.estimator` in the run YAML): a strategy is told what the
evaluation produced. Under racing a stopped candidate is told its mean on the items it saw (its rung's prefix);
under an estimator every candidate is told its estimated full score. Vector strategies (cma, ngopt, nsga2,
nsga3, tpe, random, map, genome) treat these values as noisy fitness like any other; m2n2 sets
`needs_all_items` and the run refuses fidelity settings for it.

Determinism: a strategy is a pure function of (seed, the sequence of ask(n)/tell(ids) calls, the told
values). Resume relies on this: replaying the journal's calls in order rebuilds the exact state, and the
replayed asks must return the same genomes (the runtime checks it). Concurrency is the scheduler's job.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.merge.mixture import AnyRecipe, candidate_recipe
from evomerge.merge.recipe import Recipe
from evomerge.registry import Registry
from evomerge.space.base import Space

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    """One point to evaluate. `genome` for vector spaces; `recipe` is what a worker merges (a mergekit
    `Recipe`, or a model-space `Mixture`/`Offspring`)."""

    id: str
    recipe: AnyRecipe
    genome: np.ndarray | None = None
    parents: tuple[str, ...] = ()
    generation: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "recipe": self.recipe.to_dict(),
            "genome": None if self.genome is None else [float(v) for v in self.genome],
            "parents": list(self.parents),
            "generation": self.generation,
            "info": self.info,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Candidate:
        genome = data.get("genome")
        return cls(
            id=data["id"],
            recipe=candidate_recipe(data["recipe"]),
            genome=None if genome is None else np.asarray(genome, dtype=np.float64),
            parents=tuple(data.get("parents", ())),
            generation=int(data.get("generation", 0)),
            info=dict(data.get("info", {})),
        )


@dataclass(frozen=True)
class Result:
    """What a strategy is told: the objective vector (maximized), or failed."""

    id: str
    objectives: np.ndarray | None
    failed: bool = False
    samples: np.ndarray | None = None  # per-sample scores (row of the score matrix), for niche strategies


class StrategyError(EvomergeError):
    pass


class Strategy(ABC):
    """Base class: bookkeeping in ask/tell, the algorithm in _ask/_tell."""

    name: ClassVar[str]
    multi_objective: ClassVar[bool] = False  # False: told the weighted sum of objectives
    # Why the strategy needs every candidate's per-item scores on all items (so refuses racing and estimators);
    # empty: it takes what fidelity gives it (see the module docstring).
    needs_all_items: ClassVar[str] = ""

    def __init__(self, space: Space, *, n_objectives: int = 1, seed: int = 0,
                 weights: Sequence[float] | None = None, budget: int | None = None) -> None:  # fmt: skip
        self.space = space
        self.n_objectives = n_objectives
        self.seed = seed
        self.budget = budget
        self.weights = np.ones(n_objectives) if weights is None else np.asarray(weights, dtype=np.float64)
        if self.weights.shape != (n_objectives,):
            raise StrategyError(f"{len(self.weights)} objective weights for {n_objectives} objectives")
        self.rng = np.random.default_rng(seed)
        self.asked: dict[str, Candidate] = {}
        self.told: dict[str, Result] = {}
        self._count = 0

    def _new_id(self) -> str:
        self._count += 1
        return f"c{self._count:05d}"

    def make_candidate(self, genome: np.ndarray | None = None, *, recipe: Recipe | None = None,
                       parents: tuple[str, ...] = (), generation: int = 0, **info: Any) -> Candidate:  # fmt: skip
        """A candidate with a fresh id; vector strategies give a genome, decoded by the space."""
        if recipe is None:
            genome = self.space.clip(genome)
            recipe = self.space.decode(genome)
        return Candidate(self._new_id(), recipe, genome, parents, generation, info)

    def ask(self, n: int = 1) -> list[Candidate]:
        if n < 1:
            raise StrategyError(f"ask needs n >= 1 (got {n})")
        batch = self._ask(n)
        for c in batch:
            self.asked[c.id] = c
        return batch

    def tell(self, results: Sequence[Result]) -> None:
        for r in results:  # check the whole batch first: a bad result leaves the strategy untouched
            if r.id not in self.asked:
                raise StrategyError(f"tell: unknown candidate id {r.id!r}")
            if not r.failed and r.objectives is not None and np.shape(r.objectives) != (self.n_objectives,):
                raise StrategyError(
                    f"tell: expected {self.n_objectives} objectives for {r.id}, got {np.shape(r.objectives)}"
                )
        fresh = []
        for r in results:
            if r.id in self.told:
                log.info("tell: %s was already told; ignoring the repeat", r.id)
                continue
            if not r.failed and (r.objectives is None or not np.all(np.isfinite(r.objectives))):
                r = Result(r.id, None, failed=True, samples=r.samples)
            self.told[r.id] = r
            fresh.append(r)
        if fresh:
            self._tell(fresh)

    def scalar(self, objectives: np.ndarray) -> float:
        """Weighted sum of the objectives (what single-objective strategies maximize)."""
        return float(np.dot(self.weights, objectives))

    def best(self) -> tuple[Candidate, Result] | None:
        """The told candidate with the highest weighted objective."""
        ok = [r for r in self.told.values() if not r.failed]
        if not ok:
            return None
        r = max(ok, key=lambda r: self.scalar(r.objectives))
        return self.asked[r.id], r

    @abstractmethod
    def _ask(self, n: int) -> list[Candidate]: ...

    @abstractmethod
    def _tell(self, results: list[Result]) -> None: ...


STRATEGIES: Registry[type[Strategy]] = Registry("strategy")
