"""The search loop on real Ray (local, 2 CPUs) with a synthetic evaluator; faults injected for real."""

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import yaml
from helpers import evomerge_command, kill_group, spawn

from evomerge.config import parse_config
from evomerge.journal import Journal, read_journal
from evomerge.runtime.run import create_run_dir, execute, resume


def _config(
    pool, run_dir: Path, *, candidates=16, seconds=0.0, strategy="random", scheduling="ordered", **extra
):
    data = {
        "name": "t",
        "models": {"base": str(pool["base"]), "sources": [str(pool["e0"]), str(pool["e1"]), str(pool["e2"])]},
        "space": {"type": "task_vector"},
        "strategy": {"name": strategy},
        "evaluator": {
            "type": "function",
            "function": "evomerge.evaluate.synthetic:sleep",
            "kwargs": {"seconds": seconds},
        },
        "objectives": [{"name": "q0"}, {"name": "q1"}],
        "budget": {"candidates": candidates},
        "workers": {"count": 2, "scheduling": scheduling},
        "seed": 3,
        "output": str(run_dir),
        **extra,
    }
    return data


def _results(run_dir: Path) -> dict[str, dict]:
    events = read_journal(run_dir / "journal.jsonl", repair=False)
    results = [e for e in events if e["event"] == "result"]
    ids = [e["id"] for e in results]
    assert len(ids) == len(set(ids)), "a candidate has more than one result"
    return {e["id"]: e for e in results}


def _run(data, tmp_path):
    cfg = parse_config(data, "test")
    run_dir = create_run_dir(cfg, None, None)
    state, summary = execute(run_dir, cfg)
    return run_dir, state, summary


@pytest.mark.parametrize("scheduling", ["ordered", "as_completed"])
def test_search_runs_to_budget_with_one_result_per_candidate(local_ray, pool, tmp_path, scheduling):
    run_dir, state, summary = _run(_config(pool, tmp_path / "run", scheduling=scheduling), tmp_path)
    results = _results(run_dir)
    asked = [
        c["id"]
        for e in read_journal(run_dir / "journal.jsonl")
        if e["event"] == "ask"
        for c in e["candidates"]
    ]
    assert len(asked) == 16 and set(asked) == set(results)
    assert all(r["status"] == "ok" for r in results.values())
    assert len(state.told) == 16
    assert summary["best"] is not None and summary["front"]
    assert (run_dir / "front.json").exists() and (run_dir / "best.yaml").exists()


@pytest.mark.slow  # end to end: two full runs (~12 s)
def test_ordered_runs_are_reproducible(local_ray, pool, tmp_path):
    a, _, _ = _run(_config(pool, tmp_path / "a", strategy="cma", seconds=0.01), tmp_path)
    b, _, _ = _run(_config(pool, tmp_path / "b", strategy="cma", seconds=0.01), tmp_path)
    ra, rb = _results(a), _results(b)
    assert {k: v["scores"] for k, v in ra.items()} == {k: v["scores"] for k, v in rb.items()}


@pytest.mark.slow  # end to end: a worker SIGKILLed mid-run (~9 s); test_reliability covers random kills too
def test_killing_a_worker_loses_nothing(local_ray, pool, tmp_path):
    from evomerge.runtime import search as search_mod

    data = _config(pool, tmp_path / "run", candidates=20, seconds=0.4)
    cfg = parse_config(data, "test")
    run_dir = create_run_dir(cfg, None, None)
    killed = []
    original = search_mod.WorkerPool.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        pids = self.pids()

        def assassin():
            time.sleep(1.5)
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])
            time.sleep(1.5)
            os.kill(ray.get(self.actors[1].pid.remote()), signal.SIGKILL)
            killed.append(True)

        threading.Thread(target=assassin, daemon=True).start()

    search_mod.WorkerPool.__init__ = spy
    try:
        execute(run_dir, cfg)
    finally:
        search_mod.WorkerPool.__init__ = original
    assert len(killed) == 2
    results = _results(run_dir)
    assert len(results) == 20 and all(r["status"] == "ok" for r in results.values())
    assert max(r["attempts"] for r in results.values()) >= 2  # a killed candidate was re-run


def test_failing_evaluator_is_retried_then_recorded_failed(local_ray, pool, tmp_path):
    data = _config(pool, tmp_path / "run", candidates=4)
    data["evaluator"] = {"type": "function", "function": "evomerge.evaluate.synthetic:numeric_params"}
    data["workers"]["max_retries"] = 1
    run_dir, state, summary = _run(data, tmp_path)
    results = _results(run_dir)
    assert len(results) == 4
    assert all(r["status"] == "failed" and r["attempts"] == 2 for r in results.values())
    assert "expected a dict" in next(iter(results.values()))["error"]
    assert summary["best"] is None


@pytest.mark.slow  # end to end: two full runs and a SIGKILL (~25 s)
def test_driver_sigkill_then_resume_matches_uninterrupted_run(local_ray, pool, tmp_path):
    full_dir, _, _ = _run(
        _config(pool, tmp_path / "full", candidates=20, seconds=0.25, strategy="cma"), tmp_path
    )
    killed_dir = tmp_path / "killed"
    cfg_file = tmp_path / "killed.yaml"
    cfg_file.write_text(
        yaml.safe_dump(_config(pool, killed_dir, candidates=20, seconds=0.25, strategy="cma"))
    )
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = spawn(
        evomerge_command("run", cfg_file), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            journal = killed_dir / "journal.jsonl"
            if journal.exists() and journal.read_text().count('"event":"result"') >= 6:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the run never got going")
    finally:
        kill_group(proc)  # the driver and every Ray process it started
    partial = _results(killed_dir)
    assert 6 <= len(partial) < 20
    resume(killed_dir)
    full, resumed = _results(full_dir), _results(killed_dir)
    assert set(full) == set(resumed)
    assert {k: v["scores"] for k, v in full.items()} == {k: v["scores"] for k, v in resumed.items()}


def test_torn_last_journal_line_is_dropped(tmp_path):
    path = tmp_path / "journal.jsonl"
    with Journal(path) as j:
        j.append({"event": "start", "t": 1.0})
        j.append({"event": "ask", "t": 2.0, "n": 0, "candidates": []})
    with open(path, "ab") as f:
        f.write(b'{"event":"result","id":"c0')
    events = read_journal(path)
    assert [e["event"] for e in events] == ["start", "ask"]
    assert path.read_bytes().endswith(b"\n") and b"c0" not in path.read_bytes()


def test_corrupt_middle_line_is_an_error(tmp_path):
    from evomerge.journal import JournalError

    path = tmp_path / "journal.jsonl"
    path.write_text('{"event":"start"}\nnot json\n{"event":"end"}\n')
    with pytest.raises(JournalError, match="line 2"):
        read_journal(path)


def test_run_dir_with_a_journal_is_not_overwritten(pool, tmp_path):
    from evomerge.errors import ConfigError

    cfg = parse_config(_config(pool, tmp_path / "run"), "test")
    run_dir = create_run_dir(cfg, None, None)
    (run_dir / "journal.jsonl").write_text("")
    with pytest.raises(ConfigError, match="evomerge resume"):
        create_run_dir(cfg, None, None)


def test_front_command_reads_the_journal(local_ray, pool, tmp_path):
    from typer.testing import CliRunner

    from evomerge.cli import app

    run_dir, _, summary = _run(_config(pool, tmp_path / "run", candidates=8), tmp_path)
    out = CliRunner().invoke(app, ["front", str(run_dir)])
    assert out.exit_code == 0, out.output
    for row in summary["front"]:
        assert row["id"] in out.output
    assert json.loads((run_dir / "front.json").read_text())["best"]["id"] == summary["best"]["id"]
    assert np.isfinite(summary["best"]["objectives"]).all()
