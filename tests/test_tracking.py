"""MLflow tracking on a real sqlite store and real Ray (2 CPUs), with a synthetic evaluator."""

import csv
import json
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from helpers import Q0_Q1, run_config_data, synthetic_evaluator
from matplotlib.image import imread
from mlflow import MlflowClient
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.config import Objective, parse_config
from evomerge.journal import read_journal
from evomerge.merge.recipe import Recipe
from evomerge.runtime.run import create_run_dir, execute, resume
from evomerge.strategies.base import Candidate
from evomerge.tracking import (
    CANDIDATE_TAG,
    PARENT_TAG,
    RUN_DIR_TAG,
    Record,
    default_uri,
    flatten_recipe,
    sync,
    write_artifacts,
)

CANDIDATES = 12


def _config(pool, run_dir: Path, **tracking):
    return run_config_data("t", run_dir, pool["base"], [pool["e0"], pool["e1"], pool["e2"]],
                           space={"type": "task_vector"}, strategy={"name": "random"},
                           evaluator=synthetic_evaluator("sleep", seconds=0.0), objectives=Q0_Q1,
                           candidates=CANDIDATES, seed=5, tracking=tracking)  # fmt: skip


def _run(pool, run_dir: Path, **tracking) -> tuple[Path, dict]:
    cfg = parse_config(_config(pool, run_dir, **tracking), "test")
    run_dir = create_run_dir(cfg, None, None)
    _state, summary = execute(run_dir, cfg)
    return run_dir, summary


@pytest.fixture(scope="module")
def tracked(local_ray, pool, tmp_path_factory):
    """One search with the default tracking: sqlite store and artifacts in the run dir."""
    return _run(pool, tmp_path_factory.mktemp("tracked") / "run")


def _results(run_dir: Path) -> dict[str, dict]:
    return {e["id"]: e for e in read_journal(run_dir / "journal.jsonl") if e["event"] == "result"}


def _store(run_dir: Path):
    """(client, parent run, {candidate id: child run}) of the run; asserts one parent and one child each."""
    client = MlflowClient(default_uri(run_dir))
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        f"tags.`{RUN_DIR_TAG}` = '{run_dir.resolve()}'",
    )
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'"
    )
    by_id = {c.data.tags[CANDIDATE_TAG]: c for c in children}
    assert len(by_id) == len(children), "a candidate has more than one child run"
    return client, parent, by_id


def _pareto_true(run_dir: Path, experiment_id: str) -> set[str]:
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(default_uri(run_dir))
    try:
        runs = mlflow.search_runs([experiment_id], filter_string="tags.pareto = 'true'", output_format="list")
    finally:
        mlflow.set_tracking_uri(previous)
    return {r.data.tags[CANDIDATE_TAG] for r in runs}


def _journal_span(run_dir: Path) -> tuple[float, float]:
    """The search's start (the journal's first event) and end (its `end` event), in ms."""
    events = read_journal(run_dir / "journal.jsonl")
    end = [e["t"] for e in events if e["event"] == "end"]
    assert end, "the search did not end"
    return events[0]["t"] * 1000, end[-1] * 1000


def _assert_parent_spans_the_search(run_dir: Path) -> None:
    """The parent run starts and ends with the journal (MLflow keeps ms: within 2 ms)."""
    _client, parent, _children = _store(run_dir)
    start, end = _journal_span(run_dir)
    assert parent.info.status == "FINISHED"
    assert abs(parent.info.start_time - start) <= 2, (parent.info.start_time, start)
    assert abs(parent.info.end_time - end) <= 2, (parent.info.end_time, end)


def _assert_store_matches_journal(run_dir: Path, front_ids: set[str]) -> None:
    client, parent, children = _store(run_dir)
    results = _results(run_dir)
    assert set(children) == set(results) and len(children) == CANDIDATES
    for cid, run in children.items():
        assert run.info.status == "FINISHED"
        assert {k: run.data.metrics[k] for k in ("q0", "q1")} == results[cid]["scores"]
        assert run.data.tags["pareto"] == str(cid in front_ids).lower()
    assert _pareto_true(run_dir, parent.info.experiment_id) == front_ids


def test_one_child_run_per_candidate_with_the_journals_scores_and_front(tracked):
    run_dir, summary = tracked
    front_ids = {r["id"] for r in summary["front"]}
    _assert_store_matches_journal(run_dir, front_ids)
    client, parent, children = _store(run_dir)
    assert parent.info.run_name == "t" and parent.info.status == "FINISHED"
    assert parent.data.params["seed"] == "5" and parent.data.params["evomerge_version"]
    assert parent.data.params["strategy.name"] == "random"
    assert json.loads(parent.data.params["hv_ref"]) and parent.data.params["hv_ref_rule"]
    candidates = {
        c["id"]: c
        for e in read_journal(run_dir / "journal.jsonl")
        if e["event"] == "ask"
        for c in e["candidates"]
    }
    for cid, run in children.items():
        tags, params = run.data.tags, run.data.params
        assert run.info.run_name == f"g000-{cid}" + (" ★" if cid in front_ids else "")
        assert tags["strategy"] == "random" and tags["generation"] == "0" and tags["status"] == "ok"
        weight = candidates[cid]["recipe"]["models"][0]["parameters"]["weight"]
        assert params["e0.weight"] == f"{weight:.6g}" == params["gene/weight/e0"]
        assert params["merge_method"] == "task_arithmetic" and params["lambda"] == "1"
        assert run.data.metrics["objective/q0"] == run.data.metrics["q0"]
    hv = client.get_metric_history(parent.info.run_id, "hypervolume")
    assert sorted(m.step for m in hv) == list(range(1, CANDIDATES + 1))
    values = [m.value for m in sorted(hv, key=lambda m: m.step)]
    assert values[-1] > 0 and all(b >= a for a, b in zip(values, values[1:]))
    assert parent.data.metrics["front_size"] == len(front_ids)
    assert parent.data.metrics["best/q0"] == max(r["scores"]["q0"] for r in _results(run_dir).values())
    assert json.loads((run_dir / "tracking.json").read_text())["needs_sync"] is False


def test_parent_run_spans_the_search(tracked):
    run_dir, _summary = tracked
    _assert_parent_spans_the_search(run_dir)


def test_sync_sets_the_parents_end_to_the_journals_end(tracked):
    run_dir, _summary = tracked
    client, parent, _children = _store(run_dir)
    start, _end = _journal_span(run_dir)
    # the 2.8 s parent of a 26 s search that an older tracker left
    client.set_terminated(parent.info.run_id, "FINISHED", end_time=int(start) + 2800)
    sync(run_dir)
    _assert_parent_spans_the_search(run_dir)


def test_parent_artifacts_open(tracked, tmp_path):
    run_dir, summary = tracked
    client, parent, _ = _store(run_dir)
    names = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "pareto.csv", "pareto.png", "progress.png", "front_recipes.yaml"} <= names
    local = Path(client.download_artifacts(parent.info.run_id, "", str(tmp_path)))
    assert local.resolve().is_relative_to(tmp_path.resolve())
    assert (run_dir / "mlartifacts").is_dir()  # the experiment's artifact location is in the run dir
    for png in ("pareto.png", "progress.png"):
        image = imread(local / png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    with open(local / "pareto.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    front_ids = {r["id"] for r in summary["front"]}
    assert {r["id"] for r in rows} == front_ids
    assert all(json.loads(r["recipe"])["merge_method"] == "task_arithmetic" for r in rows)
    recipes = yaml.safe_load((local / "front_recipes.yaml").read_text())
    assert {r["id"] for r in recipes["front"]} == front_ids


def test_sync_restores_missing_children_and_is_idempotent(tracked):
    run_dir, summary = tracked
    front_ids = {r["id"] for r in summary["front"]}
    client, _parent, children = _store(run_dir)
    on_front = sorted(front_ids)[0]
    off_front = sorted(set(children) - front_ids)
    for cid in (on_front, off_front[0], off_front[1]):
        client.delete_run(children[cid].info.run_id)
    client.set_tag(children[off_front[2]].info.run_id, "pareto", "true")
    client.log_metric(children[off_front[3]].info.run_id, "q0", 123.0)

    out = CliRunner().invoke(app, ["sync", str(run_dir)])
    assert out.exit_code == 0, out.output
    assert "3 child runs created, 2 updated" in out.output
    _assert_store_matches_journal(run_dir, front_ids)
    again = sync(run_dir)
    assert not again["changed"] and again["created"] == again["updated"] == again["parent_metrics"] == 0


def test_resume_attaches_to_the_parent_and_catches_up(tracked):
    run_dir, summary = tracked
    client, parent, children = _store(run_dir)
    client.delete_run(next(iter(children.values())).info.run_id)
    resume(run_dir)  # the run has ended: nothing is evaluated, the tracker syncs
    _assert_store_matches_journal(run_dir, {r["id"] for r in summary["front"]})
    assert _store(run_dir)[1].info.run_id == parent.info.run_id
    _assert_parent_spans_the_search(run_dir)


def test_front_plot_writes_the_pngs(tracked):
    run_dir, _ = tracked
    out = CliRunner().invoke(app, ["front", str(run_dir), "--plot"])
    assert out.exit_code == 0, out.output
    for png in ("pareto.png", "progress.png"):
        assert str(run_dir / png) in out.output.replace("\n", "")
        assert imread(run_dir / png).shape[0] > 100


def test_unreachable_server_does_not_stop_the_search_and_sync_fills_a_store(local_ray, pool, tmp_path):
    started = time.perf_counter()
    run_dir, summary = _run(pool, tmp_path / "run", uri="http://127.0.0.1:9")
    assert time.perf_counter() - started < 60
    assert len(_results(run_dir)) == CANDIDATES and summary["front"]
    assert json.loads((run_dir / "tracking.json").read_text())["needs_sync"] is True
    assert not (run_dir / "mlflow.db").exists()
    out = CliRunner().invoke(app, ["sync", str(run_dir)])  # the configured server is still down
    assert out.exit_code == 2 and "127.0.0.1:9" in out.output

    stale = run_dir / ".mlflow.db.999999999.tmp"  # a store creation killed half-way (not-running pid)
    stale.write_bytes(b"half-migrated")
    report = sync(run_dir, uri=default_uri(run_dir))
    assert report["created"] == CANDIDATES
    assert not list(run_dir.glob(".mlflow.db.*"))  # created on a temp file, linked into place
    _assert_store_matches_journal(run_dir, {r["id"] for r in summary["front"]})
    _assert_parent_spans_the_search(run_dir)  # a parent that sync creates
    assert json.loads((run_dir / "tracking.json").read_text())["needs_sync"] is False


# ------------------------------------------------------------------------------------------ no store


def test_recipe_params_have_readable_names():
    layerwise = Recipe.model_validate(
        {
            "merge_method": "ties",
            "base_model": "/m/base",
            "slices": [
                {
                    "sources": [
                        {
                            "model": "/m/expert_rev",
                            "layer_range": [0, 2],
                            "parameters": {"density": 0.5, "weight": 0.3},
                        },
                        {"model": "/m/base", "layer_range": [0, 2]},
                    ],
                    "parameters": {"lambda": 1.0},
                }
            ],
            "parameters": {"normalize": False},
        }
    )
    params = flatten_recipe(layerwise)
    assert params["slices.0.layers0-1.expert_rev.density"] == "0.5"
    assert params["slices.0.layers0-1.lambda"] == "1" and params["normalize"] == "false"
    assert params["base_model"] == "base"
    filtered = Recipe.model_validate(
        {
            "merge_method": "linear",
            "models": [
                {
                    "model": "/a/x",
                    "parameters": {"weight": [{"filter": "mlp", "value": 0.2}, {"value": 1.0}]},
                },
                {"model": "/b/x", "parameters": {"weight": [1.0, 0.5]}},
            ],
        }
    )
    params = flatten_recipe(filtered)
    assert params["x_0.weight.mlp"] == "0.2" and params["x_0.weight.all"] == "1"
    assert params["x_1.weight"] == "[1.0,0.5]"


def test_record_three_objectives_failed_candidates_and_artifacts(tmp_path):
    rng = np.random.default_rng(0)
    objectives = [Objective(name="a"), Objective(name="b"), Objective(name="c", direction="minimize")]
    record = Record(objectives, strategy="nsga2", gene_names=["weight/x"])
    for i in range(14):
        recipe = Recipe(merge_method="linear", models=[{"model": "/m/x", "parameters": {"weight": float(i)}}])
        c = Candidate(f"c{i:05d}", recipe, np.array([float(i)]), ("c00000",) if i else (), i // 5)
        record.add_ask([c], 100.0 + i)
        if i == 3:
            record.add_result(
                {
                    "id": c.id,
                    "status": "failed",
                    "error": "boom",
                    "scores": {},
                    "objectives": None,
                    "attempts": 3,
                    "t": 101.0 + i,
                }
            )
            continue
        s = rng.random(3)
        record.add_result(
            {
                "id": c.id,
                "status": "ok",
                "scores": dict(zip("abc", s.tolist())),
                "objectives": [s[0], s[1], -s[2]],
                "t": 101.0 + i,
            }
        )
    assert record.ref.tolist() == [0.0, 0.0, -1.0]  # accuracies in [0, 1]: the bounded reference point
    failed = record.child("c00003")
    assert failed.status == "FAILED" and failed.tags["error"] == "boom" and failed.tags["status"] == "failed"
    child = record.child("c00006")
    assert child.tags["parents"] == "c00000" and child.params["gene/weight/x"] == "6"
    assert child.name.startswith("g001-c00006")
    series = record.series()
    assert [s for s, _, _ in series] == [s for s in range(1, 15) if s != 4]
    paths = write_artifacts(record, tmp_path)
    assert {p.name for p in paths} >= {"pareto.csv", "pareto.png", "progress.png", "parallel.png"}
    assert imread(tmp_path / "parallel.png").shape[0] > 100
