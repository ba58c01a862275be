"""MLflow tracking of a search: a parent run per search, a child run per candidate, Pareto plots and tables.

What the store holds
- The parent run (name = the config's name): params = the flattened run config plus `evomerge_version`,
  `git_commit` (when the code is a git checkout), `run_dir`, `config_hash` and the hypervolume reference
  point (`hv_ref`, `hv_ref_rule`); tags `evomerge.run_dir` (how `resume` and `evomerge sync` find the run
  again: the newest parent with that tag), `strategy`, `objectives`; metrics with step = number of
  evaluations (results so far, failed ones included): `hypervolume`, `best/<objective>` (in the score's own
  direction) and `front_size`; artifacts `config.yaml`, `pareto.csv`, `pareto.png`, `parallel.png` (3 or
  more objectives), `progress.png` and `front_recipes.yaml`, refreshed every `artifact_every` results or
  `artifact_seconds` seconds, and at the end.
- A child run per candidate, named `g003-c00012` (generation, id; ` ★` appended while on the front);
  params = the recipe with readable names (`expert_rev.weight`, `lambda`,
  `slices.0.layers0-1.expert_rev.density`) and the genome by gene name (`gene/weight/expert_rev`);
  metrics = the per-task scores, `objective/<name>` (the maximized vector the strategy sees) and
  `eval/seconds`, `eval/forward_passes`, `eval/attempts`; tags `strategy`, `generation`, `parents`,
  `status` (running, ok, failed), `error`, `pareto` (`true`/`false`, re-tagged on exactly the children
  whose membership changed when the front moves) and `evomerge.candidate`.

Where: by default `sqlite:///<run dir>/mlflow.db` (created atomically: MLflow's schema migrations are not
transactional, and a run killed during them would leave a database MLflow cannot open; they run on a temp
file that is linked into place) with artifacts in `<run dir>/mlartifacts` (see it with
`mlflow ui --backend-store-uri sqlite:///runs/x/mlflow.db`); `tracking.uri` names another store (a team
server); the experiment is `tracking.experiment`, else the config's name. A sqlite store keeps its
artifacts in `mlartifacts/` next to the database file (MLflow would otherwise use `./mlruns` of the current
directory); a server keeps them where it is configured to.

Hypervolume reference point r: fixed once per run and recorded (`hv_ref`, `hv_ref_rule`), chosen from the
first 10 successful results in journal order (or all of them when the run has fewer): when all their
scores lie in [0, 1] (accuracies, lm-eval's metrics), r = 0 for a maximized score and -1 for a minimized
one (whose objective is -score), the worst values such scores can take; otherwise r =
`pareto.reference_point` of those points (per-objective minimum minus 1% of the range), and later points
that are not better than r in every objective add nothing. Parent metrics start once r is fixed and cover
every evaluation from the first. r depends on the journal alone, so the live tracker, `evomerge sync` and
`evomerge front --plot` agree.

Never in the search's way: the MLflow work runs in a separate process (`MLflowTracker` starts it; measured on
2 cores with a 60-candidate, 0.2 s-per-candidate search, the same work in a thread of the driver slowed the
search loop by 4-6% through the GIL, the process leaves it unchanged). That process follows the journal, which
the search writes before it calls any observer, so the hooks cost nothing (`on_end` only tells it to flush at
once, overlapping Ray's teardown); it waits until the first result before importing MLflow (~2 s of CPU that
would otherwise compete with the workers' start-up) and runs at nice 19 (Ray's workers run at 15), then
flushes every `flush_seconds`: what arrived since the last flush, coalesced into one `log_batch` per run
holding only what changed (MLflow has no bulk run creation: a new child costs `create_run`, `log_batch` and
`set_terminated`). The first failure (server down, bad URI, disk full) is logged once as a warning; the
process stops writing and records "needs sync" in `<run dir>/tracking.json`; the search goes on. `evomerge
sync RUN_DIR` (`sync`) makes the store match the journal, idempotently: missing parent and children created,
wrong metrics, tags and names fixed, duplicate children removed.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import yaml

import evomerge
from evomerge.config import Objective, RunConfig, load_config
from evomerge.errors import ConfigError, EvomergeError
from evomerge.merge.recipe import Recipe
from evomerge.references import display_name
from evomerge.runtime.search import Observer, SearchState
from evomerge.strategies.base import Candidate

log = logging.getLogger(__name__)

STATE_FILE = "tracking.json"
RUN_DIR_TAG = "evomerge.run_dir"
CANDIDATE_TAG = "evomerge.candidate"
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
FRONT_MARK = " ★"
REF_SAMPLE = 10  # successful results the reference point is chosen from
MAX_PAIR_OBJECTIVES = 6  # pareto.png: one panel per pair of the first 6 objectives (15 panels)


class TrackingError(EvomergeError):
    pass


def default_uri(run_dir: str | Path) -> str:
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def _artifact_location(uri: str) -> str | None:
    """`mlartifacts/` beside a sqlite database; None (the server's default) for any other store."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


# ------------------------------------------------------------------------------------------ names


_BAD_KEY_CHARS = re.compile(r"[^/\w.\- ]")


def _key(name: str) -> str:
    """An MLflow param/metric/tag key for `name`: alphanumerics, _ - . space and single inner slashes."""
    key = _BAD_KEY_CHARS.sub("_", str(name).replace("*", "all"))
    parts = [p for p in key.split("/") if p not in ("", ".", "..")]
    return "/".join(parts)[:250] or "_"


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (int, str)):
        return str(value)[:6000]
    return json.dumps(value, separators=(",", ":"), default=str)[:6000]


def _layers(layer_range: Sequence[int]) -> str:
    a, b = int(layer_range[0]), int(layer_range[1])
    return f"layers{a}-{b - 1}" if b - a > 1 else f"layers{a}"


def _flatten_model_space(d: dict[str, Any]) -> dict[str, str]:
    """A model-space recipe as a few params: a mixture's size-weighted mean coefficient per model and its
    segment count (the exact coefficients are in the journal); an offspring's crossover settings."""
    if d["kind"] == "offspring":
        out = {f"parent{i}": display_name(p) for i, p in enumerate(d["parents"])}
        out.update({k: _fmt(d[k]) for k in ("weight", "split", "noise_std") if d.get(k) is not None})
        return out
    starts = np.asarray(d["starts"], dtype=np.float64)
    lengths = np.diff(np.append(starts, d["size"]))
    means = lengths @ np.asarray(d["coefficients"], dtype=np.float64) / d["size"]
    out = {f"{_key(display_name(m))}.weight_mean": _fmt(float(v)) for m, v in zip(d["models"], means)}
    out["segments"] = str(len(starts))
    return out


def flatten_recipe(recipe: Recipe | dict[str, Any]) -> dict[str, str]:
    """The recipe as MLflow params with readable names: models by directory name, layer ranges inclusive.

    `models:` recipes give `<model>.<param>`; `slices:` recipes `slices.<i>.layers<a>-<b>.<model>.<param>`
    (slice-level: `slices.<i>.layers<a>-<b>.<param>`); recipe-level parameters keep their bare name. A
    filtered setting adds the filter (`expert.weight.mlp`, `expert.weight.all` for the default); a gradient
    list is one JSON value."""
    d = dict(recipe) if isinstance(recipe, dict) else recipe.to_dict()
    if d.get("kind") in ("mixture", "offspring"):
        return _flatten_model_space(d)
    refs = [d.get("base_model")] if d.get("base_model") else []
    refs += [m["model"] for m in d.get("models") or []]
    refs += [src["model"] for s in d.get("slices") or [] for src in s["sources"]]
    refs = list(dict.fromkeys(refs))
    short = [display_name(r) for r in refs]
    labels = {
        r: (f"{lab}_{i}" if short.count(lab) > 1 else lab) for i, (r, lab) in enumerate(zip(refs, short))
    }
    out: dict[str, str] = {}

    def put(name: str, value: Any) -> None:
        key = _key(name)
        while key in out:
            key += "_"
        out[key] = _fmt(value)

    def settings(prefix: str, params: dict[str, Any] | None) -> None:
        for name, setting in (params or {}).items():
            conds = [setting] if isinstance(setting, dict) else setting
            if isinstance(conds, list) and conds and all(isinstance(c, dict) for c in conds):
                for c in conds:
                    put(f"{prefix}{name}.{c.get('filter') or 'all'}", c.get("value"))
            else:
                put(f"{prefix}{name}", setting)

    put("merge_method", d["merge_method"])
    if d.get("base_model"):
        put("base_model", labels[d["base_model"]])
    for k in ("dtype", "out_dtype", "tokenizer_source", "random_seed"):
        if d.get(k) is not None:
            put(k, d[k])
    settings("", d.get("parameters"))
    for m in d.get("models") or []:
        settings(f"{labels[m['model']]}.", m.get("parameters"))
    for i, s in enumerate(d.get("slices") or []):
        settings(f"slices.{i}.{_layers(s['sources'][0]['layer_range'])}.", s.get("parameters"))
        for src in s["sources"]:
            settings(
                f"slices.{i}.{_layers(src['layer_range'])}.{labels[src['model']]}.", src.get("parameters")
            )
    return out


def _flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> dotted keys; lists of mappings by index, lists of scalars as one JSON value."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(data, list) and any(isinstance(v, dict) for v in data):
        for i, v in enumerate(data):
            out.update(_flatten(v, f"{prefix}.{i}"))
    elif data is not None:
        out[_key(prefix)] = _fmt(data)
    return out


_SECRET_WORDS = {"token", "key", "apikey", "secret", "password", "passwd", "pwd", "credential", "credentials",
                 "auth", "authorization"}  # fmt: skip
REDACTED = "***"


def _is_secret(key: str) -> bool:
    """A config key that names a secret: one of its words (split at `_-.` and case changes) is token, key,
    secret, password, ... (`hf_token`, `api_key`, `apiKey`, `db.password`; not `max_new_tokens`)."""
    leaf = str(key).rsplit(".", 1)[-1]
    words = re.split(r"[_\-\s]+|(?<=[a-z])(?=[A-Z])", leaf)
    return any(w.lower() in _SECRET_WORDS for w in words if w)


def _redact_url(value: str) -> str:
    """`scheme://user:password@host` -> `scheme://user:***@host`; a token in the query string likewise."""
    value = re.sub(r"(://[^/:@\s]*):[^@/\s]*@", rf"\1:{REDACTED}@", value)
    return re.sub(
        r"([?&][^=&#]*?(?:token|key|secret|password|passwd|pwd|auth)[^=&#]*=)[^&#]*",
        rf"\1{REDACTED}",
        value,
        flags=re.IGNORECASE,
    )


def redact(data: Any, key: str = "") -> Any:
    """A copy of a config (mapping, list or scalar) safe to log: values under secret-named keys replaced by
    `***`, passwords and tokens in URLs too. Used for the parent run's params and its config.yaml artifact."""
    if isinstance(data, dict):
        return {k: (REDACTED if _is_secret(k) and v is not None else redact(v, k)) for k, v in data.items()}
    if isinstance(data, list):
        return [redact(v, key) for v in data]
    if isinstance(data, str):
        return _redact_url(data)
    return data


def _git_commit() -> str | None:
    """HEAD of the checkout evomerge runs from (`-dirty` when tracked files differ), or None."""
    root = Path(evomerge.__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "") if head else None


# ------------------------------------------------------------------------------------------ the record


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
        from evomerge.runtime.journal import apply_rescore

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
                {f"best/{_key(n)}": float(s * b) for n, s, b in zip(self.names, self.signs, st["best"])}
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
                params.update({_key(f"gene/{g}"): _fmt(float(v)) for g, v in zip(genes, c.genome)})
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
            {_key(f"info.{k}"): _fmt(v) for k, v in c.info.items() if isinstance(v, (str, int, float, bool))}
        )
        metrics: dict[str, float] = {}
        if r is not None and r["status"] == "ok":
            metrics.update({_key(k): float(v) for k, v in r["scores"].items() if isinstance(v, (int, float))})
            metrics.update({f"objective/{_key(n)}": float(v) for n, v in zip(self.names, r["objectives"])})
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
    tags.update({f"fidelity.{k}": _fmt(fid[k]) for k in ("mode", "estimator", "rung") if k in fid})
    tags.update({f"fidelity.{k}": "true" for k in ("stopped", "rescored", "estimated") if fid.get(k)})
    if "cached" in r:
        tags["fidelity.cached_from"] = str(r["cached"])
    return tags


def fidelity_metrics(r: dict[str, Any]) -> dict[str, float]:
    """Items seen per task, and the search's own (estimated/partial) scores of a re-scored candidate."""
    fid = r.get("fidelity", {})
    out = {f"fidelity/items/{_key(t)}": float(n) for t, n in fid.get("items", {}).items()}
    for t, v in r.get("estimate", {}).get("scores", {}).items():
        out[f"estimate/{_key(t)}"] = float(v)
    return out


def _objectives(config: RunConfig, events: Sequence[dict[str, Any]]) -> list[Objective]:
    if config.objectives:
        return list(config.objectives)
    ok = next((e for e in events if e.get("event") == "result" and e.get("status") == "ok"), None)
    return [Objective(name=n) for n in (ok["scores"] if ok else [])]


def _gene_names(run_dir: Path, config: RunConfig) -> list[str]:
    """The space's gene names: as the tracker recorded them, else from the space (when it builds here)."""
    state = _read_state(run_dir)
    if state.get("gene_names"):
        return list(state["gene_names"])
    try:
        from evomerge.runtime.journal import read_journal
        from evomerge.runtime.run import build_space

        start = next(
            (e for e in read_journal(run_dir / "journal.jsonl", repair=False) if e["event"] == "start"), {}
        )
        if "models" not in start:
            return []  # the models would be resolved (or a zoo built) again here
        models = start["models"]  # as the run pinned them
        return list(build_space(config, models["base"], list(models["sources"])).names)
    except Exception:  # noqa: BLE001 - the names are a nicety; genes fall back to their index
        return []


def load_record(run_dir: str | Path, *, finish: bool = True) -> tuple[RunConfig, Record]:
    """The record of a run directory from its journal (works while the run is going). `finish`: fix the
    reference point even when fewer than REF_SAMPLE results succeeded so far."""
    from evomerge.runtime.journal import read_journal

    run_dir = Path(run_dir)
    if not (run_dir / "journal.jsonl").exists():
        raise ConfigError(f"{run_dir}: no journal.jsonl (not a run directory?)")
    config = load_config(run_dir / "config.yaml")
    events = read_journal(run_dir / "journal.jsonl", repair=False)
    record = Record(
        _objectives(config, events), strategy=config.strategy.name, gene_names=_gene_names(run_dir, config)
    )
    for ev in events:
        record.apply(ev)
    if finish or record.ended:
        record.finish()
    return config, record


# ------------------------------------------------------------------------------------------ artifacts


def _figure(width: float, height: float) -> Any:
    """A standalone Agg figure: no pyplot, so no global figure registry and nothing to leak between figures."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)  # manual margins: constrained layout doubles the cost
    FigureCanvasAgg(fig)
    return fig


def plot_front(path: str | Path, record: Record) -> Path:
    """pareto.png: every successful candidate (coloured by evaluation order), the front circled, the knee
    starred; one panel per pair of objectives (the first 6), or score over evaluations for one objective."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    path = Path(path)
    names, dirs = record.names, ["max" if s > 0 else "min" for s in record.signs]
    n = len(record.ok)
    fig = _figure(6.0, 4.5)
    if n == 0:
        fig.text(0.5, 0.5, "no successful candidate yet", ha="center")
        fig.savefig(path)
        return path
    scores = record.scores_of(record.ok)
    front = np.array([c in record.front() for c in record.ok])
    order = np.arange(1, n + 1)
    knee = record.ok.index(record.knee())
    if len(names) == 1:
        pairs, xs = [(None, 0)], {None: order}
    else:
        pairs = list(combinations(range(min(len(names), MAX_PAIR_OBJECTIVES)), 2))
        xs = {i: scores[:, i] for i in range(len(names))}
    cols = min(3, len(pairs))
    rows = -(-len(pairs) // cols)
    fig.set_size_inches(5.2 * cols, 4.4 * rows)
    for k, (i, j) in enumerate(pairs):
        ax = fig.add_subplot(rows, cols, k + 1)
        x, y = xs[i], scores[:, j]
        ax.scatter(
            x[~front],
            y[~front],
            c=order[~front],
            cmap="viridis",
            vmin=1,
            vmax=max(n, 2),
            s=16,
            alpha=0.7,
            linewidths=0,
            label="candidate",
        )
        ax.scatter(
            x[front],
            y[front],
            c=order[front],
            cmap="viridis",
            vmin=1,
            vmax=max(n, 2),
            s=46,
            edgecolors="crimson",
            linewidths=1.6,
            label="Pareto front",
        )
        if len(names) == 2:
            line = np.argsort(x[front])
            ax.plot(x[front][line], y[front][line], color="crimson", lw=0.8, alpha=0.6)
        ax.scatter(
            [x[knee]],
            [y[knee]],
            marker="*",
            s=240,
            color="gold",
            edgecolors="black",
            linewidths=0.8,
            zorder=5,
            label=f"knee {record.ok[knee]}",
        )
        ax.set_xlabel("evaluation" if i is None else f"{names[i]} ({dirs[i]})")
        ax.set_ylabel(f"{names[j]} ({dirs[j]})")
        ax.grid(alpha=0.3)
        if k == 0:
            ax.legend(fontsize=8, loc="best")
    fig.subplots_adjust(
        left=0.1 / cols + 0.04,
        right=0.86 if cols == 1 else 0.95,
        bottom=0.12 / rows + 0.02,
        top=1 - 0.1 / rows,
        wspace=0.3,
        hspace=0.3,
    )
    fig.colorbar(
        ScalarMappable(Normalize(1, max(n, 2)), cmap="viridis"),
        ax=fig.axes,
        label="evaluation",
        shrink=0.8,
        pad=0.03,
    )
    fig.suptitle(f"Pareto front: {int(front.sum())} of {n} successful candidates")
    fig.savefig(path)
    return path


def plot_parallel(path: str | Path, record: Record) -> Path:
    """parallel.png: parallel coordinates of the objectives (each scaled to [0, 1] over all candidates,
    1 = best), the front in colour over the rest in grey."""
    from matplotlib.collections import LineCollection

    path = Path(path)
    m = len(record.names)
    fig = _figure(max(6.0, 1.7 * m), 4.8)
    ax = fig.add_subplot(1, 1, 1)
    if record.ok:
        obj = np.array(record.points)
        lo, hi = obj.min(axis=0), obj.max(axis=0)
        x = (obj - lo) / np.where(hi > lo, hi - lo, 1.0)
        front = np.array([c in record.front() for c in record.ok])
        axes_x = np.arange(m)
        rest = [np.column_stack([axes_x, row]) for row in x[~front]]
        ax.add_collection(LineCollection(rest, colors="0.7", linewidths=0.6, alpha=0.5))
        knee = record.knee()
        colors = [f"C{i % 10}" for i in range(int(front.sum()))]
        for color, i in zip(colors, np.flatnonzero(front)):
            wide = record.ok[i] == knee
            ax.plot(
                axes_x,
                x[i],
                color=color,
                lw=2.4 if wide else 1.2,
                label=record.ok[i] + (" (knee)" if wide else "") if front.sum() <= 12 or wide else None,
            )
        for k in range(m):
            worst, best = record.signs[k] * lo[k], record.signs[k] * hi[k]
            ax.text(k, -0.06, f"{worst:.3g}", ha="center", va="top", fontsize=8)
            ax.text(k, 1.06, f"{best:.3g}", ha="center", va="bottom", fontsize=8)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_xlim(-0.2, m - 0.8)
    ax.set_ylim(-0.15, 1.15)
    ax.set_xticks(
        range(m), [f"{n}\n({'max' if s > 0 else 'min'})" for n, s in zip(record.names, record.signs)]
    )
    ax.set_ylabel("scaled objective (1 = best seen)")
    ax.grid(axis="x", alpha=0.5)
    ax.set_title(f"{len(record.front())} front candidates (colour) of {len(record.ok)}")
    fig.subplots_adjust(left=0.1, right=0.8, bottom=0.16, top=0.9)
    fig.savefig(path)
    return path


def plot_progress(path: str | Path, record: Record) -> Path:
    """progress.png: hypervolume (fixed r) and best score per objective over evaluations."""
    path = Path(path)
    series = record.series()
    fig = _figure(7.0, 6.0)
    top, bottom = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2)
    if series:
        steps = [s for s, _, _ in series]
        last = max(len(record.results), steps[-1])
        if "hypervolume" in series[-1][2]:
            hv = [v["hypervolume"] for _, _, v in series]
            top.step(steps + [last], hv + hv[-1:], where="post", color="crimson")
        ref = ", ".join(f"{v:.3g}" for v in record.ref)
        top.set_title(f"hypervolume (reference point [{ref}])", fontsize=10)
        for n in record.names:
            best = [v[f"best/{_key(n)}"] for _, _, v in series]
            bottom.step(steps + [last], best + best[-1:], where="post", label=n)
        bottom.legend(fontsize=8, loc="best")
    else:
        top.text(0.5, 0.5, "no successful evaluation yet", ha="center", transform=top.transAxes)
    top.set_ylabel("hypervolume")
    bottom.set_ylabel("best score so far")
    bottom.set_xlabel("evaluations")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.09, top=0.95, hspace=0.28)
    fig.savefig(path)
    return path


def write_plots(record: Record, out_dir: str | Path) -> list[Path]:
    """pareto.png, progress.png and (3 or more objectives) parallel.png in out_dir."""
    out_dir = Path(out_dir)
    paths = [plot_front(out_dir / "pareto.png", record), plot_progress(out_dir / "progress.png", record)]
    if len(record.names) >= 3:
        paths.append(plot_parallel(out_dir / "parallel.png", record))
    return paths


def write_tables(record: Record, out_dir: str | Path) -> list[Path]:
    """pareto.csv (one row per front candidate) and front_recipes.yaml (the front's recipes)."""
    out_dir = Path(out_dir)
    ids = record.front_ids()
    knee = record.knee()
    tasks = list(dict.fromkeys(k for c in ids for k in record.results[c]["scores"]))

    def predicted(cand: Candidate) -> list[Any]:
        """A strategy's prediction of each (maximized) objective, from info["predicted"] keyed by objective
        name or index (MAP); empty where it made none."""
        pred = cand.info.get("predicted") or {}
        by_index = {str(i): n for i, n in enumerate(record.names)}
        values = {by_index.get(str(k), str(k)): v for k, v in pred.items()}
        return [values.get(n, "") for n in record.names]

    with open(out_dir / "pareto.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["id", "generation", "step", "knee", *tasks, *(f"objective/{n}" for n in record.names), "recipe",
             *(f"predicted/{n}" for n in record.names)]
        )  # fmt: skip
        for c in ids:
            r, cand = record.results[c], record.candidates[c]
            w.writerow(
                [
                    c,
                    cand.generation,
                    record.steps[c],
                    str(c == knee).lower(),
                    *(r["scores"].get(t, "") for t in tasks),
                    *r["objectives"],
                    json.dumps(cand.recipe.to_dict(), separators=(",", ":")),
                    *predicted(cand),
                ]
            )
    doc = {
        "objectives": [
            {"name": n, "direction": "maximize" if s > 0 else "minimize"}
            for n, s in zip(record.names, record.signs)
        ],
        "reference_point": None if record.ref is None else [float(v) for v in record.ref],
        "knee": knee,
        "front": [
            {
                "id": c,
                "generation": record.candidates[c].generation,
                "scores": record.results[c]["scores"],
                "recipe": record.candidates[c].recipe.to_dict(),
            }
            for c in ids
        ],
    }
    (out_dir / "front_recipes.yaml").write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    return [out_dir / "pareto.csv", out_dir / "front_recipes.yaml"]


def write_artifacts(record: Record, out_dir: str | Path) -> list[Path]:
    paths = write_tables(record, out_dir)
    try:
        paths += write_plots(record, out_dir)
    except ImportError as e:  # matplotlib is optional for the tables
        log.warning("plots skipped (%s)", e)
    return paths


# ------------------------------------------------------------------------------------------ the store


def _read_state(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _write_state(run_dir: Path, **updates: Any) -> None:
    state = {**_read_state(run_dir), **updates, "updated": time.time()}
    tmp = run_dir / f".{STATE_FILE}.{os.getpid()}.{threading.get_ident()}.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, run_dir / STATE_FILE)


def _check_server(uri: str) -> None:
    """Fail fast on an unreachable server (MLflow's own client retries for minutes)."""
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
        except requests.RequestException as e:
            raise TrackingError(f"tracking server {uri} is not reachable ({_one_line(e)})") from None


def _create_sqlite_store(uri: str) -> None:
    """Create a new sqlite store atomically. MLflow builds its schema with a few seconds of migrations that
    are not transactional: a process killed meanwhile would leave a database MLflow can never open again.
    They run on a temp file here, linked into place once complete (a store created meanwhile wins)."""
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri.removeprefix("sqlite:///"))
    if path.exists():
        return
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    for stale in path.parent.glob(f".{path.name}.*.tmp*"):  # left by a killed process
        pid = stale.name.removeprefix(f".{path.name}.").split(".")[0]
        try:
            os.kill(int(pid), 0)
        except (ValueError, ProcessLookupError):
            stale.unlink(missing_ok=True)
        except OSError:
            pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    tmp_uri = f"sqlite:///{tmp}"
    try:
        SqlAlchemyStore(tmp_uri, _artifact_location(uri)).engine.dispose()
        getattr(SqlAlchemyStore, "_engine_map", {}).pop(tmp_uri, None)
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass
class _Known:
    """What the store holds for one run (as read back or as written)."""

    run_id: str
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    status: str = "RUNNING"
    end_ms: int | None = None


def _quote(value: str) -> str:
    if "'" in value:
        raise ValueError("quote in filter value")
    return f"'{value}'"


def _ms(t: float | None) -> int:
    """A journal time (s) as MLflow's ms; now when the journal has none."""
    return int(round((time.time() if t is None else t) * 1000))


class Store:
    """One run's parent and children in an MLflow store; pushes the difference between a Record and what
    the store holds (read back by `load`, or remembered from earlier pushes)."""

    def __init__(self, uri: str, run_dir: Path, config: RunConfig, record: Record,
                 models: dict[str, Any] | None = None) -> None:  # fmt: skip
        for name in ("mlflow.store.db.utils", "alembic"):  # migration chatter on a new database
            logging.getLogger(name).setLevel(logging.WARNING)
        _check_server(uri)
        _create_sqlite_store(uri)
        from mlflow import MlflowClient

        self.uri, self.run_dir, self.config, self.record = uri, run_dir.resolve(), config, record
        self.models = models  # the pinned references the workers use (hub ids at their commit)
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id = ""
        self.parent: _Known | None = None
        self.children: dict[str, _Known] = {}
        self.parent_steps: dict[str, set[int]] = {}
        self.removed = 0

    @property
    def parent_id(self) -> str:
        assert self.parent is not None, "attach() first"
        return self.parent.run_id

    # ---------------------------------------------------------------------------- attach
    def experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        name = self.config.tracking.experiment or self.config.name
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            try:
                return self.client.create_experiment(name, artifact_location=_artifact_location(self.uri))
            except MlflowException:  # created meanwhile by another run
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            self.client.restore_experiment(exp.experiment_id)
        return exp.experiment_id

    def _search(self, flt: str, order_by: list[str] | None = None) -> list[Any]:
        runs, token = [], None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], flt, max_results=1000, order_by=order_by, page_token=token
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def attach(self, *, fresh: bool) -> None:
        """Find the run's parent (the newest with its run-dir tag) or create one; `fresh`: always create."""
        self.experiment_id = self.experiment()
        run_dir = str(self.run_dir)
        found = None
        if not fresh:
            try:
                runs = self._search(
                    f"tags.`{RUN_DIR_TAG}` = {_quote(run_dir)}", ["attributes.start_time DESC"]
                )
            except ValueError:
                runs = [
                    r
                    for r in self._search("tags.`evomerge.kind` = 'search'", ["attributes.start_time DESC"])
                    if r.data.tags.get(RUN_DIR_TAG) == run_dir
                ]
            found = next((r for r in runs if PARENT_TAG not in r.data.tags), None)
        if found is not None:
            self.parent = _Known(
                found.info.run_id,
                dict(found.data.tags),
                dict(found.data.params),
                dict(found.data.metrics),
                found.info.status,
                found.info.end_time,
            )
            self._adopt_ref()
            self._load()
        else:
            commit = _git_commit()
            tags = {
                RUN_DIR_TAG: run_dir,
                "evomerge.kind": "search",
                "strategy": self.config.strategy.name,
                "objectives": ",".join(self.record.names),
                "mlflow.note.content": f"evomerge search in {run_dir}: one child run per candidate; "
                "pareto.png, progress.png and pareto.csv among the artifacts",
            }
            if commit:
                tags["mlflow.source.git.commit"] = commit.removesuffix("-dirty")
            run = self.client.create_run(
                self.experiment_id, start_time=_ms(self.record.start_t), tags=tags, run_name=self.config.name
            )
            self.parent = _Known(run.info.run_id, dict(run.data.tags))
            params = _flatten(redact(self.config.model_dump(mode="json")))
            params.update(
                evomerge_version=evomerge.__version__, run_dir=run_dir, config_hash=self.config.content_hash()
            )
            if self.models:
                params.update(_flatten({"models": {"resolved": self.models}}))
            if commit:
                params["git_commit"] = commit
            self._log(self.parent, params=params)
            if (self.run_dir / "config.yaml").exists():  # as given, less its secrets
                with tempfile.TemporaryDirectory(prefix="evomerge-config-") as tmp:
                    text = (self.run_dir / "config.yaml").read_text()
                    try:
                        text = yaml.safe_dump(redact(yaml.safe_load(text)), sort_keys=False)
                    except yaml.YAMLError:
                        text = _redact_url(text)
                    (Path(tmp) / "config.yaml").write_text(text)
                    self.client.log_artifact(self.parent.run_id, str(Path(tmp) / "config.yaml"))

    def _adopt_ref(self) -> None:
        """The reference point recorded on the parent stays the run's r (chosen once, never changed)."""
        assert self.parent is not None
        try:
            ref = np.asarray(json.loads(self.parent.params["hv_ref"]), dtype=np.float64)
        except (KeyError, ValueError, TypeError):
            return
        if ref.shape == (len(self.record.names),) and np.all(np.isfinite(ref)):
            self.record.ref = ref
            self.record.ref_rule = self.parent.params.get("hv_ref_rule", self.record.ref_rule)

    def _load(self) -> None:
        """Read back the parent's metric steps and the children (extra children of one candidate removed)."""
        assert self.parent is not None
        keys = ["hypervolume", "front_size", *(f"best/{_key(n)}" for n in self.record.names)]
        for key in keys:
            self.parent_steps[key] = {m.step for m in self.client.get_metric_history(self.parent.run_id, key)}
        runs = self._search(
            f"tags.`{PARENT_TAG}` = {_quote(self.parent.run_id)}", ["attributes.start_time ASC"]
        )
        for run in runs:
            cid = run.data.tags.get(CANDIDATE_TAG)
            if cid is None:
                continue
            if cid in self.children:
                self.client.delete_run(run.info.run_id)
                self.removed += 1
                continue
            self.children[cid] = _Known(
                run.info.run_id,
                dict(run.data.tags),
                dict(run.data.params),
                dict(run.data.metrics),
                run.info.status,
            )

    # ---------------------------------------------------------------------------- push
    def _log(
        self,
        known: _Known,
        *,
        metrics: Sequence[Any] = (),
        params: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        """log_batch in MLflow's per-call limits (100 params, 100 tags, 1000 entities); `known` follows."""
        from mlflow.entities import Param, RunTag

        p = [Param(k, v) for k, v in (params or {}).items()]
        t = [RunTag(k, v) for k, v in (tags or {}).items()]
        m = list(metrics)
        while p or t or m:
            bp, bt = p[:100], t[:100]
            bm = m[: 1000 - len(bp) - len(bt)]
            self.client.log_batch(known.run_id, metrics=bm, params=bp, tags=bt)
            p, t, m = p[100:], t[100:], m[len(bm) :]
        known.params.update(params or {})
        known.tags.update(tags or {})
        known.metrics.update({x.key: x.value for x in metrics})

    def push_child(self, cid: str) -> int:
        """Make the store's run for cid match the record: 0 nothing to do, 1 created, 2 updated."""
        from mlflow.entities import Metric

        want = self.record.child(cid)
        have = self.children.get(cid)
        outcome = 0
        if have is None:
            tags = {PARENT_TAG: self.parent_id, **want.tags}
            run = self.client.create_run(
                self.experiment_id, start_time=want.start_ms, tags=tags, run_name=want.name
            )
            have = self.children[cid] = _Known(run.info.run_id, tags)
            outcome = 1
        tags = {k: v for k, v in want.tags.items() if have.tags.get(k) != v}
        params = {k: v for k, v in want.params.items() if k not in have.params}
        now = int(time.time() * 1000)  # a correction must be the newest value: MLflow shows the latest
        metrics = [
            Metric(k, v, now if k in have.metrics else want.end_ms or now, 0)
            for k, v in want.metrics.items()
            if have.metrics.get(k) != v
        ]
        if tags or params or metrics:
            self._log(have, metrics=metrics, params=params, tags=tags)
            outcome = outcome or 2
        if want.status != "RUNNING" and have.status != want.status:
            self.client.set_terminated(have.run_id, want.status, end_time=want.end_ms)
            have.status = want.status
            outcome = outcome or 2
        return outcome

    def push_parent(self) -> int:
        """Missing parent metric steps and the reference point; returns how many metric values were logged."""
        from mlflow.entities import Metric

        assert self.parent is not None
        params = {}
        if self.record.ref is not None and "hv_ref" not in self.parent.params:
            params = {
                "hv_ref": json.dumps([float(v) for v in self.record.ref]),
                "hv_ref_rule": self.record.ref_rule,
            }
        metrics = []
        for step, ts, values in self.record.series():
            for key, value in values.items():
                steps = self.parent_steps.setdefault(key, set())
                if step not in steps:
                    metrics.append(Metric(key, value, ts, step))
                    steps.add(step)
        if params or metrics:
            self._log(self.parent, metrics=metrics, params=params)
        return len(metrics)

    def upload(self, record: Record) -> None:
        assert self.parent is not None
        with tempfile.TemporaryDirectory(prefix="evomerge-artifacts-") as tmp:
            write_artifacts(record, tmp)
            self.client.log_artifacts(self.parent.run_id, tmp)

    def has_artifacts(self) -> bool:
        assert self.parent is not None
        have = {Path(f.path).name for f in self.client.list_artifacts(self.parent.run_id)}
        return {"pareto.csv", "pareto.png", "progress.png", "front_recipes.yaml"} <= have

    def set_parent_status(self, status: str) -> None:
        """RUNNING, or ended: a finished search ends at the journal's `end` event (so the parent spans the
        search, and sync corrects an end set otherwise), an interrupted one now."""
        assert self.parent is not None
        end_ms = _ms(self.record.end_t if status == "FINISHED" else None)
        if self.parent.status == status and (status != "FINISHED" or self.parent.end_ms == end_ms):
            return
        if status == "RUNNING":
            self.client.update_run(self.parent.run_id, status="RUNNING")
        else:
            self.client.set_terminated(self.parent.run_id, status, end_time=end_ms)
            self.parent.end_ms = end_ms
        self.parent.status = status


def sync(run_dir: str | Path, *, uri: str | None = None) -> dict[str, Any]:
    """Make the tracking store match the run's journal: parent and children created where missing, wrong or
    missing metrics, tags and names fixed, duplicate children removed, artifacts written when anything
    changed or some are missing. Idempotent: a second call changes nothing. `uri`: another store than the
    run's own (its config's `tracking.uri`, else `sqlite:///RUN_DIR/mlflow.db`)."""
    run_dir = Path(run_dir)
    config, record = load_record(run_dir, finish=False)  # a live run fixes r itself, from its 10th result
    uri = uri or config.tracking.uri or default_uri(run_dir)
    try:
        store = Store(uri, run_dir, config, record)
        store.attach(fresh=False)
        report = _sync_store(store, record, config.tracking.children)
    except TrackingError:
        raise
    except Exception as e:  # noqa: BLE001 - any store failure is one line for the user
        raise TrackingError(f"tracking store {uri}: {_one_line(e)}") from None
    _write_state(
        run_dir,
        uri=uri,
        needs_sync=False,
        experiment_id=store.experiment_id,
        parent_run_id=store.parent_id,
    )
    return report


def _child_ids(record: Record, children: str, ids: Iterable[str]) -> list[str]:
    """The candidates that get child runs: all, or (`children: front`) those ever on the front so far."""
    if children == "all":
        return list(ids)
    record.ever_front |= record.front()
    return [c for c in ids if c in record.ever_front]


def _sync_store(store: Store, record: Record, children: str = "all") -> dict[str, Any]:
    created = updated = 0
    for cid in _child_ids(record, children, record.candidates):
        outcome = store.push_child(cid)
        created += outcome == 1
        updated += outcome == 2
    metrics = store.push_parent()
    changed = bool(created or updated or metrics or store.removed)
    if changed or not store.has_artifacts():
        store.upload(record)
    if record.ended:
        store.set_parent_status("FINISHED")
    return {
        "uri": store.uri,
        "experiment_id": store.experiment_id,
        "parent_run_id": store.parent_id,
        "children": len(record.candidates),
        "created": created,
        "updated": updated,
        "removed": store.removed,
        "parent_metrics": metrics,
        "changed": changed,
    }


# ------------------------------------------------------------------------------------------ the tracker


class _Follower:
    """The journal's complete lines as they are appended (a line still being written waits for its newline)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.partial = path, 0, b""

    def read(self) -> list[dict[str, Any]]:
        try:
            size = self.path.stat().st_size
        except OSError:
            return []
        if size <= self.offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read(size - self.offset)
        self.offset += len(chunk)
        *lines, self.partial = (self.partial + chunk).split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]


# The tracking process's first lines: read the spec, then wait (cheaply: no imports, a poll of the journal's
# new bytes every 0.25 s) until the first result, the end of the search, a word from the driver or
# `startup_wait` seconds, so that importing MLflow (~2 s of CPU) and opening the store do not compete with
# the workers' start-up for the CPU; then the real work.
_BOOT = """
import json, os, select, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle; it then closes us
if hasattr(os, "nice"):
    os.nice(19)  # background work: the driver and the workers (Ray runs them at nice 15) come first
spec = json.loads(sys.stdin.readline())
path, offset = spec["run_dir"] + "/journal.jsonl", 0
deadline = time.monotonic() + spec["startup_wait"]
while time.monotonic() < deadline:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
    except OSError:
        chunk = b""
    if b'"event":"result"' in chunk or b'"event":"end"' in chunk:
        break
    offset += max(len(chunk) - 32, 0)
    if select.select([sys.stdin], [], [], 0.25)[0]:
        break
from evomerge.tracking import serve
serve(spec)
"""


class MLflowTracker(Observer):
    """Live tracking of a search (see the module doc), in a separate process so that MLflow and matplotlib
    never compete with the driver for the GIL: the process follows the journal (the record of the run; the
    search calls observers after each journal write) and writes to the store, coalescing each flush into one
    `log_batch` per run. The hooks cost nothing (`on_end` writes one line to the process's stdin to have the
    final flush start at once, overlapping Ray's teardown); `close` waits for it. `resumed`: the journal
    already holds events (the process attaches to the run's parent and syncs what is missing)."""

    def __init__(
        self,
        run_dir: str | Path,
        config: RunConfig,
        *,
        objectives: Sequence[Objective] | None = None,
        gene_names: Sequence[str] = (),
        models: dict[str, Any] | None = None,
        resumed: bool = False,
        uri: str | None = None,
        flush_seconds: float = 0.5,
        artifact_every: int = 50,
        artifact_seconds: float = 60.0,
        startup_wait: float = 30.0,
    ) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.uri = uri or config.tracking.uri or default_uri(self.run_dir)
        spec = {
            "run_dir": str(self.run_dir),
            "uri": self.uri,
            "config": config.model_dump(mode="json"),
            "objectives": None if objectives is None else [o.model_dump() for o in objectives],
            "gene_names": list(gene_names),
            "models": models,
            "resumed": resumed,
            "flush_seconds": flush_seconds,
            "artifact_every": artifact_every,
            "artifact_seconds": artifact_seconds,
        }
        spec["startup_wait"] = 0.0 if resumed else startup_wait
        package_root = str(Path(evomerge.__file__).resolve().parent.parent)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
        }
        self._proc: subprocess.Popen[bytes] | None = None
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                env=env,
                cwd=str(self.run_dir),
            )
            self._send(json.dumps(spec))
        except OSError as e:
            log.warning(
                "MLflow tracking not started (%s); bring the store up to date later with `evomerge sync %s`",
                _one_line(e),
                self.run_dir,
            )
            _write_state(self.run_dir, uri=self.uri, needs_sync=True, gene_names=list(gene_names))

    def _send(self, line: str) -> None:
        if self._proc is None or self._proc.stdin is None or self._proc.stdin.closed:
            return
        with contextlib.suppress(OSError):  # the tracking process is gone; close() reports it
            self._proc.stdin.write(line.encode() + b"\n")
            self._proc.stdin.flush()

    def on_end(self, state: SearchState) -> None:
        self._send("end")

    def close(self, timeout: float = 120.0) -> bool:
        """Final flush; True when the store is up to date. After `timeout` seconds the tracking process is
        stopped and the store marked as needing `evomerge sync`."""
        if self._proc is None:
            return False
        self._send("close")
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        try:
            code = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
            log.warning(
                "MLflow tracking did not finish within %.0f s; run `evomerge sync %s`", timeout, self.run_dir
            )
            _write_state(self.run_dir, needs_sync=True)
            return False
        if code != 0 and not _read_state(self.run_dir).get("needs_sync"):
            log.warning(
                "MLflow tracking process exited with code %s; run `evomerge sync %s`", code, self.run_dir
            )
            _write_state(self.run_dir, needs_sync=True)
        return code == 0


class _Tracking:
    """The tracking process: follow the journal, push to the store, refresh the artifacts."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.run_dir = Path(spec["run_dir"])
        self.uri = spec["uri"]
        self.config = RunConfig.model_validate(spec["config"])
        self.flush_seconds = float(spec["flush_seconds"])
        self.artifact_every, self.artifact_seconds = (
            int(spec["artifact_every"]),
            float(spec["artifact_seconds"]),
        )
        self.resumed = bool(spec["resumed"])
        self.spec_models = spec.get("models")
        self.follower = _Follower(self.run_dir / "journal.jsonl")
        events = self.follower.read()
        objectives = spec["objectives"]
        objectives = (
            [Objective(**o) for o in objectives]
            if objectives is not None
            else _objectives(self.config, events)
        )
        self.record = Record(objectives, strategy=self.config.strategy.name, gene_names=spec["gene_names"])
        for ev in events:
            self.record.apply(ev)
        self.store: Store | None = None
        self.needs_sync = False
        self.wake = threading.Event()
        self.end_seen = self.close_seen = self.eof = False
        _write_state(self.run_dir, uri=self.uri, needs_sync=False, gene_names=spec["gene_names"])

    def listen(self) -> None:
        """Control lines from the driver: `end` (the search is over), `close`; EOF: the driver is gone."""
        for raw in sys.stdin:
            line = raw.strip()
            self.end_seen |= line == "end"
            self.close_seen |= line == "close"
            self.wake.set()
        self.eof = True
        self.wake.set()

    def fail(self, e: BaseException) -> None:
        if not self.needs_sync:
            log.warning(
                "MLflow tracking to %s stopped (%s); the search goes on; bring the store up to date "
                "later with `evomerge sync %s`",
                _redact_url(self.uri),
                _one_line(e),
                self.run_dir,
            )
        self.needs_sync = True
        _write_state(self.run_dir, needs_sync=True)

    def run(self) -> int:
        threading.Thread(target=self.listen, name="evomerge-control", daemon=True).start()
        record = self.record
        try:
            self.store = Store(self.uri, self.run_dir, self.config, record, models=self.spec_models)
            self.store.attach(fresh=not self.resumed)
            _write_state(
                self.run_dir, experiment_id=self.store.experiment_id, parent_run_id=self.store.parent_id
            )
            self.store.set_parent_status("RUNNING")
        except Exception as e:  # noqa: BLE001 - tracking must never stop the search
            self.fail(e)
        with contextlib.suppress(ImportError):  # now, not in the final flush that the driver waits for
            import matplotlib.backends.backend_agg  # noqa: F401
        dirty: set[str] = set(record.candidates)
        front: set[str] = set()
        last_upload, uploaded_at = -1, time.monotonic()
        while True:
            final = self.end_seen or self.close_seen or self.eof
            for ev in self.follower.read():
                record.apply(ev)
                if ev.get("event") == "ask":
                    dirty.update(c["id"] for c in ev["candidates"])
                elif ev.get("event") in ("result", "rescore"):
                    dirty.add(ev["id"])
            if final:
                record.finish()
            new_front = record.front()
            dirty |= front ^ new_front
            front = set(new_front)
            if not self.needs_sync:
                try:
                    last_upload, uploaded_at = self.flush(dirty, final, last_upload, uploaded_at)
                except Exception as e:  # noqa: BLE001
                    self.fail(e)
            if final:
                if not self.needs_sync:
                    _write_state(self.run_dir, needs_sync=False)
                return 3 if self.needs_sync else 0
            self.wake.wait(self.flush_seconds)
            self.wake.clear()

    def flush(self, dirty: set[str], final: bool, last_upload: int, uploaded_at: float) -> tuple[int, float]:
        store, record = self.store, self.record
        assert store is not None
        for cid in sorted(
            _child_ids(record, self.config.tracking.children, dirty),
            key=lambda c: (record.steps.get(c, 1 << 30), c),
        ):
            store.push_child(cid)
        dirty.clear()
        store.push_parent()
        n = len(record.results)
        due = n - last_upload >= self.artifact_every or (
            n > last_upload and time.monotonic() - uploaded_at >= self.artifact_seconds
        )
        if due or (final and n != last_upload):
            store.upload(record)
            last_upload, uploaded_at = n, time.monotonic()
        if final:
            if record.ended:
                status = "FINISHED"
            else:  # the session ended before the budget: interrupted (or failed, when the driver said close)
                status = "FAILED" if self.close_seen and not self.end_seen else "KILLED"
            store.set_parent_status(status)
        return last_upload, uploaded_at


def serve(spec: dict[str, Any]) -> None:
    """The tracking process (`MLflowTracker` starts it with `_BOOT`): follow the journal until told to stop."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        tracking = _Tracking(spec)
    except Exception as e:  # noqa: BLE001
        log.warning(
            "MLflow tracking not started (%s); run `evomerge sync %s` later",
            _one_line(e),
            spec.get("run_dir"),
        )
        _write_state(Path(spec["run_dir"]), needs_sync=True)
        sys.exit(3)
    code = tracking.run()
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)  # everything is committed; skip tearing down ~3000 modules (0.5 s)
