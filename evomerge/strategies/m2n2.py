"""M2N2, Model Merging of Natural Niches (ALGORITHMS.md 4.3): an archive of models, a per-sample score
matrix, resource-competition fitness, attraction-based mate choice and split-point SLERP crossover.

The rules are pure functions of the score matrix `S` (P members x N samples, values in [0, 1]); the
strategy keeps the archive as recipes (`evomerge.merge.mixture`), so the driver never holds weights:

- *mixture mode* (default, no mutation): a member is piecewise-constant coefficients over the pool along
  the flat parameter order. A child's coefficients are exact: the global SLERP angle comes from the pool's
  cumulative Gram matrices (`ModelSpace.gram`), split points are snapped down to chunk boundaries
  (`chunk: tensor` or a block of elements; `chunk: 1` = the reference's exact element split points);
- *store mode* (`mutation_std > 0`, training from scratch): members are stored in the run dir's member
  store and a child is an `Offspring` recipe (its parents, split point, weight, noise seed), built by the
  worker with the reference formula. Store entries no member can need again are deleted after each tell.

Ablations are options: `alpha: 0` (no competition), `matchmaker: false` (parents i.i.d. by fitness),
`split_point: false` (plain SLERP), `crossover: false` (mutation only).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.merge.members import slerp_scales
from evomerge.merge.mixture import Mixture, Offspring, snap_split
from evomerge.space.base import Space
from evomerge.strategies.base import STRATEGIES, Candidate, Result, Strategy, StrategyError


def competition_fitness(scores: np.ndarray, alpha: float) -> np.ndarray:
    """f_k = sum_j S[k, j] / z_j^alpha with z_j the column totals (0 counted as 1): an example few members
    solve is worth more. alpha = 0 gives the raw score sum."""
    z = scores.sum(axis=0)
    z[z == 0] = 1.0
    return (scores / z**alpha).sum(axis=1)


def attraction(scores: np.ndarray, a: int, alpha: float) -> np.ndarray:
    """g_b = sum_j max(0, S[b, j]/z_j^alpha - S[a, j]/z_j^alpha): what b solves that a does not."""
    z = scores.sum(axis=0)
    z[z == 0] = 1.0
    shared = scores / z**alpha
    return np.maximum(shared - shared[a], 0.0).sum(axis=1)


def _draw(weights: np.ndarray, allowed: np.ndarray, rng: np.random.Generator) -> int:
    """Index drawn proportionally to `weights` among `allowed`; uniform among them when all weigh 0."""
    w = np.where(allowed, weights, 0.0)
    if w.sum() <= 0:
        w = allowed.astype(np.float64)
    return int(rng.choice(len(w), p=w / w.sum()))


def choose_parents(scores: np.ndarray, filled: np.ndarray, alpha: float, rng: np.random.Generator,
                   *, matchmaker: bool = True) -> tuple[int, int]:  # fmt: skip
    """(a, b): a ~ fitness; b ~ attraction to a (matchmaker) or ~ fitness (i.i.d., may equal a).
    Fallbacks (the reference divides by zero): all fitness 0 -> uniform over filled slots; all attraction
    0 -> b ~ fitness among the other filled slots (uniform if those weigh 0; a itself if it is alone)."""
    f = competition_fitness(scores, alpha)
    a = _draw(f, filled, rng)
    if not matchmaker:
        return a, _draw(f, filled, rng)
    g = attraction(scores, a, alpha)
    others = filled.copy()
    others[a] = False
    if not others.any():
        return a, a
    if np.where(others, g, 0.0).sum() > 0:
        return a, _draw(g, others, rng)
    return a, _draw(f, others, rng)


def replacement_slot(scores: np.ndarray, child: np.ndarray, alpha: float) -> int | None:
    """The archive slot the child takes: the member of lowest fitness on [S; child], or None when the child
    itself is strictly the worst. argmin takes the first index, so on a tie the member (lower index) is the
    one picked as worst and the child replaces it, as in the reference."""
    k = int(np.argmin(competition_fitness(np.vstack([scores, child]), alpha)))
    return k if k < len(scores) else None


def split_weights(starts: np.ndarray, split: int | None, weight: float) -> np.ndarray:
    """t per segment: `weight` (of parent b) before the split point, 1 - weight from it on."""
    if split is None:
        return np.full(len(starts), weight)
    return np.where(starts < split, weight, 1.0 - weight)


def _union(*starts: Sequence[int]) -> np.ndarray:
    return np.unique(np.concatenate([np.asarray(s, dtype=np.int64) for s in starts]))


def _rows_at(starts: np.ndarray, coeffs: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Coefficient rows of a piecewise member at the segment starts `at` (a refinement of `starts`)."""
    return coeffs[np.searchsorted(starts, at, side="right") - 1]


def compact(starts: np.ndarray, coeffs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge consecutive segments with identical coefficients (recipes stay as small as the member is)."""
    keep = np.ones(len(starts), dtype=bool)
    keep[1:] = np.any(coeffs[1:] != coeffs[:-1], axis=1)
    return starts[keep], coeffs[keep]


@dataclass(frozen=True)
class Member:
    """One archive member: pool coefficients per segment (mixture mode) or a stored directory."""

    id: str
    starts: np.ndarray | None = None
    coeffs: np.ndarray | None = None
    ref: str | None = None


def inner(gram: np.ndarray, boundaries: np.ndarray, size: int, x: Member, y: Member) -> float:
    """<x, y> of two mixtures from cumulative Gram matrices, over the union of their segments."""
    starts = _union(x.starts, y.starts)
    ends = np.append(starts[1:], size)
    lo, hi = np.searchsorted(boundaries, starts), np.searchsorted(boundaries, ends)
    blocks = gram[hi] - gram[lo]  # [S, K, K]
    xr, yr = _rows_at(x.starts, x.coeffs, starts), _rows_at(y.starts, y.coeffs, starts)
    return float(np.einsum("sk,skl,sl->", xr, blocks, yr))


def slerp_child(a: Member, b: Member, split: int | None, weight: float, cos_omega: float, cid: str) -> Member:
    """Coefficients of the split-point SLERP child: per segment, s_a(t) a + s_b(t) b."""
    starts = _union(a.starts, b.starts, [] if split is None or split <= 0 else [split])
    t = split_weights(starts, split, weight)
    scales = np.array([slerp_scales(float(v), cos_omega) for v in t])
    coeffs = scales[:, :1] * _rows_at(a.starts, a.coeffs, starts) + scales[:, 1:] * _rows_at(
        b.starts, b.coeffs, starts
    )
    starts, coeffs = compact(starts, coeffs)
    return Member(cid, starts, coeffs)


class M2N2(Strategy):
    """Archive of `pop_size` members seeded with the pool models; one child per ask, replacement per tell."""

    name = "m2n2"
    model_space = True  # members are recipes over the pool, not genomes of a box
    needs_all_items = "its resource competition shares each item among the members that solve it, so every member needs scores on every item"

    def __init__(self, space: Space, *, n_objectives: int = 1, seed: int = 0,
                 weights: Sequence[float] | None = None, budget: int | None = None,
                 pop_size: int = 20, alpha: float = 1.0, matchmaker: bool = True, split_point: bool = True,
                 crossover: bool = True, mutation_std: float = 0.0, store_dir: str | None = None,
                 **options: Any) -> None:  # fmt: skip
        if options:
            raise StrategyError(f"strategy {self.name!r}: unknown option(s) {', '.join(sorted(options))}")
        super().__init__(space, n_objectives=n_objectives, seed=seed, weights=weights, budget=budget)
        for attr in ("models", "size", "boundaries"):
            if not hasattr(space, attr):
                raise StrategyError("m2n2 needs a model space (space: {type: model})")
        if pop_size < 2 or alpha < 0 or mutation_std < 0:
            raise StrategyError(f"m2n2 needs pop_size >= 2, alpha >= 0, mutation_std >= 0 "
                                f"(got {pop_size}, {alpha}, {mutation_std})")  # fmt: skip
        if not crossover and mutation_std == 0:
            raise StrategyError("m2n2 without crossover needs mutation (mutation_std > 0)")
        if mutation_std > 0 and getattr(space, "delta", False):
            raise StrategyError("m2n2 mutation stores full members: use a model space without delta")
        if mutation_std > 0 and store_dir is None:
            raise StrategyError("m2n2 with mutation keeps members in a member store: give store_dir")
        self.pop_size, self.alpha, self.matchmaker = pop_size, alpha, matchmaker
        self.split_point, self.crossover, self.mutation_std = split_point, crossover, mutation_std
        self.store = Path(store_dir) if mutation_std > 0 else None
        self.slots: list[Member | None] = [None] * pop_size
        self.scores: np.ndarray | None = None  # [pop_size, N], allocated on the first told row
        self.members: dict[str, Member] = {}  # every asked candidate's member
        self.parents_of: dict[str, tuple[str, ...]] = {}
        self._pending: set[str] = set()  # asked, not told yet
        self._stored: set[str] = set()  # told candidates whose store entry may still exist
        self._seeds = list(space.models)

    # -- members -> recipes ------------------------------------------------------------------------
    def _seed(self, index: int, cid: str) -> tuple[Member, Any]:
        ref = self._seeds[index]
        if self.store is not None:
            save = str(self.store / cid)
            return Member(cid, ref=save), Offspring(parents=[ref], size=self.space.size, save=save)
        k = len(self._seeds)
        member = Member(cid, np.array([0]), np.eye(k)[index : index + 1])
        return member, self._mixture(member)

    def _mixture(self, m: Member) -> Mixture:
        """The member's recipe; in delta space x = base + sum_k c_k (theta_k - base), i.e. the base gets
        1 - sum_k c_k in every segment."""
        models, coeffs = list(self.space.models), m.coeffs
        if getattr(self.space, "delta", False):
            models.append(self.space.base)
            coeffs = np.hstack([coeffs, 1.0 - coeffs.sum(axis=1, keepdims=True)])
        return Mixture(models=models, size=self.space.size, starts=[int(s) for s in m.starts],
                       coefficients=coeffs.tolist())  # fmt: skip

    def _child(self, a: Member, b: Member, cid: str) -> tuple[Member, Any, dict[str, Any]]:
        split = (
            snap_split(int(self.rng.integers(0, self.space.size)), self.space.boundaries)
            if self.split_point
            else None
        )
        weight = float(self.rng.uniform(0.0, 1.0))
        info = {"split": split, "weight": weight}
        if self.store is not None:
            noise_seed = int(self.rng.integers(0, 2**31 - 1))
            save = str(self.store / cid)
            parents = [a.ref, b.ref] if self.crossover else [a.ref]
            recipe = Offspring(parents=parents, size=self.space.size, weight=weight, split=split,
                               noise_seed=noise_seed, noise_std=self.mutation_std, save=save)  # fmt: skip
            return Member(cid, ref=save), recipe, info
        gram, bounds, size = self.space.gram, self.space.boundaries, self.space.size
        nab, naa, nbb = (
            inner(gram, bounds, size, a, b),
            inner(gram, bounds, size, a, a),
            inner(gram, bounds, size, b, b),
        )
        cos = nab / np.sqrt(naa * nbb) if naa > 0 and nbb > 0 else 1.0
        child = slerp_child(a, b, split, weight, cos, cid)
        info["cos_omega"] = float(cos)
        return child, self._mixture(child), info

    # -- ask / tell ----------------------------------------------------------------------------------
    def _parents(self) -> tuple[Member, Member]:
        filled = np.array([m is not None for m in self.slots])
        if filled.any():
            a, b = choose_parents(self.scores, filled, self.alpha, self.rng, matchmaker=self.matchmaker)
            return self.slots[a], self.slots[b]
        pending = [self.members[c] for c in list(self.members)[: len(self._seeds)]]  # seeds not told yet
        if self.store is not None:  # their store entries may not be written yet: read their pool models
            pending = [Member(m.id, ref=ref) for m, ref in zip(pending, self._seeds)]
        i, j = self.rng.integers(0, len(pending), size=2)
        return pending[i], pending[j]

    def _ask(self, n: int) -> list[Candidate]:
        out = []
        for _ in range(n):
            cid = self._new_id()
            index = self._count - 1
            if index < len(self._seeds):
                member, recipe = self._seed(index, cid)
                cand = Candidate(cid, recipe, None, (), 0, {"seed": self._seeds[index]})
            else:
                a, b = self._parents()
                member, recipe, info = self._child(a, b, cid)
                parents = (a.id, b.id) if self.crossover else (a.id,)
                cand = Candidate(cid, recipe, None, parents, 1 + index - len(self._seeds), info)
            self.members[cid] = member
            self.parents_of[cid] = cand.parents
            self._pending.add(cid)
            out.append(cand)
        return out

    def _tell(self, results: list[Result]) -> None:
        for r in results:
            self._pending.discard(r.id)
            if self.store is not None:
                self._stored.add(r.id)
            if r.failed:
                continue
            if r.samples is None:
                raise StrategyError("m2n2 needs per-sample scores from the evaluator (lm-eval or digits)")
            row = np.clip(np.asarray(r.samples, dtype=np.float64), 0.0, 1.0)
            if self.scores is None:
                self.scores = np.zeros((self.pop_size, row.size))
            if row.shape != self.scores.shape[1:]:
                raise StrategyError(
                    f"m2n2: {r.id} has {row.size} sample scores, the archive {self.scores.shape[1]}"
                )
            slot = replacement_slot(self.scores, row, self.alpha)
            if slot is not None:
                self.slots[slot] = self.members[r.id]
                self.scores[slot] = row
        if self.store is not None:
            self._collect_garbage()

    def archive(self) -> list[str]:
        """Ids of the current archive members, in slot order."""
        return [m.id for m in self.slots if m is not None]

    def _collect_garbage(self) -> None:
        """Delete stored members nothing can use again: not in the archive, not pending, no pending parent."""
        live = {*self.archive(), *(p for c in self._pending for p in self.parents_of[c])}
        for cid in sorted(self._stored - live):
            shutil.rmtree(self.members[cid].ref, ignore_errors=True)
            self._stored.discard(cid)


STRATEGIES.add(M2N2.name, M2N2)
