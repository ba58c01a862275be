"""Multi-objective strategies wrapping optuna samplers: "nsga2", "nsga3" and "tpe" (ALGORITHMS.md 4.7).

They get the whole objective vector: an in-memory study with every direction "maximize", driven by optuna's
ask/tell API. Each ask is `study.ask()` then one `trial.suggest_float(name, low, high)` per gene (names
from `space.names`, in order); a result is told as `study.tell(trial, values)`, a failed one as
`study.tell(trial, state=TrialState.FAIL)` (optuna then leaves it out of populations and models).

Determinism: each sampler is seeded with `seed` and keeps its own generators; genetic samplers keep their
generations and parent populations in the study's storage, so replaying the same ask/tell calls into a
fresh study (same trial numbers, same states, same values, same running trials) rebuilds the same state
and gives the same next asks. No global generator is involved.

Logging: optuna logs through its own handler on the "optuna" logger (which does not propagate to the
root logger); the first strategy built lowers that logger from optuna's default INFO to WARNING, so
"study created" lines do not flood the run. A level set by the user other than INFO is left alone, and
the root logger is never touched.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np

from evomerge.space.base import Space
from evomerge.strategies.base import STRATEGIES, Candidate, Result, Strategy, StrategyError

_quieted = False


def _quiet_optuna(optuna: Any) -> None:
    global _quieted
    if not _quieted:
        _quieted = True
        if optuna.logging.get_verbosity() == optuna.logging.INFO:
            optuna.logging.set_verbosity(optuna.logging.WARNING)


def _unknown_options(name: str, unknown: dict[str, Any], known: Sequence[str]) -> StrategyError:
    return StrategyError(
        f"strategy {name!r}: unknown option(s) {', '.join(sorted(unknown))}; it takes {', '.join(known)}"
    )


def _check_int(name: str, option: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise StrategyError(f"strategy {name!r}: {option} must be an integer >= {low} (got {value!r})")


class _OptunaStrategy(Strategy):
    """An optuna study behind the ask/tell contract; subclasses give the sampler."""

    multi_objective = True

    def __init__(self, space: Space, *, n_objectives: int, seed: int, weights: Sequence[float] | None,
                 budget: int | None, sampler: Callable[[Any], Any]) -> None:  # fmt: skip
        super().__init__(space, n_objectives=n_objectives, seed=seed, weights=weights, budget=budget)
        if len(set(space.names)) != len(space.names):
            dup = sorted({n for n in space.names if space.names.count(n) > 1})
            raise StrategyError(
                f"strategy {self.name!r}: gene names must be unique (repeated: {', '.join(dup)})"
            )
        import optuna

        _quiet_optuna(optuna)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.study = optuna.create_study(sampler=sampler(optuna), directions=["maximize"] * n_objectives)
        self._fail = optuna.trial.TrialState.FAIL
        self._running = (optuna.trial.TrialState.RUNNING,)
        self._trials: dict[str, Any] = {}  # candidate id -> optuna Trial, until told
        self._bounds = [(n, float(lo), float(hi)) for n, lo, hi in zip(space.names, space.lower, space.upper)]

    def _generation(self, trial: Any) -> int:
        get = getattr(self.study.sampler, "get_trial_generation", None)  # genetic samplers only
        if get is None:
            return 0
        frozen = next(
            t for t in self.study.get_trials(deepcopy=False, states=self._running) if t.number == trial.number
        )
        return int(get(self.study, frozen))

    def _ask(self, n: int) -> list[Candidate]:
        batch = []
        for _ in range(n):
            trial = self.study.ask()
            x = np.array([trial.suggest_float(name, lo, hi) for name, lo, hi in self._bounds])
            c = self.make_candidate(x, generation=self._generation(trial), trial=trial.number)
            self._trials[c.id] = trial
            batch.append(c)
        return batch

    def _tell(self, results: list[Result]) -> None:
        for r in results:
            trial = self._trials.pop(r.id)
            if r.failed:
                self.study.tell(trial, state=self._fail)
            else:
                self.study.tell(trial, [float(v) for v in r.objectives])


class _NSGA(_OptunaStrategy):
    """Shared constructor of the NSGA variants; they differ only in optuna's sampler class."""

    sampler_class: ClassVar[str]

    def __init__(self, space: Space, *, n_objectives: int = 1, seed: int = 0,
                 weights: Sequence[float] | None = None, budget: int | None = None,
                 population_size: int = 50, **unknown: Any) -> None:  # fmt: skip
        if unknown:
            raise _unknown_options(self.name, unknown, ["population_size"])
        _check_int(self.name, "population_size", population_size, 2)
        self.population_size = population_size
        sampler_class = self.sampler_class

        def sampler(optuna: Any) -> Any:
            return getattr(optuna.samplers, sampler_class)(seed=seed, population_size=population_size)

        super().__init__(space, n_objectives=n_objectives, seed=seed, weights=weights, budget=budget,
                         sampler=sampler)  # fmt: skip


class NSGA2(_NSGA):
    """NSGA-II (Deb et al. 2002) via optuna's `NSGAIISampler`: non-dominated sorting and crowding distance,
    uniform crossover, steady-state generations of `population_size` completed trials.

    Options: `population_size` (default 50, optuna's; the first generation is uniform random).
    """

    name = "nsga2"
    sampler_class = "NSGAIISampler"


class NSGA3(_NSGA):
    """NSGA-III (Deb & Jain 2014) via optuna's `NSGAIIISampler`: NSGA-II with reference-point niching
    instead of crowding distance (for three or more objectives).

    Options: `population_size` (default 50, optuna's).
    """

    name = "nsga3"
    sampler_class = "NSGAIIISampler"


class TPE(_OptunaStrategy):
    """Multivariate TPE (Bergstra et al. 2011; MOTPE for several objectives) via optuna's `TPESampler`.
    Running trials are imputed (optuna's constant liar), so asynchronous asks spread out.

    Options: `n_startup_trials` (default 10, optuna's): uniform random trials before the model is used.
    """

    name = "tpe"

    def __init__(self, space: Space, *, n_objectives: int = 1, seed: int = 0,
                 weights: Sequence[float] | None = None, budget: int | None = None,
                 n_startup_trials: int = 10, **unknown: Any) -> None:  # fmt: skip
        if unknown:
            raise _unknown_options(self.name, unknown, ["n_startup_trials"])
        _check_int(self.name, "n_startup_trials", n_startup_trials, 0)
        self.n_startup_trials = n_startup_trials

        def sampler(optuna: Any) -> Any:
            return optuna.samplers.TPESampler(
                seed=seed, multivariate=True, n_startup_trials=n_startup_trials, constant_liar=True
            )

        super().__init__(space, n_objectives=n_objectives, seed=seed, weights=weights, budget=budget,
                         sampler=sampler)  # fmt: skip


STRATEGIES.add(NSGA2.name, NSGA2)
STRATEGIES.add(NSGA3.name, NSGA3)
STRATEGIES.add(TPE.name, TPE)
