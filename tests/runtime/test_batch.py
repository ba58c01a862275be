"""Batched dispatch (`workers.batch`): several candidates per worker call for cheap evaluators, with the
journal, retries, ordering and per-candidate fault tolerance of one-per-call runs."""

import os
from pathlib import Path

import pytest
from helpers import Q0_Q1, journal_records, run_config, synthetic_evaluator

from evomerge.evaluate.faulty import _fraction
from evomerge.journal import Journal
from evomerge.merge.mergekit_io import recipe_from_dict
from evomerge.runtime import search as search_mod
from evomerge.runtime.run import create_run_dir, execute
from evomerge.runtime.search import Budget, Search, SearchState


def _config(pool, run_dir: Path, *, batch=8, candidates=48, evaluator=None, strategy="cma", **workers):
    return run_config("batch", run_dir, pool["base"], [pool["e0"], pool["e1"], pool["e2"]],
                      space={"type": "task_vector"}, strategy={"name": strategy},
                      evaluator=evaluator or synthetic_evaluator("sleep", seconds=0.002), objectives=Q0_Q1,
                      candidates=candidates, workers={"count": 2, "batch": batch, **workers}, seed=4)  # fmt: skip


def _run_spying(config, monkeypatch):
    """Run `config`; the sizes of the worker calls the driver made."""
    sizes: list[int] = []
    dispatch = search_mod.Search._dispatch

    def spy(self, in_flight, calls, w):
        sizes.append(len(calls))
        return dispatch(self, in_flight, calls, w)

    monkeypatch.setattr(search_mod.Search, "_dispatch", spy)
    run_dir = create_run_dir(config, None, None)
    execute(run_dir, config)
    return run_dir, sizes


def test_cheap_candidates_go_several_per_call_with_one_result_each(local_ray, pool, tmp_path, monkeypatch):
    run_dir, sizes = _run_spying(_config(pool, tmp_path / "run"), monkeypatch)
    events, asked, results = journal_records(run_dir)
    assert len(asked) == 48 and set(results) == {c["id"] for c in asked}
    assert all(r["status"] == "ok" and r["attempts"] == 1 for r in results.values())
    assert next(e for e in events if e["event"] == "ask")["n"] == 16  # count x batch asked ahead
    assert sizes[0] == 1  # nothing measured yet: one per call
    assert max(sizes) == 8 and sum(sizes) == 48  # then up to `batch` (2 ms evaluations fit 0.2 s many times)
    told = [i for e in events if e["event"] == "tell" for i in e["ids"]]
    assert told == [c["id"] for c in asked]  # ordered: told in ask order


def test_batched_ordered_runs_are_reproducible(local_ray, pool, tmp_path, monkeypatch):
    """The window (count x batch) is fixed by the config, the call sizes follow timing: the strategy sees the
    same asks and tells whatever the timing, so two runs give the same candidates and scores."""
    a, _ = _run_spying(
        _config(pool, tmp_path / "a", evaluator=synthetic_evaluator("sleep", seconds=0.0)), monkeypatch
    )
    b, _ = _run_spying(_config(pool, tmp_path / "b", evaluator=synthetic_evaluator("sleep", seconds=0.004)),
                       monkeypatch)  # fmt: skip
    _, asked_a, results_a = journal_records(a)
    _, asked_b, results_b = journal_records(b)
    assert [c["genome"] for c in asked_a] == [c["genome"] for c in asked_b]
    assert {k: r["scores"] for k, r in results_a.items()} == {k: r["scores"] for k, r in results_b.items()}


def _faulty_run(pool, tmp_path, monkeypatch, mode: str, fraction: float, candidates: int, max_retries: int):
    """A batched run where the recipes `evomerge.evaluate.faulty` picks misbehave (`mode`): (results by id,
    the ids it picked, the call sizes)."""
    evaluator = synthetic_evaluator("faulty", "evomerge.evaluate.faulty", mode=mode, fraction=fraction)
    config = _config(pool, tmp_path / "run", candidates=candidates, evaluator=evaluator, strategy="random",
                     max_retries=max_retries)  # fmt: skip
    run_dir, sizes = _run_spying(config, monkeypatch)
    _, asked, results = journal_records(run_dir)
    bad = {c["id"] for c in asked if _fraction(recipe_from_dict(c["recipe"])) < fraction}
    assert bad and len(bad) < candidates and max(sizes) > 1
    return results, bad, sizes


def test_a_failing_candidate_fails_alone_in_its_batch(local_ray, pool, tmp_path, monkeypatch):
    results, bad, _ = _faulty_run(pool, tmp_path, monkeypatch, "raise", 0.3, candidates=32, max_retries=1)
    for cid, r in results.items():
        if cid in bad:
            assert (r["status"], r["attempts"]) == ("failed", 2) and "injected evaluator fault" in r["error"]
        else:
            assert (r["status"], r["attempts"]) == ("ok", 1)


def test_a_candidate_that_kills_its_worker_harms_no_other_in_the_batch(
    local_ray, pool, tmp_path, monkeypatch
):
    """Its batch is lost; which candidate did it is unknown, so each runs again alone with that attempt not
    counted: the killer then fails alone (no retries here), every other candidate succeeds at its first attempt."""
    results, bad, _ = _faulty_run(pool, tmp_path, monkeypatch, "exit", 0.1, candidates=24, max_retries=0)
    assert {cid for cid, r in results.items() if r["status"] != "ok"} == bad
    assert all(results[c]["reason"] == "worker_died" for c in bad)
    assert all(r["attempts"] == 1 for r in results.values())


def test_call_sizes_follow_the_measured_evaluation_time():
    search = Search(None, None, None, None, SearchState(), Budget(candidates=1), batch=16)
    assert search.per_call() == 1  # not measured yet
    for seconds, size in [(0.001, 16), (0.02, 10), (0.1, 2), (5.0, 1)]:
        search.eval_seconds = seconds
        assert search.per_call() == size
    search.eval_seconds = 0.001
    ids = [f"c{i}" for i in range(20)]
    assert [len(c) for c in search.calls(ids, 2)] == [10, 10]  # spread over the idle workers
    assert [len(c) for c in search.calls(ids[:5], 2)] == [3, 2]
    search.solo = {"c1"}  # its last call was lost: it goes alone
    assert search.calls(ids[:5], 1) == [["c1"], ["c0", "c2", "c3", "c4"]]


def test_grouped_appends_share_one_fsync(tmp_path, monkeypatch):
    syncs = []
    monkeypatch.setattr(os, "fsync", lambda fd: syncs.append(fd))
    journal = Journal(tmp_path / "journal.jsonl")
    journal.append({"event": "a"})
    assert len(syncs) == 1  # outside a group: at once
    with journal.grouped():
        for i in range(5):
            journal.append({"event": "b", "i": i})
        assert len(syncs) == 1
        journal.sync()
        journal.sync()  # nothing new: no second fsync
        assert len(syncs) == 2
        journal.append({"event": "c"})
    assert len(syncs) == 3  # the group's end syncs what is left
    journal.close()
    assert (tmp_path / "journal.jsonl").read_text().count("\n") == 7


@pytest.mark.parametrize("batch", [1, 4])
def test_racing_keeps_one_candidate_per_call(batch):
    """Racing's candidates take several calls (a promotion scores the next slice on the resident model)."""
    import numpy as np

    from evomerge.fidelity.plan import EstimatePlan, ExactPlan, ObjectiveMap, RacingPlan

    objectives = ObjectiveMap(["t"], np.ones(1), np.ones(1), multi=False)
    racing = RacingPlan({"t": 40}, objectives, rungs=[10], eta=3.0, test="none", alpha=0.05, seed=0)
    assert Search(None, None, None, None, SearchState(), Budget(), batch=batch, plan=racing).batch == 1
    assert (
        Search(None, None, None, None, SearchState(), Budget(), batch=batch, plan=ExactPlan()).batch == batch
    )
    assert getattr(EstimatePlan, "one_call", False)  # an estimator's candidate is one call on its subset
