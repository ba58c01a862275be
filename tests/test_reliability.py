"""Reliability and security (docs/reliability.md names a test here for each row of its table): faults in
workers, the driver and the tracking server; bad inputs; code execution, network exposure, paths and
secrets; a 2,000-candidate search. Real Ray (local, 2 CPUs), real MLflow (sqlite, a real `mlflow server`),
real files; faults are real signals (SIGKILL) or `evomerge.faults` (EVOMERGE_FAULT) and `evomerge.evaluate.faulty` (faulty evaluators)."""

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
from helpers import evomerge_command, free_ports, kill_group, make_llama, spawn
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.config import parse_config
from evomerge.evaluate.faulty import _fraction
from evomerge.journal import read_journal
from evomerge.merge.recipe import Recipe
from evomerge.runtime.run import create_run_dir, execute, resume

runner = CliRunner()
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def _config(pool, run_dir: Path, *, candidates=12, fn="faulty", workers=None, tracking=None, **kwargs):
    return {
        "name": "rel",
        "models": {"base": str(pool["base"]), "sources": [str(pool["e0"]), str(pool["e1"]), str(pool["e2"])]},
        "space": {"type": "task_vector"},
        "strategy": {"name": "random"},
        "evaluator": {"type": "function", "function": f"evomerge.evaluate.faulty:{fn}", "kwargs": kwargs},
        "objectives": [{"name": "q0"}, {"name": "q1"}],
        "budget": {"candidates": candidates},
        "workers": {"count": 2, **(workers or {})},
        "seed": 11,
        "output": str(run_dir),
        "tracking": tracking or {"enabled": False},
    }


def _run(data):
    cfg = parse_config(data, "test")
    run_dir = create_run_dir(cfg, None, None)
    _state, summary = execute(run_dir, cfg)
    return run_dir, summary


def _final(run_dir: Path) -> dict[str, dict]:
    """{id: result}; asserts every asked candidate has exactly one result (nothing lost, nothing twice)."""
    events = read_journal(run_dir / "journal.jsonl", repair=False)
    asked = [c["id"] for e in events if e["event"] == "ask" for c in e["candidates"]]
    results = [e for e in events if e["event"] == "result"]
    assert sorted(r["id"] for r in results) == sorted(asked), "a candidate has no result, or two"
    return {r["id"]: r for r in results}


def _faulty_ids(run_dir: Path, fraction: float) -> set[str]:
    events = read_journal(run_dir / "journal.jsonl", repair=False)
    cands = [c for e in events if e["event"] == "ask" for c in e["candidates"]]
    return {c["id"] for c in cands if _fraction(Recipe.model_validate(c["recipe"])) < fraction}


def _our_ray_worker(pid: int) -> bool:
    """A live Ray worker process that this test process started (never anything else)."""
    try:
        proc = psutil.Process(pid)
        return proc.cmdline()[0].startswith("ray::") and pid in {
            p.pid for p in psutil.Process().children(recursive=True)
        }
    except (psutil.Error, IndexError):
        return False


# ------------------------------------------------------------------------------------------ 1. worker faults


def test_random_worker_sigkills_lose_nothing(local_ray, pool, tmp_path):
    """kill -9 of a worker at random moments (pids from the journal's results): every candidate still gets
    exactly one result, the killed ones re-run; the counts reach front.json."""
    run_dir = tmp_path / "run"
    data = _config(pool, run_dir, candidates=24, seconds=0.3, fraction=0.0, workers={"max_retries": 5})
    rng = np.random.default_rng(7)
    killed: list[int] = []
    done = threading.Event()

    def assassin():
        while len(killed) < 3 and not done.is_set():
            time.sleep(rng.uniform(0.4, 1.5))
            journal = run_dir / "journal.jsonl"
            events = read_journal(journal, repair=False) if journal.exists() else []
            pids = list(dict.fromkeys(e["pid"] for e in reversed(events) if e.get("pid")))
            live = [p for p in pids[:2] if p not in killed and _our_ray_worker(p)]
            if live:
                pid = live[int(rng.integers(len(live)))]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    thread = threading.Thread(target=assassin, daemon=True)
    thread.start()
    try:
        _, summary = _run(data)
    finally:
        done.set()
        thread.join()
    results = _final(run_dir)
    assert len(killed) >= 2
    assert len(results) == 24 and all(r["status"] == "ok" for r in results.values())
    counts = json.loads((run_dir / "front.json").read_text())["counts"]
    assert counts["ok"] == 24 and counts["failed"] == 0
    assert counts["retries"] == sum(r["attempts"] - 1 for r in results.values())
    assert summary["counts"] == counts


def test_raising_evaluator_is_retried_then_recorded_failed_with_the_reason(local_ray, pool, tmp_path):
    run_dir, summary = _run(
        _config(pool, tmp_path / "run", candidates=10, mode="raise", fraction=0.4, workers={"max_retries": 1})
    )
    results, bad = _final(run_dir), _faulty_ids(run_dir, 0.4)
    assert bad and len(bad) < 10
    for cid, r in results.items():
        if cid in bad:
            assert (r["status"], r["reason"], r["attempts"]) == ("failed", "error", 2)
            assert "RuntimeError: injected evaluator fault" in r["error"]
        else:
            assert r["status"] == "ok" and r["attempts"] == 1
    assert summary["counts"]["failed_by_reason"] == {"error": len(bad)}
    assert summary["counts"]["retried"] == len(bad)


def test_evaluator_failing_once_succeeds_on_retry(local_ray, pool, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    run_dir, summary = _run(
        _config(pool, tmp_path / "run", candidates=10, mode="raise", fraction=0.5, marks=str(marks))
    )
    results, bad = _final(run_dir), _faulty_ids(run_dir, 0.5)
    assert bad and all(r["status"] == "ok" for r in results.values())
    assert {c for c, r in results.items() if r["attempts"] == 2} == bad
    assert summary["counts"]["failed"] == 0 and summary["counts"]["retried"] == len(bad)


@pytest.mark.parametrize("once", [False, True], ids=["always", "once"])
def test_hanging_evaluator_times_out_its_worker_restarts(local_ray, pool, tmp_path, once):
    """`workers.timeout_seconds`: the worker of a hung candidate is killed and restarted by Ray; the
    candidate is retried (`max_retries`), then recorded failed with reason `timeout`."""
    marks = tmp_path / "marks"
    marks.mkdir()
    kwargs = {"mode": "hang", "fraction": 0.25, **({"marks": str(marks)} if once else {})}
    data = _config(pool, tmp_path / "run", candidates=8, workers={"timeout_seconds": 2.0, "max_retries": 1},
                   **kwargs)  # fmt: skip
    started = time.perf_counter()
    run_dir, summary = _run(data)
    assert time.perf_counter() - started < 150
    results, bad = _final(run_dir), _faulty_ids(run_dir, 0.25)
    assert bad
    for cid, r in results.items():
        if cid not in bad:
            assert r["status"] == "ok"
        elif once:
            assert r["status"] == "ok" and r["attempts"] == 2
        else:
            assert (r["status"], r["reason"], r["attempts"]) == ("failed", "timeout", 2)
            assert "no result within 2 s" in r["error"]
    assert summary["counts"]["failed_by_reason"] == ({} if once else {"timeout": len(bad)})


@pytest.mark.parametrize(
    ("mode", "reason", "attempts", "needle"),
    [
        ("nan", "invalid", 1, "non-finite objective"),
        ("inf", "invalid", 1, "non-finite objective"),
        ("missing", "invalid", 1, "objective 'q1' is not among"),
        ("shape", "error", 2, "TypeError"),
    ],
)
def test_invalid_results_are_recorded_failed(local_ray, pool, tmp_path, mode, reason, attempts, needle):
    """NaN/Inf, a missing objective: the evaluator answered, so no retry; a wrong shape raises in the
    worker (float() of a list) and is retried like any error."""
    data = _config(pool, tmp_path / "run", candidates=6, mode=mode, fraction=0.5, workers={"max_retries": 1})
    run_dir, summary = _run(data)
    results, bad = _final(run_dir), _faulty_ids(run_dir, 0.5)
    assert bad
    for cid in bad:
        r = results[cid]
        assert (r["status"], r["reason"], r["attempts"]) == ("failed", reason, attempts)
        assert needle in r["error"] and r["objectives"] is None
    assert all(results[c]["status"] == "ok" for c in set(results) - bad)
    assert summary["counts"]["failed"] == len(bad)


def test_cli_prints_the_failure_counts(local_ray, pool, tmp_path):
    cfg = tmp_path / "run.yaml"
    data = _config(
        pool, tmp_path / "run", candidates=6, mode="raise", fraction=0.5, workers={"max_retries": 0}
    )
    cfg.write_text(yaml.safe_dump(data))
    out = runner.invoke(app, ["run", str(cfg)])
    assert out.exit_code == 0, out.output
    n = len(_faulty_ids(tmp_path / "run", 0.5))
    assert f"candidates 6: {6 - n} ok, {n} failed (error {n}), 0 retried" in out.output


# ------------------------------------------------------------------------------------------ 2. driver faults


DRIVER = {"candidates": 24, "seconds": 0.05}


def _driver_config(pool, run_dir, **tracking):
    data = _config(pool, run_dir, candidates=DRIVER["candidates"], fn="faulty", fraction=0.0,
                   seconds=DRIVER["seconds"], tracking=tracking or None)  # fmt: skip
    data["strategy"] = {"name": "cma"}
    return data


@pytest.fixture(scope="module")
def uninterrupted(local_ray, pool, tmp_path_factory):
    run_dir, _ = _run(_driver_config(pool, tmp_path_factory.mktemp("full") / "run"))
    return run_dir


def _spawn_driver(cfg: Path, fault: str | None) -> subprocess.Popen:
    env = {**ENV, **({"EVOMERGE_FAULT": fault} if fault else {})}
    return spawn(evomerge_command("run", cfg), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def _results_in(path: Path) -> int:
    return path.read_bytes().count(b'"event":"result"') if path.exists() else 0


def _same_front(a: Path, b: Path) -> None:
    fa, fb = (json.loads((d / "front.json").read_text()) for d in (a, b))
    assert [r["id"] for r in fa["front"]] == [r["id"] for r in fb["front"]]
    assert [r["scores"] for r in fa["front"]] == [r["scores"] for r in fb["front"]]
    assert fa["best"]["id"] == fb["best"]["id"]
    ra, rb = _final(a), _final(b)
    assert {k: v["scores"] for k, v in ra.items()} == {k: v["scores"] for k, v in rb.items()}


@pytest.mark.slow  # end to end: a killed driver and its resume, per fault (~14 s each)
@pytest.mark.parametrize("fault", ["ask:3", "journal_write:RANDOM"])
def test_driver_killed_at_a_named_point_resumes_to_the_same_front(uninterrupted, pool, tmp_path, fault):
    """SIGKILL of the driver right after an ask (nothing journaled yet) or half-way through a journal line
    (a torn last line, the write at a random index): `resume` ends with the uninterrupted run's front."""
    if fault.endswith("RANDOM"):
        fault = f"journal_write:{np.random.default_rng(3).integers(8, 40)}"
    run_dir, cfg = tmp_path / "run", tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(_driver_config(pool, run_dir)))
    proc = _spawn_driver(cfg, fault)
    try:
        assert proc.wait(timeout=240) == -signal.SIGKILL  # it killed itself at the named point
    finally:
        kill_group(proc)
    raw = (run_dir / "journal.jsonl").read_bytes()
    if fault.startswith("journal_write"):
        assert not raw.endswith(b"\n")  # the torn line is there
    assert _results_in(run_dir / "journal.jsonl") < DRIVER["candidates"]
    resume(run_dir)
    assert (run_dir / "journal.jsonl").read_bytes().count(b"\n") > raw.count(b"\n")
    _same_front(uninterrupted, run_dir)


@pytest.mark.slow  # end to end: ~18 s
def test_driver_killed_at_a_random_moment_while_tracking_resumes_and_store_matches(
    uninterrupted, pool, tmp_path
):
    """SIGKILL of the driver's whole process group (driver, Ray, the MLflow tracking process mid-logging)
    after a random number of results; resume gives the same front, and the store matches the journal."""
    from evomerge.tracking import sync

    run_dir, cfg = tmp_path / "run", tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(_driver_config(pool, run_dir, enabled=True)))
    after = int(np.random.default_rng(5).integers(4, 16))
    proc = _spawn_driver(cfg, None)
    try:
        deadline = time.time() + 240
        while _results_in(run_dir / "journal.jsonl") < after and proc.poll() is None:
            assert time.time() < deadline, "the run never got going"
            time.sleep(0.05)
    finally:
        kill_group(proc)
    assert _results_in(run_dir / "journal.jsonl") < DRIVER["candidates"]
    resume(run_dir)
    _same_front(uninterrupted, run_dir)
    report = sync(run_dir)
    assert report["created"] == 0 and report["children"] == DRIVER["candidates"]
    _assert_store_matches(report["uri"], run_dir)


def _assert_store_matches(uri: str, run_dir: Path) -> None:
    from mlflow import MlflowClient

    from evomerge.tracking import CANDIDATE_TAG, PARENT_TAG, RUN_DIR_TAG

    client = MlflowClient(uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, f"tags.`{RUN_DIR_TAG}` = '{run_dir.resolve()}'", max_results=5000)
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    assert len(parents) == 1
    children = client.search_runs(
        [parents[0].info.experiment_id], f"tags.`{PARENT_TAG}` = '{parents[0].info.run_id}'", max_results=5000
    )
    by_id = {c.data.tags[CANDIDATE_TAG]: c for c in children}
    assert len(by_id) == len(children), "a candidate has two child runs"
    results = _final(run_dir)
    assert set(by_id) == set(results)
    for cid, r in results.items():
        assert by_id[cid].data.tags["status"] == r["status"]
        if r["status"] == "ok":
            assert {k: by_id[cid].data.metrics[k] for k in r["scores"]} == r["scores"]


def test_torn_journal_line_is_dropped_and_the_file_repaired(tmp_path):
    """journal.py: a torn last line (no newline) is dropped and cut; resume then redoes that event. A bad line
    elsewhere is an error (tests/runtime/test_search.py::test_corrupt_middle_line_is_an_error)."""
    path = tmp_path / "journal.jsonl"
    path.write_bytes(b'{"event":"start","t":1}\n{"event":"ask","t":2,"n":0,"candidates":[]}\n{"event":"res')
    assert [e["event"] for e in read_journal(path, repair=False)] == ["start", "ask"]
    assert path.read_bytes().endswith(b'{"event":"res')  # repair=False leaves the file alone
    assert [e["event"] for e in read_journal(path)] == ["start", "ask"]
    assert path.read_bytes().endswith(b"[]}\n")


# ------------------------------------------------------------------------------------------ 3. tracking faults


def _start_mlflow(db: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` (sqlite backend, artifacts beside it) in its own process group."""
    import urllib.request

    from evomerge.ui import server_command

    cmd = [
        *server_command(f"sqlite:///{db}", "127.0.0.1", port),
        "--artifacts-destination",
        str(db.parent / "art"),
    ]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = spawn(cmd, cwd=db.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, "mlflow server exited"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    raise AssertionError("mlflow server did not start")


def _listening(proc: subprocess.Popen) -> set[str]:
    addrs = set()
    for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
        for c in p.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN:
                addrs.add(c.laddr.ip)
    return addrs


@pytest.mark.slow  # end to end: a server killed and restarted (~17 s)
def test_tracking_server_dies_mid_run_and_comes_back(local_ray, pool, tmp_path):
    """The `mlflow server` is SIGKILLed (its process group) after a few results and restarted while the
    search goes on; the search finishes every candidate, and `evomerge sync` makes the store match."""
    db_dir = tmp_path / "server"
    db_dir.mkdir()
    [port] = free_ports()
    server = _start_mlflow(db_dir / "mlflow.db", port)
    assert _listening(server) == {"127.0.0.1"}  # bound to loopback only
    run_dir = tmp_path / "run"
    data = _config(pool, run_dir, candidates=40, seconds=0.25, fraction=0.0,
                   tracking={"uri": f"http://127.0.0.1:{port}"})  # fmt: skip
    events: dict[str, int] = {}

    def outage():
        nonlocal server
        deadline = time.time() + 180
        while _results_in(run_dir / "journal.jsonl") < 6 and time.time() < deadline:
            time.sleep(0.1)
        kill_group(server)
        events["killed_at"] = _results_in(run_dir / "journal.jsonl")
        time.sleep(2.0)
        server = _start_mlflow(db_dir / "mlflow.db", port)
        events["back_at"] = _results_in(run_dir / "journal.jsonl")

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    try:
        _run(data)
        thread.join(timeout=180)
        assert events["killed_at"] < 40
        assert len(_final(run_dir)) == 40
        out = runner.invoke(app, ["sync", str(run_dir)])
        assert out.exit_code == 0, out.output
        _assert_store_matches(f"http://127.0.0.1:{port}", run_dir)
        assert json.loads((run_dir / "tracking.json").read_text())["needs_sync"] is False
        again = runner.invoke(app, ["sync", str(run_dir)])
        assert "already up to date" in again.output
    finally:
        kill_group(server)


# ------------------------------------------------------------------------------------------ 4. bad inputs


def _tree(path: Path) -> dict[str, str]:
    """A directory's files and their hashes (to show that a failed command left it untouched)."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}  # fmt: skip


def _merge_yaml(tmp, *models, method="linear", base=None):
    data = {
        "merge_method": method,
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
    }
    if base:
        data["base_model"] = str(base)
    path = tmp / "merge.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _copy_with(pool, tmp, name, edit):
    """A copy of expert e1 whose tensors pass through `edit(dict) -> dict`."""
    from safetensors.torch import load_file, save_file

    out = tmp / name
    shutil.copytree(pool["e1"], out)
    tensors = load_file(out / "model.safetensors")
    save_file(edit(tensors), out / "model.safetensors")
    return out


def _poison(value):
    def edit(t):
        t["model.layers.1.mlp.up_proj.weight"][3, 5] = value
        return t

    return edit


def _lora_for_another_base(pool, tmp):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    other = make_llama(tmp / "wide", 7, hidden=48)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(other),
                           LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))  # fmt: skip
    model.save_pretrained(tmp / "lora")
    return f"{pool['base']}+{tmp / 'lora'}"


def _run_yaml(pool, tmp, edit):
    data = _config(pool, tmp / "run", candidates=4, fraction=0.0)
    edit(data)
    path = tmp / "run.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return ["run", str(path)]


def _edits(*edits):
    def edit(data):
        for e in edits:
            e(data)

    return edit


def _set(path, value):
    def edit(data):
        *keys, last = path.split(".")
        node = data
        for k in keys:
            node = node.setdefault(k, {})
        node[last] = value

    return edit


# (id, argv builder (pool, tmp) -> argv, needle in the one error line). Checkpoint faults that
# tests/test_cli.py already covers for `evomerge merge` (missing model, shapes, architectures, truncated and
# corrupt safetensors, unknown method/key, bad YAML, out-of-range density, pickle without the flag, missing
# config) are not repeated; docs/reliability.md lists both.
BAD_INPUTS = [
    (
        "merge-vocab-mismatch",
        lambda p, t: [
            "merge",
            str(_merge_yaml(t, p["e0"], make_llama(t / "big", 0, vocab=80))),
            str(t / "out"),
        ],
        "vocabulary sizes differ",
    ),
    (
        "merge-nan-weights",
        lambda p, t: [
            "merge",
            str(_merge_yaml(t, p["e0"], _copy_with(p, t, "nan", _poison(float("nan"))))),
            str(t / "out"),
        ],
        "model.layers.1.mlp.up_proj.weight",
    ),
    (
        "merge-inf-weights",
        lambda p, t: [
            "merge",
            str(_merge_yaml(t, p["e0"], _copy_with(p, t, "inf", _poison(float("inf"))))),
            str(t / "out"),
        ],
        "NaN or Inf",
    ),
    (
        "merge-missing-tensor",
        lambda p, t: [
            "merge",
            str(
                _merge_yaml(
                    t,
                    p["e0"],
                    _copy_with(
                        p, t, "short", lambda x: {k: v for k, v in x.items() if "layers.2.mlp" not in k}
                    ),
                )
            ),
            str(t / "out"),
        ],
        "short",
    ),
    (
        "merge-lora-for-another-base",
        lambda p, t: ["merge", str(_merge_yaml(t, p["e0"], _lora_for_another_base(p, t))), str(t / "out")],
        "another base",
    ),
    (
        "merge-output-parent-is-a-file",
        lambda p, t: ["merge", str(_merge_yaml(t, p["e0"], p["e1"])), str(t / "merge.yaml" / "out")],
        "merge.yaml",
    ),
    (
        "run-bad-yaml",
        lambda p, t: ["run", str((t / "r.yaml", (t / "r.yaml").write_text("name: [x\n"))[0])],
        "invalid YAML",
    ),
    ("run-unknown-strategy", lambda p, t: _run_yaml(p, t, _set("strategy.name", "cmaa")), "cmaa"),
    ("run-unknown-space", lambda p, t: _run_yaml(p, t, _set("space.type", "vectorz")), "vectorz"),
    (
        "run-unknown-lmeval-task",
        lambda p, t: _run_yaml(
            p,
            t,
            lambda d: (
                d.pop("objectives"),
                d.update(evaluator={"type": "lmeval", "tasks": ["no_such_task"]}),
            ),
        ),
        "no_such_task",
    ),
    ("run-zero-workers", lambda p, t: _run_yaml(p, t, _set("workers.count", 0)), "workers.count"),
    (
        "run-negative-timeout",
        lambda p, t: _run_yaml(p, t, _set("workers.timeout_seconds", -1)),
        "workers.timeout_seconds",
    ),
    ("run-no-budget", lambda p, t: _run_yaml(p, t, _set("budget", {})), "budget"),
    (
        "run-missing-base-model",  # an evaluator that reads the models (a function evaluator's run needs none)
        lambda p, t: _run_yaml(
            p,
            t,
            _edits(
                _set("models.base", str(t / "nobase")),
                _set("evaluator", {"type": "lmeval", "tasks": ["zoo_search"]}),
            ),
        ),
        "nobase",
    ),
    (
        "run-evaluator-not-importable",
        lambda p, t: _run_yaml(p, t, _set("evaluator.function", "no_such_mod:f")),
        "no_such_mod",
    ),
    (
        "run-name-escapes-runs-dir",
        lambda p, t: _run_yaml(p, t, lambda d: (d.pop("output"), d.update(name="../evil"))),
        "plain name",
    ),
    (
        "run-store-dir-escapes-run-dir",
        lambda p, t: _run_yaml(p, t, _set("strategy.options", {"store_dir": "../x"})),
        "store_dir",
    ),
    ("resume-not-a-run-dir", lambda p, t: ["resume", str(t)], "not a run directory"),
    ("front-not-a-run-dir", lambda p, t: ["front", str(t / "nothing")], "nothing"),
]


RAY_LOG_LINE = re.compile(r"\((\w+ )?pid=\d+")


@pytest.mark.parametrize(("case", "argv", "needle"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(local_ray, pool, tmp_path, case, argv, needle):
    work = tmp_path / "w"
    work.mkdir()
    args = argv(pool, work)
    before = _tree(work)
    out = runner.invoke(app, args)
    assert out.exit_code == 2, out.output
    # Ray forwards worker logs to the driver asynchronously: a worker of an earlier case (shared local Ray)
    # may print into this case's capture; those lines carry Ray's "(Worker pid=N)" prefix
    lines = [x for x in out.output.strip().splitlines() if x.strip() and not RAY_LOG_LINE.search(x)]
    assert len(lines) == 1 and lines[0].startswith("error:"), out.output
    assert needle in lines[0], lines[0]
    assert _tree(work) == before  # no output dir, no run dir, no temp files


@pytest.fixture(scope="module")
def finished(local_ray, pool, tmp_path_factory):
    run_dir, _ = _run(_config(pool, tmp_path_factory.mktemp("finished") / "run", candidates=6, fraction=0.0))
    return run_dir


@pytest.mark.parametrize(
    ("case", "needle"),
    [("corrupt-journal-line", "line 3 is not valid JSON"), ("config-changed-under-the-run", "diverged")],
)
def test_bad_run_dir_on_resume_is_refused_untouched(finished, tmp_path, case, needle):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    if case == "corrupt-journal-line":
        lines = (run_dir / "journal.jsonl").read_bytes().split(b"\n")
        lines[2] = b"{garbage"
        (run_dir / "journal.jsonl").write_bytes(b"\n".join(lines))
    else:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        cfg["seed"] = 12
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    before = _tree(run_dir)
    out = runner.invoke(app, ["resume", str(run_dir)])
    assert out.exit_code == 2, out.output
    lines = [x for x in out.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and needle in lines[0], out.output
    assert _tree(run_dir) == before


def test_disk_full_during_export_leaves_nothing(finished, tmp_path, monkeypatch):
    from evomerge.merge import shards

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shards, "write_shard", full)
    before = _tree(finished)
    out = runner.invoke(app, ["export", str(finished), str(tmp_path / "model")])
    assert out.exit_code == 2, out.output
    lines = [x for x in out.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "No space left on device" in lines[0], out.output
    assert list(tmp_path.iterdir()) == [] and _tree(finished) == before


# ------------------------------------------------------------------------------------------ 5. security


def test_checkpoint_code_is_never_executed(tmp_path, pool):
    """A checkpoint whose config asks for its own modeling code (auto_map): loading it as a search target
    (worker, export --verify) refuses; the code never runs. No call in evomerge passes trust_remote_code=True;
    pickle: tests/test_checkpoints.py::test_pickle_with_code_is_not_executed_even_with_flag."""
    from evomerge.merge.target import load_target, meta_target

    evil = tmp_path / "evil"
    shutil.copytree(pool["base"], evil)
    marker = tmp_path / "pwned"
    cfg = json.loads((evil / "config.json").read_text())
    cfg.update(model_type="evil_llama", auto_map={"AutoConfig": "evil.EvilConfig",
                                                   "AutoModelForCausalLM": "evil.EvilModel"})  # fmt: skip
    (evil / "config.json").write_text(json.dumps(cfg))
    (evil / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    for load in (load_target, meta_target):
        with pytest.raises(Exception, match="trust_remote_code|evil_llama"):  # noqa: PT011 - transformers' own
            load(evil)
    assert not marker.exists()
    root = Path(__file__).resolve().parents[1] / "evomerge"
    for src in root.rglob("*.py"):
        assert "trust_remote_code=True" not in src.read_text(), src


def test_servers_bind_to_loopback_by_default():
    """`evomerge ui` defaults to 127.0.0.1 (a real server's sockets: test_tracking_server_dies_mid_run_and_comes_back);
    Ray starts without its dashboard."""
    import inspect

    from evomerge import cli, ui
    from evomerge.runtime import run

    assert inspect.signature(ui.start_server).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(cli.ui).parameters["host"].default == "127.0.0.1"
    assert "include_dashboard=False" in inspect.getsource(run.init_ray)


def test_secrets_are_redacted_from_mlflow_params_and_config_artifact(local_ray, pool, tmp_path):
    """Keys naming a secret (token, key, secret, password, ...) and passwords/tokens in URLs never reach the
    parent run's params or its config.yaml artifact; `max_new_tokens` and the like are kept."""
    from mlflow import MlflowClient

    from evomerge.tracking import default_uri, redact
    from evomerge.tracking.names import flatten_config

    flat = flatten_config(redact({"tracking": {"uri": "https://bob:hunter2@mlflow.example/?token=abc1"},
                            "evaluator": {"kwargs": {"hf_token": "hf_s3cret", "apiKey": "k3y", "db_password": "pw",
                                                     "max_new_tokens": 8}}}))  # fmt: skip
    assert not {"hunter2", "abc1", "hf_s3cret", "k3y", "pw"} & {
        w for v in flat.values() for w in v.split("'")
    }
    assert "hunter2" not in str(flat) and "abc1" not in str(flat) and "hf_s3cret" not in str(flat)
    assert flat["evaluator.kwargs.max_new_tokens"] == "8" and "bob:***@" in flat["tracking.uri"]
    # end to end, on a real run: a token among the evaluator's kwargs
    run_dir, cfg_path = tmp_path / "run", tmp_path / "run.yaml"
    data = _config(
        pool, run_dir, candidates=4, fraction=0.0, secret_token="tok-12345", tracking={"enabled": True}
    )
    cfg_path.write_text(yaml.safe_dump(data))
    assert runner.invoke(app, ["run", str(cfg_path)]).exit_code == 0
    client = MlflowClient(default_uri(run_dir))
    parent = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                "tags.`evomerge.kind` = 'search'")[0]  # fmt: skip
    assert parent.data.params["evaluator.kwargs.secret_token"] == "***"
    assert "tok-12345" not in json.dumps(parent.data.params)
    art = client.download_artifacts(parent.info.run_id, "config.yaml", str(tmp_path))
    assert "tok-12345" not in Path(art).read_text() and "secret_token: '***'" in Path(art).read_text()


# ------------------------------------------------------------------------------------------ 6. load


LOAD = 2000


@pytest.mark.slow  # end to end: 2,000 candidates (~27 s)
def test_two_thousand_candidates_eight_workers_bounded_driver_memory(pool, tmp_path):
    """2,000 cheap candidates on 8 workers (a driver subprocess, its RSS sampled with psutil); tracking with
    `children: front`: the parent's metrics hold one step per result, and `evomerge sync` finds nothing
    missing (the journal and the store match one to one)."""
    from mlflow import MlflowClient

    from evomerge.tracking import sync

    run_dir, cfg = tmp_path / "run", tmp_path / "run.yaml"
    data = _config(pool, run_dir, candidates=LOAD, fraction=0.0, workers={"count": 8, "num_cpus": 0.25},
                   tracking={"children": "front"})  # fmt: skip
    cfg.write_text(yaml.safe_dump(data))
    proc = spawn(evomerge_command("run", cfg), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    driver, rss = psutil.Process(proc.pid), {}
    try:
        deadline = time.time() + 600
        while proc.poll() is None:
            assert time.time() < deadline
            done = _results_in(run_dir / "journal.jsonl")
            with contextlib.suppress(psutil.Error):
                rss.setdefault(done // 250 * 250, driver.memory_info().rss)
            time.sleep(0.25)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
    assert len(_final(run_dir)) == LOAD
    growth = (max(rss.values()) - rss[min(k for k in rss if k >= 250)]) / (LOAD - 250)
    assert growth < 20_000, f"driver RSS grew {growth:.0f} bytes per candidate ({rss})"
    report = sync(run_dir)
    assert report["created"] == 0 and report["children"] == LOAD
    client = MlflowClient(report["uri"])
    steps = {m.step for m in client.get_metric_history(report["parent_run_id"], "front_size")}
    assert steps == set(range(1, LOAD + 1))
