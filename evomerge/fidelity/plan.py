"""What each candidate is scored on, decided on the driver from journaled data only.

Three plans share one small protocol the search loop drives:

- `ExactPlan` (default): every item in one call; scores are exact.
- `RacingPlan`: each task's items in one fixed, seeded, shuffled order shared by every candidate; a candidate is
  scored on nested prefixes (rungs, e.g. 32 -> 96 -> all items per task). After each rung but the last it is
  promoted (the worker keeps it resident and scores only the next slice) or stopped. The bar comes from the
  *reference set*: the candidates told before this one was asked. That set, and so every decision, is the
  same in a replayed or resumed `ordered` run whatever the arrival order of results.
- `EstimatePlan`: every candidate is scored on one fixed subset per task; an estimator turns the subset's
  answers into an estimate of the full-task score, using the base's and sources' per-item scores.

Protocol: `first(cid)` gives the items of a candidate's next call (None: all items), `advance(cid, payload)`
takes a worker payload and returns a `Step` (a `rung` event to journal, the next items, or the final payload);
`on_ask`, `on_result`, `on_tell`, `replay_rung` keep the plan in step with the journal; `settled(cid)` gives
the final payload of a race the journal ended (last `rung`: stop or done) without its `result` (a driver
killed in between), so that resume records it instead of scoring more items. Racing and estimators
score a task by the mean of its per-item scores (lm-eval's `mean` aggregation: accuracy, exact match).
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evomerge.evaluate.base import pack_samples, unpack_samples

Items = dict[str, list[int]]


@dataclass
class Step:
    """What follows a worker's answer: journal `rung` (racing), then score `items` next on the same worker, or
    record `final` as the candidate's result."""

    rung: dict[str, Any] | None = None
    items: Items | None = None
    final: dict[str, Any] | None = None


def task_seed(seed: int, task: str, what: str) -> int:
    """A stable per-task seed (not Python's salted hash())."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{task}:{what}".encode()).digest()[:8], "little")


def unpack_all(samples: dict[str, Any]) -> dict[str, np.ndarray]:
    return {t: unpack_samples(v) for t, v in samples.items()}


class _OneCallPlan:
    """A plan whose candidates take one call each: nothing to remember between calls or across a resume
    (so the search may put several candidates in one worker call)."""

    one_call = True

    def on_ask(self, cid: str, told_before: int) -> None: ...

    def on_result(self, event: dict[str, Any]) -> None: ...

    def on_tell(self, cid: str) -> None: ...

    def replay_rung(self, event: dict[str, Any]) -> None: ...

    def settled(self, cid: str) -> dict[str, Any] | None:
        return None


class ExactPlan(_OneCallPlan):
    """Every item of every task, one call per candidate."""

    reduced = False

    def first(self, cid: str) -> Items | None:
        return None

    def advance(self, cid: str, payload: dict[str, Any]) -> Step:
        return Step(final={**payload, "fidelity": {"mode": "exact", "exact": True}})


@dataclass
class ObjectiveMap:
    """Which tasks the objectives read, with sign (maximized) and weight; `multi`: Pareto decisions."""

    tasks: list[str]
    signs: np.ndarray
    weights: np.ndarray
    multi: bool

    def vector(self, means: dict[str, float]) -> np.ndarray:
        return self.signs * np.array([means[t] for t in self.tasks])


@dataclass
class _Race:
    rung: int = -1  # last rung scored
    seen: dict[str, list[np.ndarray]] = field(default_factory=dict)  # per task, slices in item order
    passes: int = 0
    seconds: float = 0.0
    ended: bool = False  # the last rung's decision was stop or done (replayed from the journal)


class RacingPlan:
    """Nested prefixes of a shared shuffled order, with successive halving and/or a paired test per rung."""

    reduced = True

    def __init__(self, sizes: dict[str, int], objectives: ObjectiveMap, *, rungs: list[int], eta: float | None,
                 test: str, alpha: float, seed: int, window: int | None = None) -> None:  # fmt: skip
        from evomerge.fidelity.racing import item_order, rung_sizes

        self.sizes, self.obj, self.eta, self.test, self.alpha = sizes, objectives, eta, test, alpha
        self.window = window
        self.orders = {t: item_order(t, n, seed) for t, n in sizes.items()}
        self.rungs = {t: rung_sizes(rungs, n) for t, n in sizes.items()}
        self.n_rungs = max(len(r) for r in self.rungs.values())
        self.races: dict[str, _Race] = {}
        self.told_before: dict[str, int] = {}
        self.n_told = 0
        self.pending: dict[str, dict[str, np.ndarray]] = {}  # result recorded, not told yet: seen items
        self.tables: list[tuple[list[int], list[np.ndarray]]] = [([], []) for _ in range(self.n_rungs)]
        self.exact: dict[str, dict[str, np.ndarray]] = {}  # told candidates scored on every item
        self.exact_values: dict[str, np.ndarray] = {}  # their objective vectors on every item
        self.exact_told: list[tuple[int, str]] = []

    # ------------------------------------------------------------------ item slices
    def size(self, task: str, rung: int) -> int:
        sizes = self.rungs[task]
        return sizes[min(rung, len(sizes) - 1)]

    def slice(self, rung: int) -> Items:
        out = {}
        for t, order in self.orders.items():
            lo = 0 if rung == 0 else self.size(t, rung - 1)
            hi = self.size(t, rung)
            if hi > lo:
                out[t] = order[lo:hi].tolist()
        return out

    def first(self, cid: str) -> Items | None:
        race = self.races.setdefault(cid, _Race())
        return self.slice(race.rung + 1)

    # ------------------------------------------------------------------ bookkeeping
    def on_ask(self, cid: str, told_before: int) -> None:
        self.told_before[cid] = told_before

    def replay_rung(self, event: dict[str, Any]) -> None:
        race = self.races.setdefault(event["id"], _Race())
        self._add(race, event["rung"], unpack_all(event["samples"]), event["forward_passes"], 0.0)
        race.ended = event["decision"] != "promote"

    def settled(self, cid: str) -> dict[str, Any] | None:
        """The final payload of a race whose last journaled rung ended it, when its result is missing."""
        race = self.races.get(cid)
        if race is None or not race.ended:
            return None
        return self._final(race, {"id": cid, "pid": None, "node": None})

    def _add(
        self, race: _Race, rung: int, samples: dict[str, np.ndarray], passes: int, seconds: float
    ) -> None:
        race.rung = rung
        for t, y in samples.items():
            race.seen.setdefault(t, []).append(np.asarray(y, dtype=np.float64))
        race.passes += int(passes)
        race.seconds += float(seconds)

    def on_result(self, event: dict[str, Any]) -> None:
        self.races.pop(event["id"], None)
        if event["status"] == "ok" and "samples" in event:
            self.pending[event["id"]] = unpack_all(event["samples"])

    def on_tell(self, cid: str) -> None:
        """The candidate joins the reference set of every candidate asked from now on."""
        idx = self.n_told
        self.n_told += 1
        seen = self.pending.pop(cid, None)
        if seen is None:
            return
        for r in range(self.n_rungs):
            if all(len(seen.get(t, ())) >= self.size(t, r) for t in self.obj.tasks):
                rows, values = self.tables[r]
                rows.append(idx)
                values.append(self.value(seen, r))
        if all(len(seen.get(t, ())) == n for t, n in self.sizes.items()):
            self.exact[cid] = {t: seen[t] for t in self.obj.tasks}
            self.exact_values[cid] = self.value(seen, self.n_rungs - 1)
            self.exact_told.append((idx, cid))

    # ------------------------------------------------------------------ decisions
    def value(self, seen: dict[str, np.ndarray], rung: int) -> np.ndarray:
        means = {t: float(np.mean(seen[t][: self.size(t, rung)])) for t in self.obj.tasks}
        return self.obj.vector(means)

    def rivals(self, rung: int, k: int) -> np.ndarray:
        """Values at `rung` of the reference candidates (told among the first k), the last `window` of them: a
        converging search's early candidates would otherwise keep a bar every new candidate clears."""
        rows, values = self.tables[rung]
        m = bisect.bisect_left(rows, k)
        lo = 0 if self.window is None else max(0, m - self.window)
        return np.array(values[lo:m]).reshape(m - lo, len(self.obj.tasks))

    def reference_exact(self, k: int) -> list[str]:
        m = bisect.bisect_left(self.exact_told, (k, ""))
        return [cid for _, cid in self.exact_told[:m]]

    def promotes(self, cid: str, seen: dict[str, np.ndarray], rung: int) -> bool:
        from evomerge.fidelity.racing import halving_promotes

        k = self.told_before.get(cid, 0)
        v = self.value(seen, rung)
        if self.eta is not None:
            rivals = self.rivals(rung, k)
            if self.obj.multi:
                ok = halving_promotes(v, rivals, self.eta)
            else:
                ok = halving_promotes(np.array([v @ self.obj.weights]), rivals @ self.obj.weights[:, None],
                                      self.eta)  # fmt: skip
            if not ok:
                return False
        return self.test == "none" or not self.significantly_worse(seen, rung, k)

    def significantly_worse(self, seen: dict[str, np.ndarray], rung: int, k: int) -> bool:
        """Single objective: worse than the incumbent (best fully scored reference) on the pooled, weighted
        per-item differences. Several objectives: worse on every objective than some member of the fully
        scored references' Pareto front (significantly dominated)."""
        from evomerge.fidelity.racing import paired_worse
        from evomerge.pareto import non_dominated

        refs = self.reference_exact(k)
        if not refs:
            return False
        full = np.array([self.exact_values[c] for c in refs])
        looks = self.n_rungs - 1  # tests happen at every rung but the last (there the race is done)
        sizes = [sum(self.size(t, r) for t in self.obj.tasks) for r in range(looks)]

        def diffs(other: str, tasks: list[int]) -> np.ndarray:
            parts = []
            for j in tasks:
                t = self.obj.tasks[j]
                n = self.size(t, rung)
                scale = self.obj.signs[j] * (1.0 if self.obj.multi else self.obj.weights[j])
                parts.append(scale * (seen[t][:n] - self.exact[other][t][:n]))
            return np.concatenate(parts)

        if not self.obj.multi:
            incumbent = refs[int(np.argmax(full @ self.obj.weights))]
            spread = float(np.max(np.abs(self.obj.weights))) or 1.0
            return paired_worse(diffs(incumbent, list(range(len(self.obj.tasks)))), test=self.test,
                                alpha=self.alpha, looks=looks, value_range=spread, sizes=sizes)  # fmt: skip
        front = [refs[i] for i in np.flatnonzero(non_dominated(full))]
        return any(
            all(paired_worse(diffs(m, [j]), test=self.test, alpha=self.alpha, looks=looks,
                             sizes=[self.size(self.obj.tasks[j], r) for r in range(looks)])
                for j in range(len(self.obj.tasks)))
            for m in front
        )  # fmt: skip

    def advance(self, cid: str, payload: dict[str, Any]) -> Step:
        race = self.races.setdefault(cid, _Race())
        rung = race.rung + 1
        slice_samples = unpack_all(payload["samples"])
        self._add(race, rung, slice_samples, payload["forward_passes"], payload.get("seconds", 0.0))
        seen = {t: np.concatenate(parts) for t, parts in race.seen.items()}
        last = rung >= self.n_rungs - 1
        promote = not last and self.promotes(cid, seen, rung)
        event = {"event": "rung", "id": cid, "rung": rung, "items": {t: len(y) for t, y in seen.items()},
                 "samples": payload["samples"], "forward_passes": payload["forward_passes"],
                 "decision": "promote" if promote else ("stop" if not last else "done")}  # fmt: skip
        if promote:
            return Step(rung=event, items=self.slice(rung + 1))
        return Step(rung=event, final=self._final(race, payload))

    def _final(self, race: _Race, payload: dict[str, Any]) -> dict[str, Any]:
        seen = {t: np.concatenate(parts) for t, parts in race.seen.items()}
        exact = all(len(seen.get(t, ())) == n for t, n in self.sizes.items())
        return {
            **payload,
            "scores": {t: float(np.mean(y)) for t, y in seen.items()},
            "samples": {t: pack_samples(y) for t, y in seen.items()},
            "forward_passes": race.passes,
            "seconds": race.seconds,
            "fidelity": {
                "mode": "racing",
                "exact": exact,
                "rung": race.rung,
                "stopped": not exact,
                "items": {t: len(y) for t, y in seen.items()},
            },  # fmt: skip
        }


class EstimatePlan(_OneCallPlan):
    """One fixed subset per task; the estimator's value is the candidate's score."""

    reduced = True

    def __init__(self, reference: dict[str, np.ndarray], *, name: str, items: int, delta: float | None,
                 seed: int) -> None:  # fmt: skip
        from evomerge.fidelity.estimators import build_estimator

        kw = {} if delta is None else {"delta": delta}
        self.name = name
        self.estimators = {
            t: build_estimator(name, y, min(items, y.shape[1]), task_seed(seed, t, "subset"), **kw)
            for t, y in reference.items()
        }
        self.sizes = {t: y.shape[1] for t, y in reference.items()}

    def first(self, cid: str) -> Items | None:
        return {t: e.items.tolist() for t, e in self.estimators.items()}

    def advance(self, cid: str, payload: dict[str, Any]) -> Step:
        samples = unpack_all(payload["samples"])
        scores = {t: float(np.clip(self.estimators[t].estimate(samples[t]), 0.0, 1.0)) for t in samples}
        n = {t: len(y) for t, y in samples.items()}
        exact = all(n[t] == self.sizes[t] for t in self.sizes)
        final = {**payload, "scores": scores, "subset_scores": payload["scores"],
                 "fidelity": {"mode": "estimate", "estimator": self.name, "exact": exact,
                              "estimated": not exact, "items": n}}  # fmt: skip
        return Step(final=final)


def is_exact(result: dict[str, Any]) -> bool:
    """Results without a fidelity record (full evaluation, older journals) are exact."""
    return bool(result.get("fidelity", {}).get("exact", True))
