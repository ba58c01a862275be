"""A run as its journal tells it (`Record`, built event by event): what the store, sync and the plots
show, including the hypervolume reference point, fixed once from the journal alone (see the package doc)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.config import Objective, RunConfig, load_config
from evomerge.errors import ConfigError
from evomerge.journal import apply_rescore, pinned_models, read_journal
from evomerge.space import build_space
from evomerge.strategies.base import Candidate
from evomerge.tracking.names import (
    CANDIDATE_TAG,
    FRONT_MARK,
    RUN_NAME_TAG,
    flatten_recipe,
    mlflow_key,
    mlflow_value,
)
from evomerge.tracking.state import read_state

log = logging.getLogger(__name__)

REF_SAMPLE = 10  # successful results the reference point is chosen from


@dataclass
class Child:
    """What the store should show for one candidate."""

    name: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    status: str  # RUNNING, FINISHED, FAILED
    start_ms: int
    end_ms: int | None


class Record:
    """A run as its journal tells it, updated event by event: what tracking, sync and the plots show."""

    def __init__(
        self, objectives: Sequence[Objective], *, strategy: str = "", gene_names: Sequence[str] = ()
    ) -> None:
        self.names = [o.name for o in objectives]
        self.signs = np.array([1.0 if o.direction == "maximize" else -1.0 for o in objectives])
        self.strategy = strategy
        self.gene_names = list(gene_names)
        self.candidates: dict[str, Candidate] = {}
        self.asked_t: dict[str, float] = {}
        self.results: dict[str, dict[str, Any]] = {}  # in result order
        self.steps: dict[str, int] = {}
        self.ok: list[str] = []
        self.points: list[list[float]] = []  # objective vectors of `ok`
        self.ref: np.ndarray | None = None
        self.ref_rule = ""
        self.ended = False
        self.start_t: float | None = None  # the journal's first event: when the search began
        self.end_t: float | None = None  # its `end` event: when the search reached its budget
        self._front: tuple[int, set[str]] = (0, set())
        self.ever_front: set[str] = set()  # candidates that were on the front at some flush
        self._series: list[tuple[int, int, dict[str, float]]] = []
        self._series_state: dict[str, Any] = {}
        self._params: dict[str, dict[str, str]] = {}

    # ---------------------------------------------------------------------------- events
    def apply(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if self.start_t is None:
            self.start_t = event.get("t")
        if kind == "ask":
            self.add_ask([Candidate.from_json(c) for c in event["candidates"]], event.get("t", time.time()))
        elif kind == "result":
            self.add_result(event)
        elif kind == "rescore":
            self.add_rescore(event)
        elif kind == "end":
            self.ended = True
            self.end_t = event.get("t", self.end_t)

    def add_ask(self, candidates: Iterable[Candidate], t: float) -> None:
        for c in candidates:
            self.candidates.setdefault(c.id, c)
            self.asked_t.setdefault(c.id, t)

    def add_result(self, event: dict[str, Any], candidate: Candidate | None = None) -> None:
        cid = event["id"]
        if candidate is not None:
            self.add_ask([candidate], event.get("t", time.time()))
        if cid in self.results:  # one result per candidate; keep the first
            return
        self.results[cid] = event
        self.steps[cid] = len(self.results)
        if event["status"] == "ok":
            self.ok.append(cid)
            self.points.append([float(v) for v in event["objectives"]])
            if self.ref is None and len(self.ok) >= REF_SAMPLE:
                self._choose_ref()

    def add_rescore(self, event: dict[str, Any]) -> None:
        """Full-item scores replace a candidate's estimated or partial ones (its point on the front moves)."""
        cid = event["id"]
        if cid not in self.results or self.results[cid]["status"] != "ok":
            return
        self.results[cid] = apply_rescore(self.results[cid], event)
        self.points[self.ok.index(cid)] = [float(v) for v in event["objectives"]]
        self._front = (-1, set())

    def finish(self) -> None:
        """No more results this session: fix r from what there is (fewer than REF_SAMPLE successes)."""
        if self.ref is None and self.ok:
            self._choose_ref()

    def _choose_ref(self) -> None:
        from evomerge.pareto import reference_point

        sample = self.ok[:REF_SAMPLE]
        scores = np.array(
            [[self.results[c]["scores"][n] for n in self.names] for c in sample], dtype=np.float64
        )
        if np.all((scores >= 0) & (scores <= 1)):
            self.ref = np.where(self.signs > 0, 0.0, -1.0)
            self.ref_rule = (
                f"scores of the first {len(sample)} results in [0, 1]: 0 (maximized), -1 (minimized)"
            )
        else:
            self.ref = reference_point(np.array(self.points[:REF_SAMPLE]))
            self.ref_rule = f"pareto.reference_point of the first {len(sample)} results (min - 1% of range)"

    # ---------------------------------------------------------------------------- derived
    def front(self) -> set[str]:
        """Ids on the Pareto front of the successful results (pareto.non_dominated, journal order)."""
        from evomerge.pareto import non_dominated

        if self._front[0] != len(self.ok):
            mask = non_dominated(np.array(self.points)) if self.ok else np.zeros(0, bool)
            self._front = (len(self.ok), {self.ok[i] for i in np.flatnonzero(mask)})
        return self._front[1]

    def front_ids(self) -> list[str]:
        front = self.front()
        return [c for c in self.ok if c in front]

    def knee(self) -> str | None:
        from evomerge.pareto import knee_point

        return self.ok[knee_point(np.array(self.points))] if self.ok else None

    def scores_of(self, ids: Sequence[str]) -> np.ndarray:
        return np.array([[self.results[c]["scores"][n] for n in self.names] for c in ids], dtype=np.float64)

    def series(self) -> list[tuple[int, int, dict[str, float]]]:
        """Parent metrics (step, time ms, {key: value}) at each successful evaluation, once r is fixed."""
        from evomerge.pareto import hypervolume

        if self.ref is None:
            return self._series
        st = self._series_state
        if not st:
            st.update(done=0, archive=np.empty((0, len(self.names))), best=None, hv_ok=True)
        ids = list(self.results)
        for cid in ids[st["done"] :]:
            r = self.results[cid]
            st["done"] += 1
            if r["status"] != "ok":
                continue
            p = np.asarray(r["objectives"], dtype=np.float64)
            archive = st["archive"]
            if not np.any(np.all(archive >= p, axis=1)):
                st["archive"] = np.vstack([archive[~np.all(p >= archive, axis=1)], p])
            st["best"] = p if st["best"] is None else np.maximum(st["best"], p)
            values = {"front_size": float(len(st["archive"]))}
            values.update(
                {f"best/{mlflow_key(n)}": float(s * b) for n, s, b in zip(self.names, self.signs, st["best"])}
            )
            if st["hv_ok"]:
                try:
                    values["hypervolume"] = hypervolume(st["archive"], self.ref)
                except (ValueError, ImportError) as e:  # e.g. more objectives than moocore handles
                    log.warning("hypervolume not tracked: %s", e)
                    st["hv_ok"] = False
            self._series.append((self.steps[cid], int(r.get("t", time.time()) * 1000), values))
        return self._series

    def params_of(self, cid: str) -> dict[str, str]:
        if cid not in self._params:
            c = self.candidates[cid]
            params = flatten_recipe(c.recipe)
            if c.genome is not None:
                genes = self.gene_names if len(self.gene_names) == len(c.genome) else range(len(c.genome))
                params.update(
                    {mlflow_key(f"gene/{g}"): mlflow_value(float(v)) for g, v in zip(genes, c.genome)}
                )
            self._params[cid] = params
        return self._params[cid]

    def child(self, cid: str) -> Child:
        c = self.candidates[cid]
        r = self.results.get(cid)
        on_front = cid in self.front()
        name = f"g{c.generation:03d}-{cid}" + (FRONT_MARK if on_front else "")
        status = "running" if r is None else r["status"]
        tags = {
            CANDIDATE_TAG: cid,
            RUN_NAME_TAG: name,
            "strategy": self.strategy,
            "generation": str(c.generation),
            "parents": ",".join(c.parents) or "-",
            "status": status,
            "pareto": str(on_front).lower(),
        }
        tags.update(
            {
                mlflow_key(f"info.{k}"): mlflow_value(v)
                for k, v in c.info.items()
                if isinstance(v, (str, int, float, bool))
            }
        )
        metrics: dict[str, float] = {}
        if r is not None and r["status"] == "ok":
            metrics.update(
                {mlflow_key(k): float(v) for k, v in r["scores"].items() if isinstance(v, (int, float))}
            )
            metrics.update(
                {f"objective/{mlflow_key(n)}": float(v) for n, v in zip(self.names, r["objectives"])}
            )
            metrics.update(
                {f"eval/{k}": float(r[k]) for k in ("seconds", "forward_passes", "attempts") if k in r}
            )
            tags.update(fidelity_tags(r))
            metrics.update(fidelity_metrics(r))
        elif r is not None:
            tags["error"] = str(r.get("error") or "")[:5000]
            metrics["eval/attempts"] = float(r.get("attempts", 1))
        return Child(
            name=name,
            tags=tags,
            params=self.params_of(cid),
            metrics=metrics,
            status="RUNNING" if r is None else ("FINISHED" if r["status"] == "ok" else "FAILED"),
            start_ms=int(self.asked_t.get(cid, time.time()) * 1000),
            end_ms=None if r is None else int(r.get("t", time.time()) * 1000),
        )


def fidelity_tags(r: dict[str, Any]) -> dict[str, str]:
    """How the child's scores were measured: `fidelity.exact` true|false, mode, rung, stopped, rescored, cached."""
    fid = r.get("fidelity", {})
    tags = {"fidelity.exact": str(bool(fid.get("exact", True))).lower()}
    tags.update({f"fidelity.{k}": mlflow_value(fid[k]) for k in ("mode", "estimator", "rung") if k in fid})
    tags.update({f"fidelity.{k}": "true" for k in ("stopped", "rescored", "estimated") if fid.get(k)})
    if "cached" in r:
        tags["fidelity.cached_from"] = str(r["cached"])
    return tags


def fidelity_metrics(r: dict[str, Any]) -> dict[str, float]:
    """Items seen per task, and the search's own (estimated/partial) scores of a re-scored candidate."""
    fid = r.get("fidelity", {})
    out = {f"fidelity/items/{mlflow_key(t)}": float(n) for t, n in fid.get("items", {}).items()}
    for t, v in r.get("estimate", {}).get("scores", {}).items():
        out[f"estimate/{mlflow_key(t)}"] = float(v)
    return out


def journal_objectives(config: RunConfig, events: Sequence[dict[str, Any]]) -> list[Objective]:
    """The config's objectives, else one maximized objective per score of the first successful result."""
    if config.objectives:
        return list(config.objectives)
    ok = next((e for e in events if e.get("event") == "result" and e.get("status") == "ok"), None)
    return [Objective(name=n) for n in (ok["scores"] if ok else [])]


def gene_names_of(run_dir: Path, config: RunConfig, events: list[dict[str, Any]]) -> list[str]:
    """The space's gene names: as the tracker recorded them, else from the space (when it builds here)."""
    state = read_state(run_dir)
    if state.get("gene_names"):
        return list(state["gene_names"])
    try:
        pinned = pinned_models(events)
        if pinned is None:
            return []  # the models would be resolved (or a zoo built) again here
        return list(build_space(config, pinned[0], pinned[1]).names)
    except Exception:  # noqa: BLE001 - the names are a nicety; genes fall back to their index
        return []


def load_record(run_dir: str | Path, *, finish: bool = True) -> tuple[RunConfig, Record]:
    """The record of a run directory from its journal (works while the run is going). `finish`: fix the
    reference point even when fewer than REF_SAMPLE results succeeded so far."""
    run_dir = Path(run_dir)
    if not (run_dir / "journal.jsonl").exists():
        raise ConfigError(f"{run_dir}: no journal.jsonl (not a run directory?)")
    config = load_config(run_dir / "config.yaml")
    events = read_journal(run_dir / "journal.jsonl", repair=False)
    record = Record(
        journal_objectives(config, events),
        strategy=config.strategy.name,
        gene_names=gene_names_of(run_dir, config, events),
    )
    for ev in events:
        record.apply(ev)
    if finish or record.ended:
        record.finish()
    return config, record
