"""The evaluator and the search on the trained zoo: real models, real lm-eval tasks, real Ray."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.evaluate.base import unpack_samples
from evomerge.evaluate.lmeval import LMEvalSpec
from evomerge.merge.engine import ResidentPool, apply_in_place
from evomerge.merge.mergekit_io import recipe_from_dict

SKILLS = ("rev", "sort", "up", "shift")


@pytest.fixture(scope="module")
def test_split():
    return LMEvalSpec(tasks=("zoo",), batch_size=128).build()


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.slow  # the trained zoo (~3.5 min to build)
def test_every_expert_wins_its_own_task_through_lm_eval(zoo, test_split):
    tok = AutoTokenizer.from_pretrained(zoo["base"])
    scores = {name: test_split.evaluate(_load(path), tok).scores for name, path in zoo.items()}
    for skill in SKILLS:
        task, own = f"zoo_{skill}", scores[f"expert_{skill}"][f"zoo_{skill}"]
        assert own >= 0.9
        others = [s[task] for name, s in scores.items() if name != f"expert_{skill}"]
        assert own > max(others), (skill, own, others)


@pytest.mark.slow  # the trained zoo (~3.5 min to build)
def test_per_sample_scores_match_aggregates_and_follow_in_place_changes(zoo, test_split):
    tok = AutoTokenizer.from_pretrained(zoo["base"])
    experts = [str(p) for n, p in zoo.items() if n != "base"]
    pool = ResidentPool.from_refs([*experts, str(zoo["base"])])
    model = _load(zoo["base"])

    def merged(lam):
        recipe = recipe_from_dict({"merge_method": "task_arithmetic", "base_model": str(zoo["base"]),
                                   "parameters": {"lambda": lam},
                                   "models": [{"model": e, "parameters": {"weight": 1.0}} for e in experts]})  # fmt: skip
        apply_in_place(recipe, pool, model)
        return test_split.evaluate(model, tok)

    a, b, a_again = merged(0.6), merged(0.3), merged(0.6)
    for task in test_split.task_names:
        assert a.scores[task] == pytest.approx(a.samples[task].mean())
        assert len(a.samples[task]) == 250
    assert a.scores != b.scores  # in-place weights changed: the result changed
    assert a.scores == a_again.scores  # and nothing stale was cached
    assert all(np.array_equal(a.samples[t], a_again.samples[t]) for t in a.samples)


def test_small_search_on_the_zoo_runs_to_budget(quick_zoo, local_ray, tmp_path):
    from evomerge.config import parse_config
    from evomerge.runtime.run import create_run_dir, execute

    data = {
        "models": {
            "base": str(quick_zoo["base"]),
            "sources": [str(p) for n, p in quick_zoo.items() if n != "base"],
        },
        "space": {"type": "task_vector", "low": 0.0, "high": 1.2},
        "strategy": {"name": "random"},
        "evaluator": {"type": "lmeval", "tasks": ["zoo_search"], "subsample": 40},
        "budget": {"candidates": 6},
        "workers": {"count": 2},
        "output": str(tmp_path / "run"),
    }
    cfg = parse_config(data, "test")
    state, summary = execute(create_run_dir(cfg, None, None), cfg)
    assert len(state.results) == 6 and all(r["status"] == "ok" for r in state.results.values())
    first = next(iter(state.results.values()))
    assert set(first["scores"]) == {f"zoo_{s}_search" for s in SKILLS}
    # the fixed subsample, per task
    assert all(len(unpack_samples(v)) == 40 for v in first["samples"].values())
    assert summary["best"] is not None
