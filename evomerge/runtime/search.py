"""The search loop: a strategy on the driver, a pool of Ray workers, the journal in between.

Scheduling keeps every worker busy: whenever a result comes back, the strategy is told and asked for a
new candidate, which goes to the idle worker. Two modes:
- `ordered` (default): results are told in ask order, and each tell is followed by exactly one ask(1).
  The strategy's call sequence is then ask(W), tell(c1), ask(1), tell(c2), ask(1), ... whatever the
  arrival order, so a run is reproducible from its seed (a worker only idles while an older candidate is
  still running).
- `as_completed`: results are told on arrival (best throughput with uneven evaluation times).
Either way the journal records the exact call sequence, and resume replays it: the replayed asks must give
the same candidates (checked), the recorded results are told again without re-evaluation, and only
candidates without a result are run again.

Faults: an evaluator that raises, a worker process that dies (restarted by Ray, max_restarts) and a
candidate that runs past `timeout` seconds (its worker is killed and restarted) are retried up to
`max_retries` times, then recorded as failed with the reason (`reason`: error, worker_died, timeout); a
result with a missing or non-finite objective is recorded as failed at once (`reason`: invalid). No candidate
is lost or counted twice (one `result` event per candidate); `failure_summary` counts them. A worker whose
constructor fails (a bad checkpoint, say) stops the search with that error: every worker would fail alike.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from evomerge.config import Objective
from evomerge.errors import EvomergeError
from evomerge.evaluate.base import unpack_samples
from evomerge.faults import fault_point
from evomerge.fidelity.plan import ExactPlan, is_exact
from evomerge.journal import Journal, apply_rescore
from evomerge.strategies.base import Candidate, Result, Strategy

log = logging.getLogger(__name__)


PROGRESS_EVERY = 0.25  # seconds between progress callbacks
BATCH_SECONDS = 0.2  # a worker call holds as many candidates as take this long to evaluate (at most `batch`)


class ResumeError(EvomergeError):
    pass


class WorkerStartError(EvomergeError):
    pass


def failure_summary(state: SearchState) -> dict[str, Any]:
    """Counts over the final results: ok, failed (by reason), retried candidates and extra attempts."""
    reasons: dict[str, int] = {}
    retried = retries = 0
    for r in state.results.values():
        attempts = int(r.get("attempts", 1))
        retried += attempts > 1
        retries += attempts - 1
        if r["status"] != "ok":
            reason = r.get("reason", "error")
            reasons[reason] = reasons.get(reason, 0) + 1
    failed = sum(reasons.values())
    return {"candidates": len(state.results), "ok": len(state.results) - failed, "failed": failed,
            "failed_by_reason": reasons, "retried": retried, "retries": retries}  # fmt: skip


def init_error(e: Exception) -> str:
    """The exception line(s) of a worker constructor's traceback, as Ray reports it."""
    lines = str(e).splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt): ", line):
            return " ".join(x.strip() for x in lines[i:] if x.strip())[:500]
    return lines[-1].strip() if lines else type(e).__name__


@dataclass
class SearchState:
    """Everything the driver knows, rebuilt from the journal on resume. Change it only through `add_candidate`,
    `add_result` and `mark_told`: they keep the indexes that make each scheduling step O(1) in the run's
    length (a 50,000-candidate search must not slow down as it goes)."""

    candidates: dict[str, Candidate] = field(default_factory=dict)  # in ask order
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    told: list[str] = field(default_factory=list)
    active_seconds: float = 0.0
    ended: bool = False
    forward_passes: int = 0
    waiting: dict[str, None] = field(default_factory=dict)  # asked, no result yet (ask order)
    pending_tell: dict[str, None] = field(default_factory=dict)  # asked, not told yet (ask order)
    ask_due: bool = False  # replay: the last tell was not followed by its ask(1) (killed in between)
    rescored: dict[str, str | None] = field(default_factory=dict)  # re-scored after the search -> cached twin

    def add_candidate(self, c: Candidate) -> None:
        self.candidates[c.id] = c
        self.waiting[c.id] = None
        self.pending_tell[c.id] = None

    def add_result(self, event: dict[str, Any]) -> None:
        old = self.results.get(event["id"])
        self.forward_passes += int(event.get("forward_passes", 0)) - (
            int(old.get("forward_passes", 0)) if old else 0
        )
        self.results[event["id"]] = event
        self.waiting.pop(event["id"], None)

    def add_rescore(self, event: dict[str, Any]) -> None:
        """A candidate's scores on every item replace its (estimated or partial) search scores; these stay in
        `estimate`."""
        self.results[event["id"]] = apply_rescore(self.results[event["id"]], event)
        self.rescored[event["id"]] = event.get("cached")
        self.forward_passes += int(event.get("forward_passes", 0))

    def mark_told(self, ids: list[str]) -> None:
        self.told.extend(ids)
        for cid in ids:
            self.pending_tell.pop(cid, None)

    def untold(self) -> list[str]:
        return list(self.pending_tell)


class Objectives:
    """Evaluation scores -> the maximized objective vector the strategy sees."""

    def __init__(self, objectives: list[Objective]) -> None:
        self.items = objectives
        self.names = [o.name for o in objectives]
        self.signs = np.array([1.0 if o.direction == "maximize" else -1.0 for o in objectives])
        self.weights = np.array([o.weight for o in objectives])

    def vector(self, scores: dict[str, float]) -> np.ndarray:
        missing = [n for n in self.names if n not in scores]
        if missing:
            raise EvomergeError(
                f"objective {missing[0]!r} is not among the evaluator's scores ({', '.join(scores)})"
            )
        return self.signs * np.array([scores[n] for n in self.names], dtype=np.float64)


def to_result(event: dict[str, Any], objectives: Objectives) -> Result:
    if event["status"] != "ok":
        return Result(event["id"], None, failed=True)
    samples = event.get("samples") or {}
    row = np.concatenate([unpack_samples(v) for v in samples.values()]) if samples else None
    return Result(event["id"], np.asarray(event["objectives"], dtype=np.float64), samples=row)


def replay(events: list[dict[str, Any]], strategy: Strategy, objectives: Objectives,
           plan: Any = None) -> SearchState:  # fmt: skip
    """Rebuild the strategy's state, the fidelity plan's and the driver's bookkeeping from journal events."""
    plan = plan or ExactPlan()
    state = SearchState()
    session_start = last_t = None
    for ev in events:
        kind = ev["event"]
        if kind in ("start", "resume"):
            if session_start is not None:
                state.active_seconds += last_t - session_start
            session_start = ev["t"]
        elif kind == "ask":
            state.ask_due = False
            asked = strategy.ask(ev["n"])
            recorded = [Candidate.from_json(c) for c in ev["candidates"]]
            for new, old in zip(asked, recorded, strict=True):
                same_genome = (new.genome is None and old.genome is None) or (
                    new.genome is not None
                    and old.genome is not None
                    and np.allclose(new.genome, old.genome, rtol=0, atol=1e-12)
                )
                if new.id != old.id or not same_genome or new.recipe != old.recipe:
                    raise ResumeError(
                        f"journal replay diverged at candidate {old.id}: the strategy now proposes something else "
                        "(was the config, seed or evomerge version changed?)"
                    )
                state.add_candidate(old)
                plan.on_ask(old.id, len(state.told))
        elif kind == "rung":
            plan.replay_rung(ev)
        elif kind == "result":
            state.add_result(ev)
            plan.on_result(ev)
        elif kind == "tell":
            strategy.tell([to_result(state.results[cid], objectives) for cid in ev["ids"]])
            state.mark_told(ev["ids"])
            for cid in ev["ids"]:
                plan.on_tell(cid)
            state.ask_due = True
        elif kind == "rescore":
            state.add_rescore(ev)
        elif kind == "fidelity":
            state.forward_passes += int(ev.get("forward_passes", 0))
        elif kind == "end":
            state.ended = True
        last_t = ev.get("t", last_t)
    if session_start is not None and last_t is not None:
        state.active_seconds += last_t - session_start
    return state


class WorkerPool:
    """Ray actors running `Worker`; restarted by Ray when their process dies."""

    def __init__(
        self, backend: Any, *, count: int, num_cpus: float, num_gpus: float, torch_threads: int
    ) -> None:
        import ray

        from evomerge.references import hub_env
        from evomerge.runtime.worker import VERBOSE_ENV, Worker, verbose

        env = hub_env()  # where the driver found (and pinned) the hub models; never the token
        if verbose():  # a cluster's workers do not inherit the driver's environment
            env = {**env, VERBOSE_ENV: "1"}
        remote = ray.remote(Worker).options(
            num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=-1, max_task_retries=0,
            **({"runtime_env": {"env_vars": env}} if env else {}),
        )  # fmt: skip
        self.actors = [remote.remote(backend, torch_threads) for _ in range(count)]

    def pids(self) -> list[int]:
        import ray

        return ray.get([a.pid.remote() for a in self.actors])

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)


def rescore_targets(state: SearchState, weights: np.ndarray, front: bool = True) -> list[str]:
    """Candidates whose reported scores are not exact among the best (by the weighted objective) and, with
    `front`, the Pareto front of the current scores; best first."""
    from evomerge.pareto import non_dominated

    ok = [c for c in state.candidates if (r := state.results.get(c)) is not None and r["status"] == "ok"]
    if not ok:
        return []
    points = np.array([state.results[c]["objectives"] for c in ok], dtype=np.float64)
    on_front = non_dominated(points)
    order = np.argsort(-(points @ weights), kind="stable")
    picks = [ok[i] for i in order if (front and on_front[i]) or i == order[0]]
    return [c for c in picks if not is_exact(state.results[c])]


class Observer(Protocol):
    """Hooks the search calls after each journal write (tracking, live plots). Implementations must return
    quickly (queue the work) and must not raise: the journal, not an observer, is the record of the run.
    A protocol: an observer need not import the runtime (the MLflow tracker sits below it)."""

    def on_ask(self, candidates: list[Candidate]) -> None: ...

    def on_result(self, event: dict[str, Any], candidate: Candidate) -> None: ...

    def on_rescore(self, event: dict[str, Any]) -> None: ...

    def on_end(self, state: SearchState) -> None: ...


@dataclass
class Budget:
    candidates: int | None = None
    forward_passes: int | None = None
    seconds: float | None = None


@dataclass
class Progress:
    """What the CLI shows while a search runs."""

    done: int
    asked: int
    failed: int
    in_flight: int
    best: dict[str, float]
    front_size: int
    seconds: float
    budget: Budget


def _best_scores(state: SearchState, names: list[str]) -> dict[str, float]:
    best: dict[str, float] = {}
    for r in state.results.values():
        if r["status"] == "ok":
            for n in names:
                if n in r["scores"]:
                    best[n] = max(best.get(n, -np.inf), r["scores"][n])
    return best


class Search:
    """Drive one search to its budget (fresh or resumed)."""

    def __init__(
        self,
        strategy: Strategy,
        objectives: Objectives,
        journal: Journal,
        pool: WorkerPool,
        state: SearchState,
        budget: Budget,
        *,
        scheduling: str = "ordered",
        max_retries: int = 2,
        timeout: float | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        observers: list[Observer] | None = None,
        plan: Any = None,
        cache: bool = True,
        rescore: int = 0,
        batch: int = 1,
    ) -> None:
        self.strategy, self.objectives, self.journal, self.pool = strategy, objectives, journal, pool
        self.plan = plan or ExactPlan()
        self.cache, self.rescore_limit = cache, rescore
        self.state, self.budget, self.scheduling, self.max_retries = state, budget, scheduling, max_retries
        self._keys: dict[str, str] = {}
        self.evaluated: dict[str, str] = {}  # recipe hash -> id of its successful result (the cache)
        for cid, r in state.results.items():
            if r["status"] == "ok" and "cached" not in r:
                self.evaluated.setdefault(self.recipe_key(cid), cid)
        self.timeout = timeout
        self.deadlines: dict[
            Any, float
        ] = {}  # evaluation ref -> monotonic time it times out (with a timeout)
        self.on_progress = on_progress
        self.observers = list(observers or [])
        self.attempts: dict[str, int] = {}
        # batched dispatch: `batch` candidates per worker call at most, `count x batch` asked ahead (a fixed
        # window, so an ordered run stays reproducible); the call size follows the measured evaluation time
        self.batch = batch if getattr(self.plan, "one_call", False) else 1  # racing: one candidate per call
        self.eval_seconds: float | None = None  # moving mean of one evaluation, worker side
        self.solo: set[str] = set()  # were in a call whose worker died or timed out: next time alone
        self.session_start = time.time()
        self._next_progress = 0.0

    # ------------------------------------------------------------------ budget and bookkeeping
    def elapsed(self) -> float:
        return self.state.active_seconds + time.time() - self.session_start

    def can_ask(self) -> bool:
        """Budget left, and the strategy has not declared itself done (e.g. GENOME's early stop)."""
        b, s = self.budget, self.state
        if getattr(self.strategy, "done", False):
            return False
        if b.candidates is not None and len(s.candidates) >= b.candidates:
            return False
        if b.forward_passes is not None and s.forward_passes >= b.forward_passes:
            return False
        return not (b.seconds is not None and self.elapsed() >= b.seconds)

    def _ask(self, n: int) -> None:
        if self.budget.candidates is not None:
            n = min(n, self.budget.candidates - len(self.state.candidates))
        if n <= 0:
            return
        batch = self.strategy.ask(n)
        fault_point("ask")  # tests only (evomerge.faults)
        self.journal.append(
            {"event": "ask", "t": time.time(), "n": n, "candidates": [c.to_json() for c in batch]}
        )
        for c in batch:
            self.state.add_candidate(c)
            self.plan.on_ask(c.id, len(self.state.told))
        self._notify("on_ask", batch)

    def _tell(self, ids: list[str]) -> None:
        self.strategy.tell([to_result(self.state.results[i], self.objectives) for i in ids])
        self.journal.append({"event": "tell", "t": time.time(), "ids": ids})
        self.state.mark_told(ids)
        for cid in ids:
            self.plan.on_tell(cid)

    def recipe_key(self, cid: str) -> str:
        """Content hash of a candidate's recipe: equal recipes are one evaluation (the cache)."""
        if cid not in self._keys:
            import hashlib
            import json

            text = json.dumps(
                self.state.candidates[cid].recipe.to_dict(), sort_keys=True, separators=(",", ":")
            )
            self._keys[cid] = hashlib.sha256(text.encode()).hexdigest()
        return self._keys[cid]

    def _from_cache(self, cid: str) -> bool:
        """Record a copy of an earlier evaluation of the same recipe (elitism, duplicate asks): no forward pass."""
        twin = self.evaluated.get(self.recipe_key(cid)) if self.cache else None
        if twin is None:
            return False
        keep = ("scores", "objectives", "samples", "fidelity", "subset_scores")
        payload = {k: v for k, v in self.state.results[twin].items() if k in keep}
        self._record(cid, {**payload, "forward_passes": 0, "seconds": 0.0, "pid": None, "cached": twin}, None)
        self._after_result(cid)
        return True

    def _record(
        self, cid: str, payload: dict[str, Any] | None, error: str | None, reason: str = "error"
    ) -> None:
        event: dict[str, Any] = {
            "event": "result",
            "t": time.time(),
            "id": cid,
            "attempts": self.attempts.get(cid, 1),
        }
        if payload is not None:
            try:
                objectives = self.objectives.vector(payload["scores"])
                if not np.all(np.isfinite(objectives)):
                    raise EvomergeError(f"non-finite objective values {objectives.tolist()}")
            except EvomergeError as e:
                payload, error, reason = None, str(e), "invalid"
        if payload is None:
            event.update(status="failed", reason=reason, error=error, scores={}, objectives=None,
                         forward_passes=0)  # fmt: skip
        else:
            event.update(status="ok", scores=payload["scores"], objectives=objectives.tolist(),
                         samples=payload["samples"], forward_passes=payload["forward_passes"],
                         seconds=payload["seconds"], pid=payload["pid"], node=payload.get("node"))  # fmt: skip
            event.update({k: payload[k] for k in ("fidelity", "subset_scores", "cached") if k in payload})
            if "cached" not in payload:
                self.evaluated.setdefault(self.recipe_key(cid), cid)
        self.journal.append(event)
        self.state.add_result(event)
        self.plan.on_result(event)
        self._notify("on_result", event, self.state.candidates[cid])

    def _after_result(self, cid: str) -> None:
        if self.scheduling == "as_completed":
            self._tell([cid])
            if self.can_ask():
                self._ask(1)
            return
        for pending in list(self.state.pending_tell):
            if pending not in self.state.results:
                break
            self._tell([pending])
            if self.can_ask():
                self._ask(1)

    def progress(self, in_flight: int) -> Progress:
        from evomerge.pareto import non_dominated

        ok = [r for r in self.state.results.values() if r["status"] == "ok"]
        front = non_dominated(np.array([r["objectives"] for r in ok])) if ok else np.zeros(0, bool)
        return Progress(
            done=len(self.state.results), asked=len(self.state.candidates),
            failed=sum(r["status"] != "ok" for r in self.state.results.values()), in_flight=in_flight,
            best=_best_scores(self.state, self.objectives.names), front_size=int(front.sum()),
            seconds=self.elapsed(), budget=self.budget,
        )  # fmt: skip

    # ------------------------------------------------------------------ the loop
    def run(self) -> SearchState:
        with self.journal.grouped():
            return self._run()

    def _run(self) -> SearchState:
        import ray

        for cid in list(self.state.waiting):  # killed between a race's last `rung` (stop/done) and its result
            final = self.plan.settled(cid)
            if final is not None:
                self._record(cid, final, None)
                self._after_result(cid)
        if self.state.ask_due and self.can_ask():  # each tell is followed by one ask(1), also across a kill
            self._ask(1)
        self.state.ask_due = False
        # results recorded but not yet told (ordered mode, killed while an older candidate ran)
        self._after_result_all()
        if not self.state.candidates and self.can_ask():
            self._ask(len(self.pool.actors) * self.batch)
        # ref -> (candidate ids, worker); no ids: a ping to a starting or restarting worker, idle again once it
        # answers (so a timeout never counts a worker's start-up, and a constructor error surfaces here)
        idle: list[int] = []
        in_flight: dict[Any, tuple[tuple[str, ...], int]] = {
            a.pid.remote(): ((), w) for w, a in enumerate(self.pool.actors)
        }
        while True:
            running = {cid for cids, _ in in_flight.values() for cid in cids}
            busy = {self.recipe_key(c) for c in running} if self.cache else set()
            todo: list[str] = []
            for cid in [c for c in self.state.waiting if c not in running]:
                if self._from_cache(cid):
                    continue
                if len(todo) >= len(idle) * self.per_call():
                    break
                if self.cache:
                    if self.recipe_key(cid) in busy:  # its twin is running: wait for that result
                        continue
                    busy.add(self.recipe_key(cid))
                todo.append(cid)
            for cids in self.calls(todo, len(idle))[: len(idle)]:
                for cid in cids:
                    self.attempts[cid] = self.attempts.get(cid, 0) + 1
                    running.add(cid)
                self._dispatch(in_flight, [(cid, self.plan.first(cid)) for cid in cids], idle.pop(0))
            if self.on_progress and time.monotonic() >= self._next_progress:  # the front costs O(n log n)
                self._next_progress = time.monotonic() + PROGRESS_EVERY
                self.on_progress(self.progress(len(running)))
            if not running:
                # candidates asked by the tells of cache hits above: serve them in the next pass
                if self.state.waiting and idle:
                    continue
                if self.can_ask() and not self.state.pending_tell:
                    self._ask(1)
                    continue
                if not idle and in_flight:  # every worker is restarting: wait for one
                    self._collect(ray, in_flight, idle)
                    continue
                break
            self._collect(ray, in_flight, idle)
        if self.on_progress:
            self.on_progress(self.progress(0))
        if not self.can_ask() and not self.state.ended:
            self.rescore_front(ray)
            self.journal.append({"event": "end", "t": time.time(), "candidates": len(self.state.results)})
            self.state.ended = True
        self._notify("on_end", self.state)
        return self.state

    def rescore_front(self, ray: Any) -> None:
        """Winner's-curse guard: the search optimized estimated or partial scores, so the best candidate (and, for a
        multi-objective strategy, the Pareto front) is re-scored on every item: at most `rescore` candidates, best
        first, in waves until the best and the front of the updated scores are exact. A single-objective search
        re-scores its best until the best is exact. Journaled as `rescore` events; resume never redoes one.
        With the cache on, the other candidates of a re-scored recipe get its scores (`rescore` events with
        `cached`, no forward pass, not counted in `rescore`)."""
        tried = {c for c, twin in self.state.rescored.items() if twin is None}
        while len(tried) < self.rescore_limit:
            multi = getattr(self.strategy, "multi_objective", True)
            todo = [c for c in rescore_targets(self.state, self.objectives.weights, multi) if c not in tried]
            if self.cache:  # one evaluation per recipe; its other candidates get copies of its scores
                first: dict[str, str] = {}
                for c in todo:
                    first.setdefault(self.recipe_key(c), c)
                todo = list(first.values())
            todo = todo[: self.rescore_limit - len(tried)]
            if not todo:
                return
            self.journal.sync()
            actors = self.pool.actors
            refs = [actors[i % len(actors)].evaluate.remote(cid, self.state.candidates[cid].recipe.to_dict(), None)
                    for i, cid in enumerate(todo)]  # fmt: skip
            for cid, ref in zip(todo, refs):
                tried.add(cid)
                try:
                    payload = ray.get(ref)
                    objectives = self.objectives.vector(payload["scores"])
                except (ray.exceptions.RayError, EvomergeError) as e:
                    log.warning("re-scoring %s on every item failed: %s", cid, e)
                    continue
                event = {"event": "rescore", "t": time.time(), "id": cid, "scores": payload["scores"],
                         "objectives": objectives.tolist(), "forward_passes": payload["forward_passes"],
                         "seconds": payload["seconds"]}  # fmt: skip
                self.journal.append(event)
                self.state.add_rescore(event)
                self._notify("on_rescore", event)
                if self.cache:
                    key = self.recipe_key(cid)
                    for twin in [c for c, r in self.state.results.items() if c != cid and r["status"] == "ok"
                                 and c not in self.state.rescored and self.recipe_key(c) == key]:  # fmt: skip
                        copy = {**event, "t": time.time(), "id": twin, "forward_passes": 0, "seconds": 0.0,
                                "cached": cid}  # fmt: skip
                        self.journal.append(copy)
                        self.state.add_rescore(copy)
                        self._notify("on_rescore", copy)

    def per_call(self) -> int:
        """Candidates per worker call: as many as the measured evaluation time fits in BATCH_SECONDS, within
        [1, batch] (one until the first result: a seconds-long LLM evaluation stays one per call)."""
        if self.batch == 1 or self.eval_seconds is None:
            return 1
        return max(1, min(self.batch, int(BATCH_SECONDS / max(self.eval_seconds, 1e-6))))

    def calls(self, todo: list[str], workers: int) -> list[list[str]]:
        """`todo` cut into worker calls, in order, spread over the idle workers; a candidate whose last call
        was lost (worker died, timed out) goes alone, so a candidate that kills its worker harms no other."""
        size = max(1, min(self.per_call(), -(-len(todo) // max(workers, 1))))
        out: list[list[str]] = []
        current: list[str] = []
        for cid in todo:
            if cid in self.solo:
                out.append([cid])
                continue
            current.append(cid)
            if len(current) == size:
                out.append(current)
                current = []
        return out + ([current] if current else [])

    def _dispatch(self, in_flight: dict[Any, tuple[tuple[str, ...], int]], calls: list[tuple[str, Any]],
                  w: int) -> None:  # fmt: skip
        """One worker call for `calls` (candidate id, items: None = all); the journal is synced first (the
        driver acts outside itself only on what the journal holds)."""
        self.journal.sync()
        batch = [(cid, self.state.candidates[cid].recipe.to_dict(), items) for cid, items in calls]
        ref = self.pool.actors[w].evaluate_batch.remote(batch)
        in_flight[ref] = (tuple(cid for cid, _ in calls), w)
        if self.timeout is not None:  # per candidate
            self.deadlines[ref] = time.monotonic() + self.timeout * len(calls)

    def _measure(self, payload: dict[str, Any]) -> None:
        seconds = float(payload.get("seconds", 0.0))
        self.eval_seconds = seconds if self.eval_seconds is None else 0.9 * self.eval_seconds + 0.1 * seconds

    def _notify(self, hook: str, *args: Any) -> None:
        for observer in self.observers:
            try:
                getattr(observer, hook)(*args)
            except Exception:  # an observer must never stop the search
                log.exception("observer %s failed in %s", type(observer).__name__, hook)

    def _collect(self, ray: Any, in_flight: dict[Any, tuple[tuple[str, ...], int]], idle: list[int]) -> None:
        """Handle whatever finished: results, failures, dead workers (kept out of `idle` until they answer),
        calls past their deadline."""
        self.journal.sync()
        wait = 5.0
        if self.deadlines:
            wait = min(wait, max(0.0, min(self.deadlines.values()) - time.monotonic()))
        ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=wait)
        for ref in ready:
            cids, w = in_flight.pop(ref)
            self.deadlines.pop(ref, None)
            try:
                outcomes = ray.get(ref)
            except ray.exceptions.RayActorError as e:  # the worker process died or is restarting
                if getattr(e, "actor_init_failed", False):
                    raise WorkerStartError(f"search worker could not start: {init_error(e)}") from None
                time.sleep(0.2)
                in_flight[self.pool.actors[w].pid.remote()] = ((), w)  # idle again once it answers
                if cids:
                    log.warning(
                        "worker %d died while evaluating %s: %s", w, ", ".join(cids), type(e).__name__
                    )
                    self._lost(cids, f"worker died {{attempts}} times ({type(e).__name__})", "worker_died")
                continue  # re-run on a live worker
            except ray.exceptions.RayTaskError as e:  # the call itself failed: every candidate of it
                cause = e.cause if getattr(e, "cause", None) is not None else e
                outcomes = [{"error": f"{type(cause).__name__}: {cause}"}] * len(cids)
            if not cids:
                idle.append(w)
                continue
            promoted = False
            for cid, outcome in zip(cids, outcomes):
                if "error" in outcome:
                    log.warning(
                        "candidate %s failed (attempt %d): %s", cid, self.attempts[cid], outcome["error"]
                    )
                    if self.attempts[cid] > self.max_retries:
                        self._record(cid, None, outcome["error"])
                        self._after_result(cid)
                    continue
                self._measure(outcome["payload"])
                step = self.plan.advance(cid, outcome["payload"])
                if step.rung is not None:
                    self.journal.append({**step.rung, "t": time.time()})
                if (
                    step.items is not None
                ):  # promoted: the same worker scores the next slice of the resident model
                    self._dispatch(in_flight, [(cid, step.items)], w)
                    promoted = True
                    continue
                self._record(cid, step.final, None)
                self._after_result(cid)
            if not promoted:
                idle.append(w)
        self._expire(ray, in_flight)

    def _lost(self, cids: tuple[str, ...], error: str, reason: str) -> None:
        """A call's worker died or timed out. Alone, its candidate is retried or (out of attempts) recorded as
        failed; in a batch, which candidate was at fault is unknown: each runs again alone, this attempt not
        counted."""
        if len(cids) > 1:
            for cid in cids:
                self.attempts[cid] -= 1
                self.solo.add(cid)
            return
        cid = cids[0]
        if self.attempts[cid] > self.max_retries:
            self._record(cid, None, error.format(attempts=self.attempts[cid]), reason)
            self._after_result(cid)

    def _expire(self, ray: Any, in_flight: dict[Any, tuple[tuple[str, ...], int]]) -> None:
        """Kill (Ray restarts it) the worker of each call past its deadline; retry or record a timeout."""
        now = time.monotonic()
        for ref in [r for r, t in self.deadlines.items() if t <= now]:
            del self.deadlines[ref]
            cids, w = in_flight.pop(ref)
            log.warning("candidate %s timed out after %.0f s (attempt %d); restarting worker %d", ", ".join(cids),
                        self.timeout * len(cids), max(self.attempts[c] for c in cids), w)  # fmt: skip
            ray.kill(self.pool.actors[w], no_restart=False)
            in_flight[self.pool.actors[w].pid.remote()] = ((), w)  # idle again once restarted
            self._lost(
                cids, f"timeout: no result within {self.timeout:g} s in {{attempts}} attempts", "timeout"
            )

    def _after_result_all(self) -> None:
        """Tell what the journal holds results for but the strategy was not told (in the mode's order)."""
        if self.scheduling == "as_completed":
            for cid in [c for c in self.state.untold() if c in self.state.results]:
                self._tell([cid])
                if self.can_ask():
                    self._ask(1)
        else:
            self._after_result("")
