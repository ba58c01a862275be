"""Single-objective strategies wrapping nevergrad: "cma" (CMA-ES, mergekit-evolve's optimizer) and "ngopt".

Both minimize `-self.scalar(objectives)`, the negated weighted sum of the objectives, over the box of the
space: the parametrization is `ng.p.Array(init=space.initial(), lower=space.lower, upper=space.upper)`
(nevergrad bounces samples that leave the box back in).

Options shared by both:
- `num_workers` (default 1): the most candidates in flight at once (asked, not yet told). nevergrad picks
  its algorithm (ngopt) and population (cma) from it, and some of its algorithms cannot take more
  (sequential ones would deadlock), so asking beyond it is a `StrategyError`: set it to the number of
  workers (the runtime does). Every asked candidate must be told, failures included.

Failures: nevergrad has no notion of a failed evaluation (it clips NaN/inf losses to 5e20, which distorts
model-based algorithms), so a failed result is told as a large finite loss: the worst loss told so far plus
max(1, worst - best), or 1.0 before any success. It ranks below every success so far while staying on
the scale of the real losses.

Two patches to nevergrad 1.0.12, applied only while one of our calls runs and undone after it:
- numpy >= 2.4 refuses `float()` of a 1-element array, which nevergrad's quadratic metamodel does (nevergrad
  issue #1612); there `learn_on_k_best` turns that TypeError into the `MetaModelFailure` nevergrad already
  handles, so metamodel-based algorithms (NGOpt's choice for small budgets with several workers) fall back
  to their base optimizer instead of crashing;
- algorithms wrapping scipy (NGOpt's Cobyla for a sequential run, the metamodel's Powell) run in a helper
  thread waiting for the next tell; nevergrad makes it a non-daemon thread, so a process still holding
  the optimizer (an uncaught exception's traceback) would hang at exit. Ours are daemon threads.

Determinism: nevergrad pulls from the parametrization's `random_state`, seeded with `seed`; pycma draws
through it too. A few nevergrad algorithms (and scipy underneath) draw from numpy's global generator, so
every call into nevergrad runs with the global generator swapped for a private one seeded from `seed` and
swapped back afterwards: the caller's global state is untouched and never leaks in. Replaying the same
ask/tell calls therefore gives the same candidates. (nevergrad's candidate uids are random but used
only as keys.) Swapping the global generator assumes one driver thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from evomerge.space.base import Space
from evomerge.strategies.base import STRATEGIES, Candidate, Result, Strategy, StrategyError

log = logging.getLogger(__name__)

# (nevergrad module, parametrization, budget, num_workers) -> optimizer
Build = Callable[[Any, Any, "int | None", int], Any]


def _unknown_options(name: str, unknown: dict[str, Any], known: Sequence[str]) -> StrategyError:
    return StrategyError(
        f"strategy {name!r}: unknown option(s) {', '.join(sorted(unknown))}; it takes {', '.join(known)}"
    )


def _numpy_refuses_1d_float() -> bool:
    try:
        float(np.zeros(1))
    except TypeError:
        return True
    return False


_METAMODEL_BROKEN = _numpy_refuses_1d_float()


@contextmanager
def _nevergrad_patches() -> Iterator[None]:
    """While nevergrad runs one of our calls: its helper threads are daemons, and its metamodel fails the
    way nevergrad expects instead of crashing (see the module docstring). Undone when the call returns."""
    from nevergrad.optimization import metamodel, optimizerlib, recaster

    thread_cls, learn = recaster._MessagingThread, metamodel.learn_on_k_best

    class DaemonThread(thread_cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.daemon = True

    def learn_on_k_best(*args: Any, **kwargs: Any) -> Any:
        try:
            return learn(*args, **kwargs)
        except TypeError as e:
            if "0-dimensional" not in str(e):
                raise
            raise metamodel.MetaModelFailure(f"metamodel incompatible with numpy {np.__version__}") from None

    recaster._MessagingThread = DaemonThread
    if _METAMODEL_BROKEN:
        metamodel.learn_on_k_best = optimizerlib.learn_on_k_best = learn_on_k_best
    try:
        yield
    finally:
        recaster._MessagingThread = thread_cls
        metamodel.learn_on_k_best = optimizerlib.learn_on_k_best = learn


class _NevergradStrategy(Strategy):
    """A nevergrad optimizer behind the ask/tell contract; subclasses give the optimizer to build."""

    multi_objective = False

    def __init__(self, space: Space, *, n_objectives: int, seed: int, weights: Sequence[float] | None,
                 budget: int | None, num_workers: int, build: Build) -> None:  # fmt: skip
        super().__init__(space, n_objectives=n_objectives, seed=seed, weights=weights, budget=budget)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise StrategyError(
                f"strategy {self.name!r}: num_workers must be an integer >= 1 (got {num_workers!r})"
            )
        flat = [n for n, lo, hi in zip(space.names, space.lower, space.upper) if not hi > lo]
        if flat:
            raise StrategyError(
                f"strategy {self.name!r}: genes with an empty range (lower >= upper): {', '.join(flat)}"
            )
        self.num_workers = num_workers
        self._global_state = np.random.RandomState(seed).get_state()
        self._pending: dict[str, Any] = {}  # candidate id -> the nevergrad parameter asked
        self._ids: dict[str, str] = {}  # nevergrad uid -> candidate id (for parents)
        self._best_loss = self._worst_loss = None
        with self._calling_nevergrad():
            import nevergrad as ng

            param = ng.p.Array(init=space.initial(), lower=space.lower, upper=space.upper)
            param.random_state = np.random.RandomState(seed)
            self.optimizer = build(ng, param, budget, num_workers)

    @contextmanager
    def _calling_nevergrad(self) -> Iterator[None]:
        """Run a call into nevergrad with our own global numpy state and `_nevergrad_patches`."""
        outer = np.random.get_state()
        np.random.set_state(self._global_state)
        try:
            with _nevergrad_patches():
                yield
        finally:
            self._global_state = np.random.get_state()
            np.random.set_state(outer)

    def _ask(self, n: int) -> list[Candidate]:
        if len(self._pending) + n > self.num_workers:
            raise StrategyError(
                f"strategy {self.name!r}: ask({n}) with {len(self._pending)} candidate(s) in flight exceeds "
                f"num_workers={self.num_workers}; set the option num_workers to the most candidates evaluated at once"
            )
        batch = []
        with self._calling_nevergrad():
            for _ in range(n):
                param = self.optimizer.ask()
                parents = tuple(self._ids[u] for u in param.parents_uids if u in self._ids)
                c = self.make_candidate(np.asarray(param.value, dtype=np.float64), parents=parents,
                                        generation=max(0, param.generation - 1))  # fmt: skip
                self._pending[c.id] = param
                self._ids[param.uid] = c.id
                batch.append(c)
        return batch

    def _failure_loss(self) -> float:
        if self._worst_loss is None:
            return 1.0
        return self._worst_loss + max(1.0, self._worst_loss - self._best_loss)

    def _tell(self, results: list[Result]) -> None:
        with self._calling_nevergrad():
            for r in results:
                param = self._pending.pop(r.id)
                if r.failed:
                    loss = self._failure_loss()
                else:
                    loss = -self.scalar(r.objectives)
                    self._best_loss = loss if self._best_loss is None else min(self._best_loss, loss)
                    self._worst_loss = loss if self._worst_loss is None else max(self._worst_loss, loss)
                self.optimizer.tell(param, loss)


class CMA(_NevergradStrategy):
    """CMA-ES (Hansen) through nevergrad's `ParametrizedCMA` (pycma), step size adapted by CSA.

    Options:
    - `popsize`: population per generation (default nevergrad's, max(num_workers, 4 + int(3 ln(dim))));
      nevergrad raises it to num_workers if smaller.
    - `sigma` (default 1/6): the initial step as a fraction of each gene's range; 1/6 is mergekit-evolve's
      sigma0 for genes in [0, 1]. nevergrad standardizes gene i as (x_i - x0_i) / (range_i / 6) and starts
      pycma at step `scale * m` in those units, m = 0.3 below 18 genes and 0.15 from 18 on (its factor for
      bounded spaces); `scale = 6 * sigma / m` makes the first step `sigma * range_i` in gene units.
    - `num_workers`: see the module docstring.

    Step-size adaptation is forced to CSA (`inopts={"AdaptSigma": CMAAdaptSigmaCSA}`): pycma switches to TPA
    in high dimension, which collapses sigma on fitnesses with many ties (see ALGORITHMS.md 4.3). The
    search starts at `space.initial()`. Needs at least 2 genes (nevergrad runs 1-D CMA with fcmaes).
    """

    name = "cma"

    def __init__(self, space: Space, *, n_objectives: int = 1, seed: int = 0,
                 weights: Sequence[float] | None = None, budget: int | None = None,
                 num_workers: int = 1, popsize: int | None = None, sigma: float = 1 / 6,
                 **unknown: Any) -> None:  # fmt: skip
        if unknown:
            raise _unknown_options(self.name, unknown, ["num_workers", "popsize", "sigma"])
        if popsize is not None and (isinstance(popsize, bool) or not isinstance(popsize, int) or popsize < 2):
            raise StrategyError(f"strategy 'cma': popsize must be an integer >= 2 (got {popsize!r})")
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 < sigma < np.inf:
            raise StrategyError(f"strategy 'cma': sigma must be a positive number (got {sigma!r})")
        if space.dim < 2:
            raise StrategyError(f"strategy 'cma' needs at least 2 genes (the space has {space.dim})")

        def build(ng: Any, param: Any, budget: int | None, num_workers: int) -> Any:
            from cma.sigma_adaptation import CMAAdaptSigmaCSA

            m = 0.3 if param.dimension < 18 else 0.15
            config = ng.optimizers.ParametrizedCMA(
                scale=6.0 * float(sigma) / m, popsize=popsize, inopts={"AdaptSigma": CMAAdaptSigmaCSA}
            )
            return config(param, budget=budget, num_workers=num_workers)

        self.sigma, self.popsize = float(sigma), popsize
        super().__init__(space, n_objectives=n_objectives, seed=seed, weights=weights, budget=budget,
                         num_workers=num_workers, build=build)  # fmt: skip


class NGOpt(_NevergradStrategy):
    """nevergrad's NGOpt: picks an algorithm from the dimension, budget and num_workers (e.g. Cobyla for
    a sequential run of a few hundred evaluations, a quadratic metamodel or CMA with several workers).

    Needs `budget` (the number of evaluations) to choose. Options: `num_workers` (see the module docstring).
    """

    name = "ngopt"

    def __init__(self, space: Space, *, n_objectives: int = 1, seed: int = 0,
                 weights: Sequence[float] | None = None, budget: int | None = None,
                 num_workers: int = 1, **unknown: Any) -> None:  # fmt: skip
        if unknown:
            raise _unknown_options(self.name, unknown, ["num_workers"])
        if budget is None:
            raise StrategyError(
                "strategy 'ngopt' needs a budget (number of candidates): NGOpt picks its algorithm from it"
            )

        def build(ng: Any, param: Any, budget: int | None, num_workers: int) -> Any:
            opt = ng.optimizers.NGOpt(param, budget=budget, num_workers=num_workers)
            log.info("ngopt: nevergrad chose %s (%d genes, budget %s, %d workers)",
                     opt.optim.name, param.dimension, budget, num_workers)  # fmt: skip
            return opt

        super().__init__(space, n_objectives=n_objectives, seed=seed, weights=weights, budget=budget,
                         num_workers=num_workers, build=build)  # fmt: skip


STRATEGIES.add(CMA.name, CMA)
STRATEGIES.add(NGOpt.name, NGOpt)
