"""MAP (evomerge/strategies/map.py): the surrogate, the design, and the strategy through the real engine
(local Ray, a synthetic function evaluator: objective k = -|c - t_k|^2, whose Pareto front is the triangle
of the targets t_k)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from evomerge.config import parse_config
from evomerge.journal import read_journal
from evomerge.pareto import igd_plus
from evomerge.runtime.run import create_run_dir, execute
from evomerge.space.task_vector import TaskVectorSpace
from evomerge.strategies import STRATEGIES, Result
from evomerge.strategies import map as M

TARGETS = np.array([[0.2, 0.2, 0.8], [0.8, 0.3, 0.3], [0.3, 0.8, 0.2]])


def objectives(c: np.ndarray) -> np.ndarray:
    return -np.sum((c[None, :] - TARGETS) ** 2, axis=1)


def true_front(n: int = 3000) -> np.ndarray:
    """Objective vectors of the convex combinations of the targets: the whole Pareto front."""
    w = np.random.default_rng(0).dirichlet(np.ones(len(TARGETS)), n)
    return np.array([objectives(c) for c in w @ TARGETS])


# ------------------------------------------------------------------------------------------ surrogate


@pytest.mark.parametrize("link", ["identity", "sigmoid"])
def test_surrogate_recovers_a_known_quadratic(link):
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, size=(30, 3))
    beta = rng.normal(0, 1.5, size=M.n_params(3))
    y = M.predict(beta, x, link)
    fitted = M.fit_surrogate(x, y, link)
    np.testing.assert_allclose(fitted, beta, atol=1e-5)
    quality = M.fit_quality(x, y, link, fitted)
    assert quality["r2"] == pytest.approx(1.0) and quality["cv_rmse"] < 1e-6


def test_a_fit_does_not_depend_on_memory_alignment():
    """BLAS results vary in the last bits with alignment; an ill-posed sigmoid fit amplifies that into
    another local optimum, which would break journal replay. The fit must be bit-identical."""
    rng = np.random.default_rng(3)
    x, y = rng.uniform(0, 1, size=(19, 3)), rng.uniform(0, 1, size=19) ** 3
    fits = set()
    for offset in range(8):
        buf_x, buf_y = np.empty(x.size + 8), np.empty(len(y) + 8)
        xa, ya = buf_x[offset : offset + x.size].reshape(x.shape), buf_y[offset : offset + len(y)]
        xa[:], ya[:] = x, y
        fits.add(M.fit_surrogate(xa, ya, "sigmoid").tobytes())
    assert len(fits) == 1


def test_features_are_squares_cross_terms_linear_then_constant():
    f = M.quadratic_features(np.array([[2.0, 3.0, 5.0]]))
    np.testing.assert_array_equal(f, [[4, 9, 25, 6, 10, 15, 2, 3, 5, 1]])


def test_too_few_points_is_a_fit_error():
    with pytest.raises(M.SurrogateFitError, match="cannot fit 10"):
        M.fit_surrogate(np.zeros((5, 3)), np.zeros(5), "identity")


def test_initial_design_has_one_hots_then_a_grid_without_special_points():
    x = M.initial_design(3, np.zeros(3), np.ones(3), np.random.default_rng(0))
    assert x.shape == (20, 3)  # (K+1)(K+2)
    np.testing.assert_array_equal(x[:3], np.eye(3))
    grid = x[3:]
    assert not M._is_one_hot(grid).any()
    assert not np.isclose(grid.sum(axis=1), 1.0).any()
    assert not np.all(np.isclose(grid, grid[:, :1]), axis=1).any()
    assert len(np.unique(grid, axis=0)) == len(grid)


def test_hyperspherical_coordinates_round_trip():
    x = np.random.default_rng(2).uniform(0, 1, size=(50, 4))
    r, angles = M.to_hyperspherical(x)
    assert np.all((angles >= 0) & (angles <= np.pi / 2))
    np.testing.assert_allclose(M.from_hyperspherical(r, angles), x, atol=1e-12)


def test_replayed_calls_give_the_same_candidates_in_every_mode():
    """A strategy is a pure function of (seed, calls, values): a fresh one told the same things asks the
    same; covers the bayes and nested phases that the registry-wide contract tests do not reach."""
    space = TaskVectorSpace("base", ["a", "b", "c"])
    for options in ({"bayes_rounds": 2, "bayes_points": 6}, {"nested": True, "nested_points": 10}):
        runs = []
        for _ in range(2):
            s = STRATEGIES.get("map")(space, n_objectives=3, seed=5, generations=5, **options)
            pending, asked = s.ask(2), []
            while len(s.told) < 45:
                c = pending.pop(0)
                asked.append(c.genome)
                s.tell([Result(c.id, objectives(c.genome))])
                pending += s.ask(1)
            runs.append((np.array(asked), [c.info["phase"] for c in s.asked.values()]))
        np.testing.assert_array_equal(runs[0][0], runs[1][0])
        assert runs[0][1] == runs[1][1]
        assert ("bayes" in runs[0][1]) or ("merge" in runs[0][1])


# ------------------------------------------------------------------------------------------ the engine


def _config(pool, run_dir: Path, budget: int, **options) -> dict:
    return {
        "name": "map",
        "models": {
            "base": str(pool["base"]),
            "sources": [str(pool[f"e{i}"]) for i in range(3)],
        },  # not loaded
        "space": {"type": "task_vector", "low": 0.0, "high": 1.0},
        "strategy": {"name": "map", "options": {"generations": 8, **options}},
        "evaluator": {
            "type": "function",
            "function": "evomerge.evaluate.synthetic:quadratic",
            "kwargs": {"targets": TARGETS.tolist()},
        },
        "objectives": [{"name": "q0"}, {"name": "q1"}, {"name": "q2"}],
        "budget": {"candidates": budget},
        "workers": {"count": 2},
        "tracking": {"enabled": False},
        "seed": 0,
        "output": str(run_dir),
    }


def _run(pool, run_dir: Path, budget: int, **options):
    cfg = parse_config(_config(pool, run_dir, budget, **options), "test")
    state, _ = execute(create_run_dir(cfg, None, None), cfg)
    return cfg, state


def _points(state) -> np.ndarray:
    return np.array([r["objectives"] for r in state.results.values() if r["status"] == "ok"])


def test_map_front_through_the_engine_is_close_to_the_true_front(local_ray, pool, tmp_path):
    from evomerge.tracking import load_record, write_tables

    _, state = _run(pool, tmp_path / "run", 60)
    phases = [c.info["phase"] for c in state.candidates.values()]
    assert phases[:20] == ["design"] * 20 and phases.count("front") == 40
    assert igd_plus(_points(state), true_front()) < 0.06
    front = [c for c in state.candidates.values() if c.info["phase"] == "front"]
    for c in front:  # the surrogate is exact here: predicted = measured
        measured = state.results[c.id]["objectives"]
        predicted = [c.info["predicted"][str(j)] for j in range(3)]
        np.testing.assert_allclose(predicted, measured, atol=1e-6)
        assert c.info["fit"]["0"]["r2"] == pytest.approx(1.0)
    _, record = load_record(tmp_path / "run")
    write_tables(record, tmp_path)
    with open(tmp_path / "pareto.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and {"predicted/q0", "predicted/q1", "predicted/q2", "objective/q0"} <= set(rows[0])
    for row in rows:  # design points have no prediction; front points have one per objective
        phase = state.candidates[row["id"]].info["phase"]
        assert (row["predicted/q0"] == "") == (phase == "design")
        if phase == "front":
            assert float(row["predicted/q1"]) == pytest.approx(float(row["objective/q1"]), abs=1e-6)


@pytest.mark.parametrize(
    ("options", "budget", "phase"),
    [
        ({"bayes_rounds": 2, "bayes_points": 8}, 50, "bayes"),
        ({"nested": True, "nested_points": 12}, 35, "merge"),
    ],
)
def test_bayesian_and_nested_map_run_through_the_engine(local_ray, pool, tmp_path, options, budget, phase):
    _, state = _run(pool, tmp_path / "run", budget, **options)
    phases = [c.info["phase"] for c in state.candidates.values()]
    assert len(state.results) == budget and all(r["status"] == "ok" for r in state.results.values())
    if phase == "bayes":
        assert phases.count("bayes") == 16 and "front" in phases
        assert igd_plus(_points(state), true_front()) < 0.1
    else:  # 3 experts, two pairwise merges of 12 design points + the merge itself
        assert phases[:3] == ["design"] * 3 and phases.count("merge") == 2 and phases.count("nested") == 24
        merges = [c for c in state.candidates.values() if c.info["phase"] == "merge"]
        assert sorted(sum(merges[-1].info["pair"], [])) == [0, 1, 2]  # the last merge holds every task


def test_resume_replays_the_journal_to_the_same_candidates(local_ray, pool, tmp_path):
    cfg, first = _run(pool, tmp_path / "run", 26, bayes_rounds=1, bayes_points=4)
    before = {cid: c.genome for cid, c in first.candidates.items()}
    longer = cfg.model_copy(update={"budget": cfg.budget.model_copy(update={"candidates": 40})})
    state, _ = execute(tmp_path / "run", longer, resume=True)  # replay checks every recorded ask
    assert len(state.results) == 40
    for cid, genome in before.items():
        np.testing.assert_array_equal(state.candidates[cid].genome, genome)
    events = read_journal(tmp_path / "run" / "journal.jsonl")
    assert [e["event"] for e in events].count("resume") == 1
    assert {c.info["phase"] for c in state.candidates.values()} >= {"design", "bayes", "front"}
