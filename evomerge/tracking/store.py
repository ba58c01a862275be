"""One run's parent and children in an MLflow store (`Store`): created or found again by the run-dir tag,
then kept equal to a Record by pushing only the difference."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

import evomerge
from evomerge.config import RunConfig
from evomerge.errors import EvomergeError, one_line
from evomerge.tracking.names import (
    CANDIDATE_TAG,
    PARENT_TAG,
    RUN_DIR_TAG,
    flatten_config,
    mlflow_key,
)
from evomerge.tracking.plots import write_plots
from evomerge.tracking.record import Record
from evomerge.tracking.redact import redact, redact_url
from evomerge.tracking.tables import write_tables

log = logging.getLogger(__name__)


class TrackingError(EvomergeError):
    """The store cannot be reached or written (one line for the user; the run itself is unaffected)."""


def default_uri(run_dir: str | Path) -> str:
    """The run's own store: a sqlite database in its directory."""
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def _artifact_location(uri: str) -> str | None:
    """`mlartifacts/` beside a sqlite database; None (the server's default) for any other store."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None


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


def write_artifacts(record: Record, out_dir: str | Path) -> list[Path]:
    """What the parent run carries: the tables, and the plots when matplotlib is there."""
    paths = write_tables(record, out_dir)
    try:
        paths += write_plots(record, out_dir)
    except ImportError as e:  # matplotlib is optional for the tables
        log.warning("plots skipped (%s)", e)
    return paths


def _check_server(uri: str) -> None:
    """Fail fast on an unreachable server (MLflow's own client retries for minutes)."""
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
        except requests.RequestException as e:
            raise TrackingError(f"tracking server {uri} is not reachable ({one_line(e)})") from None


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
            params = flatten_config(redact(self.config.model_dump(mode="json")))
            params.update(
                evomerge_version=evomerge.__version__, run_dir=run_dir, config_hash=self.config.content_hash()
            )
            if self.models:
                params.update(flatten_config({"models": {"resolved": self.models}}))
            if commit:
                params["git_commit"] = commit
            self._log(self.parent, params=params)
            if (self.run_dir / "config.yaml").exists():  # as given, less its secrets
                with tempfile.TemporaryDirectory(prefix="evomerge-config-") as tmp:
                    text = (self.run_dir / "config.yaml").read_text()
                    try:
                        text = yaml.safe_dump(redact(yaml.safe_load(text)), sort_keys=False)
                    except yaml.YAMLError:
                        text = redact_url(text)
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
        keys = ["hypervolume", "front_size", *(f"best/{mlflow_key(n)}" for n in self.record.names)]
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
