"""Cheap fitness end to end (`fidelity:` in the run YAML): real searches on the trained zoo, real lm-eval
(`zoo_search1k`: 4 tasks x 1,000 items), real Ray (local, 2 CPUs), real MLflow (sqlite in the run dir).

Module-scoped runs, each shared by several tests: a tracked racing run (cma) and the same config again
without tracking (determinism; cut and resumed), a tracked gmp-IRT estimator run, and two short runs of a
strategy that repeats its recipes (cache on / off, `mean` estimator). Scores are checked against an in-process
full evaluation of the same recipes (the worker's own backend, without Ray) where the journal claims them.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from evomerge.config import parse_config
from evomerge.evaluate.base import unpack_samples
from evomerge.fidelity.racing import item_order
from evomerge.journal import final_results, read_journal
from evomerge.runtime.run import create_run_dir, execute, resume
from evomerge.strategies.base import STRATEGIES, Candidate, Result, Strategy

TASKS = [f"zoo_{s}_search1k" for s in ("rev", "sort", "up", "shift")]
N_ITEMS = 1000
pytestmark = pytest.mark.slow  # real engine runs on the trained zoo (~2.5 min)

RUNGS = [32, 96]
SEED = 3
VOLATILE = {"t", "pid", "node", "seconds", "config_hash", "device"}  # differ between two runs of one config


def _config(zoo, out: Path, fidelity: dict[str, Any], *, strategy: str = "cma", candidates: int = 12,
            tracking: bool = False) -> dict[str, Any]:  # fmt: skip
    return {
        "name": "fid",
        "models": {"base": str(zoo["base"]), "sources": [str(p) for n, p in zoo.items() if n != "base"]},
        "space": {"type": "task_vector", "low": 0.0, "high": 1.2},
        "strategy": {"name": strategy},
        "evaluator": {"type": "lmeval", "tasks": ["zoo_search1k"]},
        "fidelity": fidelity,
        "budget": {"candidates": candidates},
        "workers": {"count": 2},
        "seed": SEED,
        "output": str(out),
        "tracking": {"enabled": tracking},
    }


RACING = {"racing": {"rungs": RUNGS}, "rescore": 3}
ESTIMATOR = {"estimator": {"name": "gmp_irt", "items": 20}, "rescore": 12}  # as many as it takes


def _run(data: dict[str, Any]) -> tuple[Path, Any, dict[str, Any]]:
    cfg = parse_config(data, "test")
    run_dir = create_run_dir(cfg, None, None)
    state, summary = execute(run_dir, cfg)
    return run_dir, state, summary


def _events(run_dir: Path) -> list[dict[str, Any]]:
    return read_journal(run_dir / "journal.jsonl", repair=False)


def _of(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == kind]


def _results(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{id: its result event}; every asked candidate has exactly one."""
    asked = [c["id"] for e in _of(events, "ask") for c in e["candidates"]]
    results = _of(events, "result")
    assert sorted(r["id"] for r in results) == sorted(asked)
    return {r["id"]: r for r in results}


def _recipes(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["id"]: c["recipe"] for e in _of(events, "ask") for c in e["candidates"]}


def _passes(events: list[dict[str, Any]]) -> int:
    """Every forward pass the journal accounts for: reference rows, results, re-scores."""
    return sum(
        int(e.get("forward_passes", 0)) for e in events if e["event"] in ("fidelity", "result", "rescore")
    )


def _strip(e: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in e.items() if k not in VOLATILE}


def _outline(events: list[dict[str, Any]]) -> dict[str, Any]:
    """What two runs of one `ordered` config must share: the ask/tell sequence, each candidate's rung events
    and result, the re-scores. Rung and result events of the two workers interleave by timing, so they are
    compared per candidate, not by line."""
    rungs: dict[str, list[dict[str, Any]]] = {}
    for e in _of(events, "rung"):
        rungs.setdefault(e["id"], []).append(_strip(e))
    return {
        "calls": [
            (e["event"], [c["id"] for c in e["candidates"]] if e["event"] == "ask" else e["ids"])
            for e in events
            if e["event"] in ("ask", "tell")
        ],
        "candidates": [_strip(c) for e in _of(events, "ask") for c in e["candidates"]],
        "rungs": rungs,
        "results": {r["id"]: _strip(r) for r in _of(events, "result")},
        "rescores": {r["id"]: _strip(r) for r in _of(events, "rescore")},
        "fidelity": [_strip(e) for e in _of(events, "fidelity")],
        "ended": bool(_of(events, "end")),
    }


# ------------------------------------------------------------------------------------------ shared runs


@pytest.fixture(scope="module")
def racing(zoo, local_ray, tmp_path_factory):
    """cma with racing (rungs 32 -> 96 -> 1000 per task), 12 candidates, 2 workers, ordered; tracked."""
    return _run(_config(zoo, tmp_path_factory.mktemp("racing") / "run", RACING, tracking=True))


@pytest.fixture(scope="module")
def racing_again(zoo, local_ray, tmp_path_factory):
    """The racing config once more (tracking off: it writes nothing to the journal)."""
    return _run(_config(zoo, tmp_path_factory.mktemp("racing_again") / "run", RACING))


@pytest.fixture(scope="module")
def estimated(zoo, local_ray, tmp_path_factory):
    """cma with the gmp-IRT estimator on 20 items per task; tracked."""
    return _run(_config(zoo, tmp_path_factory.mktemp("estimated") / "run", ESTIMATOR, tracking=True))


@pytest.fixture(scope="module")
def full_eval(zoo):
    """Scores a journaled recipe on every item of every task in this process (the workers' backend, no Ray):
    recipe dict -> {task: per-item scores in document order}."""
    from evomerge.merge.mixture import candidate_recipe
    from evomerge.runtime.run import backend_spec

    cfg = parse_config(_config(zoo, Path("unused"), {}), "test")
    backend = backend_spec(cfg, str(zoo["base"]), [str(p) for n, p in zoo.items() if n != "base"]).build()

    def score(recipe: dict[str, Any]) -> dict[str, np.ndarray]:
        ev = backend.evaluate(candidate_recipe(recipe))
        assert ev.forward_passes == len(TASKS) * N_ITEMS
        return {t: np.asarray(v, dtype=np.float64) for t, v in ev.samples.items()}

    return score


# ------------------------------------------------------------------------------------------ 1. racing


def test_racing_stops_some_candidates_after_the_first_rung_and_scores_the_rest_on_every_item(racing):
    run_dir, state, _summary = racing
    events = _events(run_dir)
    (fid,) = _of(events, "fidelity")
    assert fid["sizes"] == dict.fromkeys(TASKS, N_ITEMS) and fid["forward_passes"] == 0
    assert "reference" not in fid  # racing needs no reference rows
    results = _results(events)
    assert len(results) == 12 and all(r["status"] == "ok" for r in results.values())
    rungs: dict[str, list[dict[str, Any]]] = {}
    for e in _of(events, "rung"):
        rungs.setdefault(e["id"], []).append(e)
    assert set(rungs) == set(results)
    stopped = [c for c, r in results.items() if not r["fidelity"]["exact"]]
    exact = [c for c, r in results.items() if r["fidelity"]["exact"]]
    assert stopped and exact
    for cid, r in results.items():
        decisions = [e["decision"] for e in rungs[cid]]
        assert set(decisions) <= {"promote", "stop", "done"}
        assert [e["rung"] for e in rungs[cid]] == list(range(len(decisions)))
        assert all(d == "promote" for d in decisions[:-1]) and decisions[-1] in ("stop", "done")
        assert sum(e["forward_passes"] for e in rungs[cid]) == r["forward_passes"]
        assert r["fidelity"]["mode"] == "racing" and r["fidelity"]["rung"] == len(decisions) - 1
        items = {t: len(unpack_samples(v)) for t, v in r["samples"].items()}
        assert r["fidelity"]["items"] == items == rungs[cid][-1]["items"]
        for t in TASKS:
            assert r["scores"][t] == pytest.approx(unpack_samples(r["samples"][t]).mean(), abs=1e-12)
        if cid in stopped:
            assert decisions[-1] == "stop" and r["fidelity"]["stopped"] is True
            n = RUNGS[r["fidelity"]["rung"]]  # the prefix of the rung it stopped at
            assert items == dict.fromkeys(TASKS, n) and r["forward_passes"] == len(TASKS) * n
        else:
            assert decisions == ["promote", "promote", "done"] and r["fidelity"]["stopped"] is False
            assert items == dict.fromkeys(TASKS, N_ITEMS)
            assert r["forward_passes"] == len(TASKS) * N_ITEMS
            assert [e["items"] for e in rungs[cid]] == [dict.fromkeys(TASKS, n) for n in (*RUNGS, N_ITEMS)]
    assert any(results[c]["forward_passes"] == len(TASKS) * RUNGS[0] for c in stopped)  # stopped at 32 items
    # the first two candidates have nothing to be compared with: they run to the end
    assert {"c00001", "c00002"} <= set(exact)
    assert state.forward_passes == _passes(events)
    assert state.forward_passes == sum(r["forward_passes"] for r in results.values()) + sum(
        e["forward_passes"] for e in _of(events, "rescore")
    )


def test_racing_scores_nested_prefixes_of_the_shared_shuffled_order(racing, full_eval):
    """A stopped and a fully raced candidate re-scored on every item here: their journaled per-item scores are
    those of the first 32 (or all) positions of the seeded item order, in that order."""
    run_dir, _state, _summary = racing
    events = _events(run_dir)
    results, recipes = _results(events), _recipes(events)
    stopped = next(c for c, r in results.items() if r["fidelity"]["stopped"])
    raced = next(c for c, r in results.items() if r["fidelity"]["exact"])
    for cid in (stopped, raced):
        full = full_eval(recipes[cid])
        for t in TASKS:
            n = results[cid]["fidelity"]["items"][t]
            order = item_order(t, N_ITEMS, SEED)[:n]
            assert np.array_equal(unpack_samples(results[cid]["samples"][t]), full[t][order]), (cid, t)


def test_racing_front_rows_say_whether_scores_are_exact_and_the_best_is(racing):
    run_dir, _state, summary = racing
    front = json.loads((run_dir / "front.json").read_text())
    final = final_results(_events(run_dir))
    assert front["front"] and all("exact" in row for row in [*front["front"], front["best"]])
    for row in front["front"]:
        assert row["exact"] == bool(final[row["id"]]["fidelity"]["exact"])
    assert front["best"]["exact"] is True and summary["best"]["id"] == front["best"]["id"]
    for cid, rescore in {e["id"]: e for e in _of(_events(run_dir), "rescore")}.items():
        assert final[cid]["scores"] == rescore["scores"]
        assert (
            final[cid]["estimate"]["scores"]
            == next(e for e in _of(_events(run_dir), "result") if e["id"] == cid)["scores"]
        )


def test_racing_children_in_mlflow_say_how_each_score_was_measured(racing):
    from mlflow import MlflowClient

    from evomerge.tracking import CANDIDATE_TAG, PARENT_TAG, default_uri

    run_dir, _state, _summary = racing
    children = _children(MlflowClient(default_uri(run_dir)), run_dir, CANDIDATE_TAG, PARENT_TAG)
    results = _results(_events(run_dir))
    assert set(children) == set(results)
    for cid, r in results.items():
        tags, metrics = children[cid].data.tags, children[cid].data.metrics
        assert tags["fidelity.mode"] == "racing"
        if r["fidelity"]["stopped"]:
            assert tags["fidelity.exact"] == "false" and tags["fidelity.stopped"] == "true"
            assert tags["fidelity.rung"] == str(r["fidelity"]["rung"])
            assert {metrics[f"fidelity/items/{t}"] for t in TASKS} == {float(RUNGS[r["fidelity"]["rung"]])}
        else:
            assert tags["fidelity.exact"] == "true" and "fidelity.stopped" not in tags
            assert {metrics[f"fidelity/items/{t}"] for t in TASKS} == {float(N_ITEMS)}
        assert {t: metrics[t] for t in TASKS} == r["scores"]


def _children(client: Any, run_dir: Path, candidate_tag: str, parent_tag: str) -> dict[str, Any]:
    from evomerge.tracking import RUN_DIR_TAG

    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, f"tags.`{RUN_DIR_TAG}` = '{run_dir.resolve()}'", max_results=1000)
    (parent,) = [r for r in runs if parent_tag not in r.data.tags]
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`{parent_tag}` = '{parent.info.run_id}'"
    )
    return {c.data.tags[candidate_tag]: c for c in children}


# ------------------------------------------------------------------------------------ 2. determinism, resume


def test_the_same_racing_config_gives_the_same_journal(racing, racing_again):
    a, b = _outline(_events(racing[0])), _outline(_events(racing_again[0]))
    assert a["calls"] == b["calls"] and a["candidates"] == b["candidates"]
    assert a["rungs"] == b["rungs"]  # the same decisions on the same per-item scores
    assert a["results"] == b["results"]
    assert a == b
    assert racing[1].forward_passes == racing_again[1].forward_passes


def _cut(events_path: Path, kind: str) -> tuple[int, str]:
    """A cut (number of journal lines kept), as a SIGKILL of the driver would leave the journal: `stop`, right
    after a candidate's `stop` rung, before its result; `promote`, right after a `promote` rung, the candidate
    between its rungs. Both exist in every racing journal, whatever the order the two workers finished in (a
    cut needing both at once, as this test once chose, depends on that order). (lines kept, candidate)."""
    events = [json.loads(line) for line in events_path.read_text().splitlines()]
    for i, e in enumerate(events):
        if e["event"] == "rung" and e["decision"] == kind:
            if kind == "stop":
                assert events[i + 1]["event"] == "result" and events[i + 1]["id"] == e["id"]
            return i + 1, e["id"]
    raise AssertionError(f"no {kind} rung in the journal")


@pytest.mark.parametrize("kind", ["stop", "promote"])
def test_a_run_killed_mid_race_resumes_to_the_uninterrupted_runs_results(racing_again, tmp_path, kind):
    """The journal of a finished run cut right after a candidate's `stop` rung (before its result) or right after
    a `promote` rung (the candidate between its rungs); `resume` records the stopped candidate's result from the
    journal (no item scored again) or continues the race at its next rung, and ends with the uninterrupted run's
    candidates, decisions, results and front."""
    src, state, summary = racing_again
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(src / "config.yaml", run_dir / "config.yaml")
    keep, cid = _cut(src / "journal.jsonl", kind)
    lines = (src / "journal.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "journal.jsonl").write_text("".join(lines[:keep]))
    cut = _events(run_dir)
    assert cid not in {e["id"] for e in _of(cut, "result")}
    seen_before = {e["rung"] for e in _of(cut, "rung") if e["id"] == cid}
    assert 0 in seen_before

    state2, summary2 = resume(run_dir)
    events = _events(run_dir)
    a, b = _outline(_events(src)), _outline(events)
    assert b["calls"] == a["calls"] and b["candidates"] == a["candidates"]
    assert b["rungs"] == a["rungs"]  # no rung scored twice, none skipped
    assert b["results"] == a["results"]
    assert b == a
    assert state2.forward_passes == state.forward_passes == _passes(events)
    # a stopped candidate is not evaluated again; a promoted one resumes after its journaled rungs
    after = [e["rung"] for e in events[keep:] if e["event"] == "rung" and e["id"] == cid]
    uninterrupted = [e["rung"] for e in _of(_events(src), "rung") if e["id"] == cid]
    assert after == [r for r in uninterrupted if r not in seen_before]
    assert bool(after) == (kind == "promote")
    assert _of(events[keep:], "resume")
    assert summary2["best"]["id"] == summary["best"]["id"]
    assert [r["id"] for r in summary2["front"]] == [r["id"] for r in summary["front"]]


# ------------------------------------------------------------------------------------------ 3. estimator


def _task_seed(seed: int, task: str) -> int:
    """The documented per-task subset seed (sha256 of "seed:task:subset"), recomputed here."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{task}:subset".encode()).digest()[:8], "little")


def test_estimator_run_journals_reference_rows_and_their_cost(estimated, zoo):
    run_dir, state, _summary = estimated
    events = _events(run_dir)
    (fid,) = _of(events, "fidelity")
    refs = [str(zoo["base"]), *(str(p) for n, p in zoo.items() if n != "base")]
    assert list(fid["reference"]) == refs  # base first, then the sources
    for rows in fid["reference"].values():
        assert {t: len(unpack_samples(v)) for t, v in rows.items()} == dict.fromkeys(TASKS, N_ITEMS)
    assert fid["forward_passes"] == len(refs) * len(TASKS) * N_ITEMS
    assert state.forward_passes == _passes(events)
    # each expert solves its own skill on the search split (the rows are real per-item scores)
    for skill, task in zip(("rev", "sort", "up", "shift"), TASKS):
        assert unpack_samples(fid["reference"][str(zoo[f"expert_{skill}"])][task]).mean() > 0.9


def test_estimates_are_the_estimators_value_on_the_journaled_subset_answers(estimated, full_eval):
    from evomerge.fidelity.estimators import build_estimator

    run_dir, _state, _summary = estimated
    events = _events(run_dir)
    (fid,) = _of(events, "fidelity")
    results, recipes = _results(events), _recipes(events)
    estimators = {}
    for t in TASKS:
        reference = np.stack([unpack_samples(rows[t]) for rows in fid["reference"].values()])
        estimators[t] = build_estimator("gmp_irt", reference, 20, _task_seed(SEED, t))
    for r in results.values():
        assert r["status"] == "ok"
        assert r["fidelity"] == {"mode": "estimate", "estimator": "gmp_irt", "exact": False,
                                 "estimated": True, "items": dict.fromkeys(TASKS, 20)}  # fmt: skip
        if "cached" not in r:
            assert r["forward_passes"] == len(TASKS) * 20
        for t in TASKS:
            y = unpack_samples(r["samples"][t])
            assert len(y) == 20
            assert r["subset_scores"][t] == pytest.approx(y.mean(), abs=1e-12)
            assert r["scores"][t] == pytest.approx(float(np.clip(estimators[t].estimate(y), 0, 1)), abs=1e-9)
    # the subset is the estimator's item positions: the first candidate scored on every item, here
    full = full_eval(recipes["c00001"])
    for t in TASKS:
        assert np.array_equal(unpack_samples(results["c00001"]["samples"][t]), full[t][estimators[t].items])


def test_the_best_estimate_is_rescored_on_every_item_and_keeps_its_estimate(estimated, full_eval):
    run_dir, state, summary = estimated
    events = _events(run_dir)
    rescores = _of(events, "rescore")
    assert rescores and len({e["id"] for e in rescores}) == len(rescores)  # each candidate at most once
    assert _of(events, "end") and events.index(rescores[-1]) < events.index(_of(events, "end")[0])
    results, recipes, final = _results(events), _recipes(events), final_results(events)
    for e in rescores:
        assert e["forward_passes"] == len(TASKS) * N_ITEMS
        r = final[e["id"]]
        assert r["scores"] == e["scores"] and r["objectives"] == e["objectives"]
        assert r["fidelity"]["exact"] is True and r["fidelity"]["rescored"] is True
        assert r["estimate"] == {
            "scores": results[e["id"]]["scores"],
            "objectives": results[e["id"]]["objectives"],
        }
        assert state.results[e["id"]]["estimate"]["scores"] == results[e["id"]]["scores"]
    full = full_eval(recipes[rescores[0]["id"]])
    assert rescores[0]["scores"] == {t: pytest.approx(full[t].mean(), abs=1e-12) for t in TASKS}
    front = json.loads((run_dir / "front.json").read_text())
    assert front["best"]["exact"] is True and front["best"]["id"] in {e["id"] for e in rescores}
    assert front["best"]["estimate"]["scores"] == results[front["best"]["id"]]["scores"]
    assert summary["best"]["scores"] == final[front["best"]["id"]]["scores"]
    assert state.forward_passes == _passes(events)


def test_estimator_children_in_mlflow_carry_the_estimate_beside_the_full_scores(estimated):
    from mlflow import MlflowClient

    from evomerge.tracking import CANDIDATE_TAG, PARENT_TAG, default_uri

    run_dir, _state, _summary = estimated
    events = _events(run_dir)
    children = _children(MlflowClient(default_uri(run_dir)), run_dir, CANDIDATE_TAG, PARENT_TAG)
    final = final_results(events)
    rescored = {e["id"] for e in _of(events, "rescore")}
    assert rescored and set(children) == set(final)
    for cid, r in final.items():
        tags, metrics = children[cid].data.tags, children[cid].data.metrics
        assert {t: metrics[t] for t in TASKS} == r["scores"]
        assert tags["fidelity.mode"] == "estimate" and tags["fidelity.estimator"] == "gmp_irt"
        if cid in rescored:
            assert tags["fidelity.exact"] == "true" and tags["fidelity.rescored"] == "true"
            assert {t: metrics[f"estimate/{t}"] for t in TASKS} == r["estimate"]["scores"]
        else:
            assert tags["fidelity.exact"] == "false" and tags["fidelity.estimated"] == "true"
            assert not any(k.startswith("estimate/") for k in metrics)


# ------------------------------------------------------------------------------------------ 4. cache


class Repeat(Strategy):
    """Asks two recipes over and over (as elitism or a converged population would)."""

    name = "test_repeat"

    def __init__(self, space, *, n_objectives=1, seed=0, weights=None, budget=None) -> None:
        super().__init__(space, n_objectives=n_objectives, seed=seed, weights=weights, budget=budget)
        self.genomes = [self.space.sample(self.rng) for _ in range(2)]

    def _ask(self, n: int) -> list[Candidate]:
        return [self.make_candidate(self.genomes[self._count % 2]) for _ in range(n)]

    def _tell(self, results: list[Result]) -> None:
        pass


@pytest.fixture(scope="module")
def repeated(zoo, local_ray, tmp_path_factory):
    """The repeating strategy, 6 candidates (2 recipes), `mean` estimator; cache on and off. Registered only
    for these runs: the strategy contract tests run over every registered strategy."""
    fid = {"estimator": {"name": "mean", "items": 20}, "rescore": 3}
    STRATEGIES.add(Repeat.name, Repeat)
    try:
        on = _run(
            _config(zoo, tmp_path_factory.mktemp("cache") / "run", fid, strategy="test_repeat", candidates=6)
        )
        off = _run(_config(zoo, tmp_path_factory.mktemp("nocache") / "run", {**fid, "cache": False},
                           strategy="test_repeat", candidates=6))  # fmt: skip
    finally:
        STRATEGIES.remove(Repeat.name)
    return on, off


def test_a_repeated_recipe_is_not_evaluated_again(repeated):
    (run_dir, state, _), _off = repeated
    events = _events(run_dir)
    results, recipes = _results(events), _recipes(events)
    assert [recipes[c] == recipes["c00001"] for c in sorted(recipes)] == [True, False] * 3
    for cid in ("c00003", "c00004", "c00005", "c00006"):
        r, twin = results[cid], results[f"c0000{2 - int(cid[-1]) % 2}"]
        assert r["cached"] == twin["id"] and "cached" not in twin
        assert r["forward_passes"] == 0 and twin["forward_passes"] == len(TASKS) * 20
        assert r["scores"] == twin["scores"] and r["objectives"] == twin["objectives"]
        assert r["samples"] == twin["samples"] and r["subset_scores"] == twin["subset_scores"]
        assert r["fidelity"] == twin["fidelity"]
    # `mean` needs no reference rows: only the task sizes are journaled, no forward pass
    (fid,) = _of(events, "fidelity")
    assert "reference" not in fid and fid["forward_passes"] == 0
    assert fid["sizes"] == dict.fromkeys(TASKS, N_ITEMS)
    # re-scoring the best on every item evaluates its recipe once; its cached copies get the same full scores
    rescores = _of(events, "rescore")
    evaluated = [e for e in rescores if "cached" not in e]
    assert evaluated and len({json.dumps(recipes[e["id"]], sort_keys=True) for e in evaluated}) == len(
        evaluated
    )
    final = final_results(events)
    for e in evaluated:
        twins = [c for c in recipes if recipes[c] == recipes[e["id"]] and c != e["id"]]
        copies = {x["id"]: x["cached"] for x in rescores if x.get("cached") == e["id"]}
        assert copies == dict.fromkeys(twins, e["id"])
        for c in twins:
            assert final[c]["scores"] == e["scores"] and final[c]["fidelity"]["exact"] is True
    assert all(x["forward_passes"] == 0 for x in rescores if "cached" in x)
    full = len(evaluated) * len(TASKS) * N_ITEMS
    assert state.forward_passes == _passes(events) == 2 * len(TASKS) * 20 + full
    assert json.loads((run_dir / "front.json").read_text())["best"]["exact"] is True


def test_with_the_cache_off_every_candidate_is_evaluated(repeated):
    (on_dir, _, _), (run_dir, state, _) = repeated
    events = _events(run_dir)
    results = _results(events)
    assert not any("cached" in r for r in [*results.values(), *_of(events, "rescore")])
    assert all(r["forward_passes"] == len(TASKS) * 20 for r in results.values())
    rescored = sum(e["forward_passes"] for e in _of(events, "rescore"))
    assert state.forward_passes == 6 * len(TASKS) * 20 + rescored
    cached = _results(_events(on_dir))
    assert {c: r["scores"] for c, r in results.items()} == {c: r["scores"] for c, r in cached.items()}


# ------------------------------------------------------------------------------------------ 5. refusals


RAY_LOG_LINE = re.compile(r"\((\w+ )?pid=\d+")
PROGRESS_BAR = re.compile(r"\d+%\|.*\|")  # tqdm, drawn by lm-eval while it builds the tasks' requests

REFUSALS = [
    ("m2n2", {"space": {"type": "model"}, "strategy": {"name": "m2n2"}, "fidelity": {"racing": {}}},
     ["strategy m2n2", "every item", "fidelity.racing"]),
    ("decreasing-rungs", {"fidelity": {"racing": {"rungs": [96, 32]}}},
     ["fidelity.racing", "rungs", "increasing"]),
    ("racing-and-estimator", {"fidelity": {"racing": {}, "estimator": {}}},
     ["racing or estimator, not both"]),
    ("estimator-without-items",
     {"evaluator": {"type": "function", "function": "evomerge.evaluate.synthetic:sleep"},
      "objectives": [{"name": "q0"}], "fidelity": {"estimator": {"name": "gmp_irt"}}},
     ["fidelity", "function evaluator"]),
    ("more-items-than-the-task", {"fidelity": {"estimator": {"name": "gmp_irt", "items": 2000}}},
     ["fidelity.estimator.items", "2000", "1000"]),
]  # fmt: skip


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize(("case", "edit", "needles"), REFUSALS, ids=[c[0] for c in REFUSALS])
def test_fidelity_settings_a_run_cannot_honour_are_refused_in_one_line(zoo, local_ray, tmp_path, case, edit,
                                                                       needles):  # fmt: skip
    from evomerge.cli import app

    data = {**_config(zoo, tmp_path / "run", {}), **edit}
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(data))
    before = _tree(tmp_path)
    out = CliRunner().invoke(app, ["run", str(cfg)])
    assert out.exit_code == 2, out.output
    # lm-eval's progress bars (the driver lists the tasks) and, for a refusal once the workers started (task
    # sizes), Ray's forwarded worker log lines come before the error; they are not part of it
    noise = (RAY_LOG_LINE, PROGRESS_BAR)
    lines = [x for x in out.output.strip().splitlines() if x.strip() and not any(n.search(x) for n in noise)]
    assert len(lines) == 1 and lines[0].startswith("error:"), out.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert _tree(tmp_path) == before  # no run dir left behind
