"""Search strategies: ask/tell over candidates of a `Space`, registered by name in `STRATEGIES`.

    strategy = STRATEGIES.get("cma")(space, n_objectives=2, seed=0, weights=None, budget=100, **options)
    batch = strategy.ask(2)                              # Candidates: id, genome, recipe
    strategy.tell([Result(batch[0].id, np.array([0.7, 0.4])), Result(batch[1].id, None, failed=True)])

Contract (`base.py`): one constructor shape, options as keywords (an unknown one is a `StrategyError`);
objectives are maximized; single-objective strategies (`multi_objective = False`) see the weighted sum;
every asked candidate is told once (failures included); a strategy is a pure function of its seed and the
sequence of ask(n)/tell calls, so replaying a journal rebuilds it exactly (resume). `random.py` is the
short reference implementation to copy. nevergrad and optuna are imported when a strategy is built.

- random: uniform in the box (`random.py`)
- cma, ngopt: nevergrad, single objective (`nevergrad.py`)
- nsga2, nsga3, tpe: optuna, multi-objective (`optuna.py`)
- m2n2: Model Merging of Natural Niches over a model space (`m2n2.py`)
- genome: GENOME / GENOME+ (population, linear crossover, mutation, PSO succession) over a model space (`genome.py`)
"""

from evomerge.strategies import genome, m2n2, map, nevergrad, optuna, random
from evomerge.strategies.base import STRATEGIES, Candidate, Result, Strategy, StrategyError

__all__ = [
    "STRATEGIES",
    "Candidate",
    "Result",
    "Strategy",
    "StrategyError",
    "genome",
    "m2n2",
    "map",
    "nevergrad",
    "optuna",
    "random",
]
