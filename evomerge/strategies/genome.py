"""GENOME and GENOME+ (ALGORITHMS.md 4.4): population-based evolution of merges, over a model space.

Members are recipes, as for M2N2: a member is a matrix of coefficients `[S, K]`, one per (segment, pool
model), over the flat parameter order cut at the space's `boundaries` (`chunk: tensor` = one segment per
tensor). A member is the `Mixture` `x[j] = sum_k c_{s,k} theta_k[j]` (with `delta: true`, task vectors: the
base gets `1 - sum_k c_{s,k}`). Every operator below is exact on that matrix, so members stay exact,
rebuildable recipes and the driver never holds weights:

- init: the K pool models alone (one-hot rows; their scores seed the fitness-based weights), then
  `pop_size` merges of expert pairs (distinct pairs in a seeded order, cycling): weights (f_a, f_b)/(f_a+f_b)
  when both experts are told, else random (the reference always uses random weights);
- crossover (`cross_rate` per trial, floor(|pop|/2) trials per step): two distinct parents by roulette,
  child = w_a A + w_b B with (w_a, w_b) = (f_a, f_b)/(f_a+f_b). Only `linear` crossover exists: a TIES /
  DARE-TIES child of two mixtures is not a mixture (trim and sign election are not linear), so it could
  not stay an exact recipe over the pool; use the `ties`/`dare_ties` merge methods with a vector space and
  CMA for those (`evo_merging`, `layerwise`);
- mutation (`mutation_rate` per member per step): a copy with `x + m * eps`, m ~ Bernoulli(`gene_rate`),
  eps ~ N(0, `sigma`^2), on the coefficient genes (no noise vectors, so the child is still a mixture);
- GENOME+ succession (`succession: true`): a PSO move of every member before crossover,
  v <- (1/C)[r1 phi_i v + r2 phi_c (p - x) + r3 phi_s (g+ - x) - r4 phi_r (g- - x)], x <- x + lam v,
  C = sum_k r_k phi_k; g+ = best member ever told, g- = worst of the current population; initial
  v = (a random expert's one-hot row) - x. The moved member replaces its origin once told;
- selection back to `pop_size` after each step: the top `elite_fraction` (at least one), the rest by
  tournament (`tournament_size`, default 3) or roulette, always exactly `pop_size` when that many exist;
- early stop: `done` turns true after `early_stop` steps without a new best. The runtime has no stop
  signal yet, so a run still ends at its budget; steps after `done` are tagged `after_early_stop` in info.
- final ensemble: `top_members(k)` reports the top-k of the population (no majority-vote ensemble
  evaluation here).

Fixed reference quirks (ALGORITHMS.md 4.4): roulette shifts negative fitness to >= 0 and falls back to
uniform when all weigh 0; tournament always fills the population; r1..r4 are drawn per update; lam decays
once per step; the personal best is a copy; initial pair weights are fitness-based when known.

Asynchrony: the runtime asks one candidate per free worker and never waits, so a step is planned when the
previous step's candidates are all asked (parents: the population selected so far; before any selection,
every told member; before any tell, the experts), and selection runs when a step's candidates are all told.
The strategy is a pure function of its seed and the ask/tell sequence (resume = journal replay).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evomerge.merge.mixture import Mixture
from evomerge.space.base import Space
from evomerge.strategies.base import STRATEGIES, Candidate, Result, Strategy, StrategyError
from evomerge.strategies.m2n2 import compact

# ------------------------------------------------------------------------------------ pure operators


def roulette_probabilities(fitness: np.ndarray) -> np.ndarray:
    """p ∝ fitness, shifted by -min when any is negative; uniform when all weigh 0."""
    f = np.asarray(fitness, dtype=np.float64)
    f = f - min(0.0, float(f.min()))
    total = f.sum()
    return f / total if total > 0 else np.full(len(f), 1.0 / len(f))


def roulette_pair(fitness: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    """Two distinct indices, each by roulette (the second among the others)."""
    p = roulette_probabilities(fitness)
    a = int(rng.choice(len(p), p=p))
    rest = np.delete(np.arange(len(p)), a)
    q = roulette_probabilities(np.asarray(fitness, dtype=np.float64)[rest])
    return a, int(rest[rng.choice(len(rest), p=q)])


def fitness_weights(fa: float, fb: float) -> tuple[float, float]:
    """(f_a, f_b)/(f_a + f_b) with negative fitness counted as 0; (1/2, 1/2) when both are 0."""
    a, b = max(fa, 0.0), max(fb, 0.0)
    return (a / (a + b), b / (a + b)) if a + b > 0 else (0.5, 0.5)


def crossover(a: np.ndarray, b: np.ndarray, fa: float, fb: float) -> np.ndarray:
    """Fitness-weighted linear merge of two members' coefficient matrices (exact as a mixture)."""
    wa, wb = fitness_weights(fa, fb)
    return wa * a + wb * b


def mutate(x: np.ndarray, rng: np.random.Generator, gene_rate: float, sigma: float) -> np.ndarray:
    """x + m * eps, m ~ Bernoulli(gene_rate), eps ~ N(0, sigma^2), per gene."""
    mask = rng.random(x.shape) < gene_rate
    return x + mask * rng.normal(0.0, sigma, x.shape)


def tournament(fitness: np.ndarray, k: int, size: int, rng: np.random.Generator) -> list[int]:
    """k distinct indices: each round draws `size` of the remaining (all if fewer), keeps the fittest
    (lowest index on ties). Always min(k, n) indices, unlike the reference."""
    remaining = list(range(len(fitness)))
    out = []
    while remaining and len(out) < k:
        picks = rng.choice(len(remaining), size=min(size, len(remaining)), replace=False)
        best = min(picks, key=lambda i: (-fitness[remaining[i]], remaining[i]))
        out.append(remaining.pop(int(best)))
    return out


def roulette_select(fitness: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
    """k distinct indices by roulette without replacement."""
    k = min(k, len(fitness))
    return [
        int(i) for i in rng.choice(len(fitness), size=k, replace=False, p=roulette_probabilities(fitness))
    ]


def select(fitness: np.ndarray, n: int, elite_fraction: float, method: str, size: int,
           rng: np.random.Generator) -> list[int]:  # fmt: skip
    """Indices of the survivors: the top max(1, round(elite_fraction * n)) (stable: lower index wins a
    tie), then the rest of n by tournament or roulette among the others."""
    f = np.asarray(fitness, dtype=np.float64)
    if len(f) <= n:
        return list(range(len(f)))
    order = np.argsort(-f, kind="stable")
    n_elite = min(n, max(1, int(round(elite_fraction * n))))
    elite, rest = [int(i) for i in order[:n_elite]], np.sort(order[n_elite:])
    picked = (
        tournament(f[rest], n - n_elite, size, rng)
        if method == "tournament"
        else roulette_select(f[rest], n - n_elite, rng)
    )
    return elite + [int(rest[i]) for i in picked]


PHI = (0.2, 0.2, 0.2, 0.1)  # phi_i (inertia), phi_c (cognitive), phi_s (social), phi_r (repulsion)


def pso_velocity(v: np.ndarray, x: np.ndarray, p: np.ndarray, g_best: np.ndarray, g_worst: np.ndarray,
                 r: Sequence[float], phi: Sequence[float] = PHI) -> np.ndarray:  # fmt: skip
    """GENOME+ succession: (1/C)[r1 phi_i v + r2 phi_c (p - x) + r3 phi_s (g+ - x) - r4 phi_r (g- - x)],
    C = sum_k r_k phi_k (1 when C is 0)."""
    c = float(np.dot(r, phi)) or 1.0
    terms = r[0] * phi[0] * v + r[1] * phi[1] * (p - x) + r[2] * phi[2] * (g_best - x)
    return (terms - r[3] * phi[3] * (g_worst - x)) / c


# ------------------------------------------------------------------------------------------ strategy


@dataclass
class Member:
    """A member's coefficients and, for GENOME+, its velocity and personal best (a copy, never x itself)."""

    id: str
    coeffs: np.ndarray
    velocity: np.ndarray
    fitness: float | None = None
    best: np.ndarray | None = None
    best_fitness: float = -np.inf
    replaces: str | None = None  # a PSO move: the member it replaces once told
    info: dict[str, Any] = field(default_factory=dict)


class Genome(Strategy):
    """GENOME / GENOME+ over a model space; see the module docstring."""

    name = "genome"
    model_space = True  # members are recipes over the pool, not genomes of a box

    def __init__(self, space: Space, *, n_objectives: int = 1, seed: int = 0,
                 weights: Sequence[float] | None = None, budget: int | None = None,
                 pop_size: int = 10, cross_rate: float = 0.8, cross_method: str = "linear",
                 mutation_rate: float = 0.3, gene_rate: float = 0.1, sigma: float = 0.05,
                 elite_fraction: float = 0.1, selection: str = "tournament", tournament_size: int = 3,
                 succession: bool = False, phi: Sequence[float] = PHI, lam: float = 0.5, lam_decay: float = 0.95,
                 early_stop: int = 5, **options: Any) -> None:  # fmt: skip
        if options:
            raise StrategyError(f"strategy {self.name!r}: unknown option(s) {', '.join(sorted(options))}")
        super().__init__(space, n_objectives=n_objectives, seed=seed, weights=weights, budget=budget)
        for attr in ("models", "boundaries"):
            if not hasattr(space, attr):
                raise StrategyError("genome needs a model space (space: {type: model})")
        if cross_method != "linear":
            raise StrategyError(
                f"genome: cross_method {cross_method!r} is not available; only 'linear' crossover keeps members "
                "exact mixtures over the pool (TIES/DARE children are not linear in the parents)"
            )
        if selection not in ("tournament", "roulette"):
            raise StrategyError(f"genome: selection must be tournament or roulette (got {selection!r})")
        probs = {"cross_rate": cross_rate, "mutation_rate": mutation_rate, "gene_rate": gene_rate,
                 "elite_fraction": elite_fraction}  # fmt: skip
        bad = [f"{k}={v}" for k, v in probs.items() if not 0 <= v <= 1]
        if pop_size < 2 or tournament_size < 1 or sigma < 0 or early_stop < 1 or len(phi) != 4 or bad:
            raise StrategyError(
                "genome needs pop_size >= 2, tournament_size >= 1, sigma >= 0, early_stop >= 1, 4 phi values "
                f"and rates in [0, 1] (got pop_size={pop_size}, tournament_size={tournament_size}, "
                f"sigma={sigma}, early_stop={early_stop}, phi={list(phi)}{', ' if bad else ''}{', '.join(bad)})"
            )
        self.pop_size, self.cross_rate, self.mutation_rate = pop_size, cross_rate, mutation_rate
        self.gene_rate, self.sigma, self.elite_fraction = gene_rate, sigma, elite_fraction
        self.selection, self.tournament_size, self.succession = selection, tournament_size, succession
        self.phi, self.lam, self.lam_decay, self.early_stop = tuple(phi), lam, lam_decay, early_stop
        self.k = len(space.models)
        self.starts = np.asarray(space.boundaries[:-1], dtype=np.int64)
        self.members: dict[str, Member] = {}
        self.population: list[Member] = []
        self.fresh: list[Member] = []  # told, successful, not through selection yet
        self.queue: list[tuple[Member, tuple[str, ...], dict[str, Any]]] = []
        self.steps: list[list[str]] = []  # candidate ids of each step not fully told
        self.step = 0
        self.expert_ids: list[str] = []  # the first step: each pool model alone
        self.best_member: Member | None = None
        self.stale = 0  # selections since the best last improved
        self.done = False

    # -- members -> recipes --------------------------------------------------------------------------
    def _one_hot(self, k: int) -> np.ndarray:
        x = np.zeros((len(self.starts), self.k))
        x[:, k] = 1.0
        return x

    def mixture(self, coeffs: np.ndarray) -> Mixture:
        """The member's recipe; in delta space the base gets 1 - sum_k c_k in every segment."""
        starts, rows = compact(self.starts, coeffs)
        models = list(self.space.models)
        if getattr(self.space, "delta", False):
            models.append(self.space.base)
            rows = np.hstack([rows, 1.0 - rows.sum(axis=1, keepdims=True)])
        return Mixture(models=models, size=int(self.space.boundaries[-1]), starts=[int(s) for s in starts],
                       coefficients=rows.tolist())  # fmt: skip

    def _new_member(self, coeffs: np.ndarray, **info: Any) -> Member:
        expert = int(self.rng.integers(self.k))
        return Member("", coeffs, self._one_hot(expert) - coeffs, info=info)

    # -- planning steps ------------------------------------------------------------------------------
    def _parents(self) -> list[Member]:
        if self.population:
            return self.population
        told = [m for m in self.members.values() if m.fitness is not None]
        return told or [self.members[c] for c in self.expert_ids]  # untold experts count as fitness 0

    def _plan_init(self) -> None:
        pairs = [(a, b) for a in range(self.k) for b in range(a + 1, self.k)] or [(0, 0)]
        order = self.rng.permutation(len(pairs))
        experts = self.expert_ids
        for i in range(self.pop_size):
            a, b = pairs[order[i % len(pairs)]]
            fa, fb = (self.members[experts[j]].fitness for j in (a, b))
            if i < len(pairs) and fa is not None and fb is not None:
                wa, _ = fitness_weights(fa, fb)
                how = "fitness"
            else:
                wa = float(self.rng.uniform())
                how = "random"
            coeffs = wa * self._one_hot(a) + (1.0 - wa) * self._one_hot(b)
            m = self._new_member(coeffs)
            self.queue.append((m, (experts[a], experts[b]), {"op": "init_pair", "weights": how, "w_a": wa}))

    def _plan_evolution(self) -> None:
        parents = self._parents()
        fit = np.array([m.fitness or 0.0 for m in parents])
        if self.succession:
            g_best = (self.best_member or parents[int(np.argmax(fit))]).coeffs
            g_worst = parents[int(np.argmin(fit))].coeffs
            for m in parents:
                if m.fitness is None:
                    continue  # an untold expert (no selection yet): nothing to move
                r = self.rng.random(4)
                p = m.best if m.best is not None else m.coeffs
                v = pso_velocity(m.velocity, m.coeffs, p, g_best, g_worst, r, self.phi)
                moved = Member("", m.coeffs + self.lam * v, v, best=None if m.best is None else m.best.copy(),
                               best_fitness=m.best_fitness, replaces=m.id)  # fmt: skip
                self.queue.append((moved, (m.id,), {"op": "pso", "lam": self.lam}))
            self.lam *= self.lam_decay
        if len(parents) >= 2:
            for _ in range(len(parents) // 2):
                if self.rng.random() < self.cross_rate:
                    a, b = roulette_pair(fit, self.rng)
                    wa, wb = fitness_weights(fit[a], fit[b])
                    child = self._new_member(wa * parents[a].coeffs + wb * parents[b].coeffs)
                    self.queue.append((child, (parents[a].id, parents[b].id), {"op": "crossover", "w_a": wa}))
        for m in parents:
            if self.rng.random() < self.mutation_rate:
                self._plan_mutation(m)
        if not self.queue:  # a step must ask something: mutate a roulette-picked member
            self._plan_mutation(parents[int(self.rng.choice(len(parents), p=roulette_probabilities(fit)))])

    def _plan_mutation(self, m: Member) -> None:
        child = self._new_member(mutate(m.coeffs, self.rng, self.gene_rate, self.sigma))
        self.queue.append((child, (m.id,), {"op": "mutation"}))

    def _plan(self) -> None:
        if self.step == 0:
            for k in range(self.k):
                m = Member("", self._one_hot(k), np.zeros((len(self.starts), self.k)))
                self.queue.append((m, (), {"op": "expert", "seed": self.space.models[k]}))
        elif self.step == 1:
            self._plan_init()
        else:
            self._plan_evolution()
        self.steps.append([])
        self.step += 1

    # -- ask / tell ----------------------------------------------------------------------------------
    def _ask(self, n: int) -> list[Candidate]:
        out = []
        for _ in range(n):
            if not self.queue:
                self._plan()
            member, parents, info = self.queue.pop(0)
            member.id = self._new_id()
            if self.step == 1:
                self.expert_ids.append(member.id)
            if self.done:
                info = {**info, "after_early_stop": True}
            member.info = info
            self.members[member.id] = member
            self.steps[-1].append(member.id)
            out.append(Candidate(member.id, self.mixture(member.coeffs), None, parents, self.step - 1, info))
        return out

    def _tell(self, results: list[Result]) -> None:
        for r in results:
            if r.failed:
                continue
            m = self.members[r.id]
            m.fitness = self.scalar(r.objectives)
            if m.fitness > m.best_fitness:
                m.best, m.best_fitness = m.coeffs.copy(), m.fitness
            self.fresh.append(m)
        # a step is complete when all its candidates are asked (a later step exists, or nothing is queued)
        # and told; selection runs once per completed step, oldest first
        while (
            self.steps
            and (len(self.steps) > 1 or not self.queue)
            and all(c in self.told for c in self.steps[0])
        ):
            self.steps.pop(0)
            self._select()

    def _select(self) -> None:
        moved = {m.replaces for m in self.fresh if m.replaces is not None}
        pool = [m for m in self.population if m.id not in moved] + self.fresh
        self.fresh = []
        if not pool:
            return
        fit = np.array([m.fitness for m in pool])
        self.population = [pool[i] for i in select(fit, self.pop_size, self.elite_fraction, self.selection,
                                                   self.tournament_size, self.rng)]  # fmt: skip
        top = pool[int(np.argmax(fit))]
        if self.best_member is None or top.fitness > self.best_member.fitness:
            self.best_member, self.stale = top, 0
        else:
            self.stale += 1
            self.done = self.done or self.stale >= self.early_stop

    def top_members(self, k: int) -> list[str]:
        """Ids of the k fittest population members (the final ensemble's members)."""
        return [m.id for m in sorted(self.population, key=lambda m: -m.fitness)[:k]]


STRATEGIES.add(Genome.name, Genome)
