"""Uniform random search: the short reference implementation of a strategy, written to be copied.

A strategy subclasses `Strategy` and fills two methods; the base class does the rest (ids, the asked and
told records, unknown or repeated ids, mapping NaN/inf and failures to `failed`, `best()`):

- `_ask(n)` returns n candidates built with `self.make_candidate(genome)`, which clips the genome into
  the space's box, decodes it into a Recipe and gives it a fresh id;
- `_tell(results)` learns from fresh results (each id told once; `r.failed` or `r.objectives`, an array
  of `n_objectives` finite values, all maximized; single-objective strategies use `self.scalar(...)`).

Every random draw comes from `self.rng` (seeded by the base class) or a generator derived from `seed`,
never from global state, so replaying the same ask/tell calls rebuilds the same state (resume relies on
it). Options are keyword arguments of `__init__`; an unknown one is a `StrategyError` naming it. The
class is registered under its `name` at the end of the module; `evomerge/strategies/__init__.py`
imports the module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from evomerge.space.base import Space
from evomerge.strategies.base import STRATEGIES, Candidate, Result, Strategy, StrategyError


class RandomSearch(Strategy):
    """Uniform points in the box `[space.lower, space.upper]`; a baseline and a smoke test."""

    name = "random"

    def __init__(self, space: Space, *, n_objectives: int = 1, seed: int = 0,
                 weights: Sequence[float] | None = None, budget: int | None = None,
                 **options: Any) -> None:  # fmt: skip
        if options:
            raise StrategyError(f"strategy {self.name!r} takes no options (got {', '.join(sorted(options))})")
        super().__init__(space, n_objectives=n_objectives, seed=seed, weights=weights, budget=budget)

    def _ask(self, n: int) -> list[Candidate]:
        return [self.make_candidate(self.space.sample(self.rng)) for _ in range(n)]

    def _tell(self, results: list[Result]) -> None:
        pass  # uniform sampling learns nothing; `self.told` (kept by the base class) serves best()


STRATEGIES.add(RandomSearch.name, RandomSearch)
