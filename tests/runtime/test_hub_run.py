"""A search over models named by hub id, offline against a hand-built cache: the driver pins each reference to its
commit once, journals it and records it on the MLflow parent; a resumed run keeps that commit after `refs/main`
moved; the token never lands in the run directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from evomerge.journal import read_journal
from evomerge.runtime.run import resume, start

MAIN, MOVED = "a" * 40, "c" * 40
SECRET = "hf_evomergeTestTokenNeverLogged"


def _add(cache: Path, repo_id: str, commit: str, model: Path) -> None:
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(model, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture(scope="module")
def hub_run(quick_zoo, local_ray, tmp_path_factory):
    """(cache, run dir, its events) of a finished 4-candidate tracked search over org/base, org/rev, org/sort."""
    root = tmp_path_factory.mktemp("hub_run")
    cache = root / "hf"
    for name, model in (
        ("base", quick_zoo["base"]),
        ("rev", quick_zoo["expert_rev"]),
        ("sort", quick_zoo["expert_sort"]),
    ):
        _add(cache, f"org/{name}", MAIN, model)
    config = {
        "name": "hub",
        "models": {"base": "org/base", "sources": ["org/rev", "org/sort"]},
        "space": {"type": "task_vector", "low": 0.0, "high": 1.0},
        "strategy": {"name": "random"},
        "evaluator": {"type": "lmeval", "tasks": ["zoo_rev_search", "zoo_sort_search"], "subsample": 16},
        "budget": {"candidates": 4},
        "workers": {"count": 1},
    }
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_CACHE", str(cache))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_TOKEN", SECRET)
        mp.chdir(root)
        run_dir, _, _ = start(root / "run.yaml", out=root / "run")
    return cache, run_dir, read_journal(run_dir / "journal.jsonl")


def test_the_driver_pins_hub_ids_to_commits_in_the_journal_recipes_best_yaml_and_mlflow(hub_run):
    _, run_dir, events = hub_run
    pinned = {"base": f"org/base@{MAIN}", "sources": [f"org/rev@{MAIN}", f"org/sort@{MAIN}"]}
    assert events[0]["event"] == "start" and events[0]["models"] == pinned
    recipes = [c["recipe"] for e in events if e["event"] == "ask" for c in e["candidates"]]
    named = {m["model"] for r in recipes for m in r["models"]} | {r["base_model"] for r in recipes}
    assert named == {pinned["base"], *pinned["sources"]}
    assert f"org/rev@{MAIN}" in (run_dir / "best.yaml").read_text()
    assert all(e["status"] == "ok" for e in events if e["event"] == "result")

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    state = json.loads((run_dir / "tracking.json").read_text())
    params = client.get_run(state["parent_run_id"]).data.params
    assert params["models.resolved.base"] == pinned["base"]
    assert json.loads(params["models.resolved.sources"]) == pinned["sources"]
    assert params["models.base"] == "org/base"  # the config as given stays too


def test_the_token_never_lands_in_the_run_directory(hub_run):
    _, run_dir, _ = hub_run
    leaks = [p for p in run_dir.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaks


def test_a_resumed_run_keeps_the_recorded_commit_after_main_moved(hub_run, quick_zoo, tmp_path, monkeypatch):
    cache, src, events = hub_run
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(src / "config.yaml", run_dir / "config.yaml")
    lines = (src / "journal.jsonl").read_text().splitlines(keepends=True)
    first_tell = next(i for i, line in enumerate(lines) if '"event":"tell"' in line.replace(" ", ""))
    (run_dir / "journal.jsonl").write_text("".join(lines[: first_tell + 1]))
    moved = shutil.copytree(cache, tmp_path / "hf")  # org/rev's main now points at another model
    _add(moved, "org/rev", MOVED, quick_zoo["expert_up"])
    monkeypatch.setenv("HF_HUB_CACHE", str(moved))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    state, _ = resume(run_dir)
    after = read_journal(run_dir / "journal.jsonl")
    models = {m["model"] for e in after if e["event"] == "ask" for c in e["candidates"]
              for m in c["recipe"]["models"]}  # fmt: skip
    assert f"org/rev@{MAIN}" in models and not any(MOVED in m for m in models)
    scores = {e["id"]: e["scores"] for e in events if e["event"] == "result"}
    assert {e["id"]: e["scores"] for e in after if e["event"] == "result"} == scores
