"""Search strategies on the zoo under one evaluation budget: hand-tuned TA / TIES / DARE-TIES (one evaluation
each) vs CMA-ES over task-vector coefficients (parameter space) vs M2N2 vs GENOME+ vs Evo-Merging [ours] vs
PS+DFS (data-flow search over {a task-arithmetic merge, the experts}). Every search goes through the real
engine (`evomerge.runtime.run.execute`: Ray workers, in-place merges, lm-eval on `zoo_search`, the
validation split); the best candidate of each run (by validation mean) is then scored on the held-out test
split (`zoo`, 4 x 250 prompts) in this process.

    .venv/bin/python experiments/search_compare/run.py --seeds 0 1   # what the committed CSVs hold
    .venv/bin/python experiments/search_compare/run.py --seeds 0 1 2 --budget 80 --limit 150  # fuller

Search fitness: the first `--limit` (default 50) validation prompts of each skill (a cheaper, noisier
fitness; the machine is shared); the reported val_mean/test_mean re-score the best on the full splits.

Writes, next to this file: `results.csv` (one row per method and seed: validation and test scores of the best,
candidates, seconds), `curves.csv` (best validation mean after each evaluation), `summary.csv` (mean and
std over seeds) and `search_compare.png`. Run directories go to --out (default /tmp/search_compare_runs).
"""

from __future__ import annotations

import argparse
import csv
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SKILLS = ("rev", "shift", "sort", "up")
TEST_TASKS = [f"zoo_{s}" for s in SKILLS]
VAL_TASKS = [f"zoo_{s}_search" for s in SKILLS]
LMEVAL = {"type": "lmeval", "tasks": ["zoo_search"], "batch_size": 128}


def hand_recipes(base: str, experts: list[str]) -> dict[str, dict[str, Any]]:
    """Usual defaults: TA with lambda 0.5 (weight 0.5 each, the zoo's SCORES.md row), TIES (density 0.5,
    weight 1, normalize), DARE-TIES (density 0.5, weight 0.5; mergekit's README example values)."""

    def models(**params: float) -> list[dict[str, Any]]:
        return [{"model": e, "parameters": dict(params)} for e in experts]

    return {
        "TA (lambda 0.5)": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": models(weight=0.5),
        },
        "TIES (d 0.5)": {
            "merge_method": "ties",
            "base_model": base,
            "models": models(weight=1.0, density=0.5),
        },
        "DARE-TIES (d 0.5, w 0.5)": {
            "merge_method": "dare_ties",
            "base_model": base,
            "random_seed": 0,
            "models": models(weight=0.5, density=0.5),
        },  # fmt: skip
    }


def search_configs(base: str, experts: list[str], ps_model: str) -> dict[str, dict[str, Any]]:
    """Space + strategy of every search (the rest of the run config is shared)."""
    return {
        "CMA-ES task vectors": {
            "models": {"base": base, "sources": experts},
            "space": {"type": "task_vector", "low": 0.0, "high": 1.2},
            "strategy": {"name": "cma", "options": {"popsize": 8, "sigma": 0.25}},
        },
        "M2N2": {
            "models": {"base": base, "sources": experts},
            "space": {"type": "model", "chunk": "tensor", "delta": True},
            "strategy": {"name": "m2n2", "options": {"pop_size": 12}},
        },
        "GENOME+": {
            "models": {"base": base, "sources": experts},
            "space": {"type": "model", "chunk": "tensor", "delta": True},
            "strategy": {"name": "genome", "options": {"pop_size": 10, "succession": True, "sigma": 0.1}},
        },
        "Evo-Merging [ours]": {
            "models": {"base": base, "sources": experts},
            "space": {"type": "evo_merging", "init_density": 0.5},
            "strategy": {"name": "cma", "options": {"popsize": 8, "sigma": 0.2}},
        },
        "PS+DFS (TA + data flow)": {
            "models": {"base": base, "sources": [ps_model, *experts]},
            "space": {"type": "dataflow", "repeats": 2, "scaling": "slot"},
            "strategy": {"name": "cma", "options": {"popsize": 8, "sigma": 0.2}},
        },
    }


def run_search(
    name: str, spec: dict[str, Any], seed: int, budget: int, limit: int, out: Path
) -> tuple[Any, Path, float]:
    from evomerge.config import parse_config
    from evomerge.runtime.run import create_run_dir, execute

    run_dir = out / f"{name.split()[0].lower().replace('+', 'p')}_{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    data = {"name": run_dir.name, **spec, "evaluator": {**LMEVAL, "limit": limit}, "budget": {"candidates": budget},
            "workers": {"count": 2, "torch_threads": 1}, "tracking": {"enabled": False}, "device": "cpu",
            "seed": seed, "output": str(run_dir)}  # fmt: skip
    config = parse_config(data, name)
    start = time.time()
    state, _ = execute(create_run_dir(config, None, None), config)
    return state, run_dir, time.time() - start


def curve(state: Any) -> list[float]:
    """Best validation mean after each result, in result order."""
    best, out = -np.inf, []
    for r in state.results.values():
        if r["status"] == "ok":
            best = max(best, float(np.mean(r["objectives"])))
        out.append(best)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--limit", type=int, default=50, help="validation prompts per task during the search")
    parser.add_argument("--methods", nargs="*", default=None, help="substrings of method names to run")
    parser.add_argument("--out", type=Path, default=Path("/tmp/search_compare_runs"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import ray
    import torch

    from evomerge.evaluate.lmeval import LMEvalSpec
    from evomerge.merge.engine import merge_to_dir
    from evomerge.merge.mixture import candidate_recipe
    from evomerge.runtime.worker import MergeBackendSpec
    from evomerge.zoo import build_zoo

    torch.set_num_threads(1)
    paths = build_zoo(ROOT / "zoo", seed=0)
    base = str(paths["base"])
    experts = [str(paths[f"expert_{s}"]) for s in SKILLS]
    args.out.mkdir(parents=True, exist_ok=True)
    hand = hand_recipes(base, experts)
    ps_model = args.out / "ps_ta"  # the PS model of PS+DFS: the hand-tuned TA merge (one evaluation)
    if not ps_model.exists():
        merge_to_dir(candidate_recipe(hand["TA (lambda 0.5)"]), ps_model)
    spec = MergeBackendSpec(base, (*experts, str(ps_model)), LMEvalSpec(tasks=("zoo", "zoo_search"), batch_size=128,
                                                                       seed=0), device="cpu")  # fmt: skip
    backend = spec.build()  # test (and validation) scores of any recipe, in this process

    def score(recipe: Any) -> tuple[float, float, dict[str, float]]:
        ev = backend.evaluate(candidate_recipe(recipe))
        return (float(np.mean([ev.scores[t] for t in VAL_TASKS])), float(np.mean([ev.scores[t] for t in TEST_TASKS])),
                {t: ev.scores[t] for t in TEST_TASKS})  # fmt: skip

    rows, curves = [], []
    for name, recipe in hand.items():
        val, test, per = score(recipe)
        rows.append({"method": name, "seed": "-", "candidates": 1, "val_mean": val, "test_mean": test, **per,
                     "seconds": 0.0})  # fmt: skip
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    searches = search_configs(base, experts, str(ps_model))
    chosen = [
        n for n in searches if args.methods is None or any(m.lower() in n.lower() for m in args.methods)
    ]
    for seed in args.seeds:
        for name in chosen:
            state, run_dir, seconds = run_search(
                name, searches[name], seed, args.budget, args.limit, args.out
            )
            ok = [r for r in state.results.values() if r["status"] == "ok"]
            best = max(ok, key=lambda r: float(np.mean(r["objectives"])))
            val, test, per = score(state.candidates[best["id"]].recipe.to_dict())
            rows.append({"method": name, "seed": seed, "candidates": len(state.results), "val_mean": val,
                         "test_mean": test, **per, "seconds": round(seconds, 1)})  # fmt: skip
            curves += [{"method": name, "seed": seed, "evaluations": i + 1, "best_val_mean": v}
                       for i, v in enumerate(curve(state))]  # fmt: skip
            print(f"{name:28s} seed {seed}: val {val:.3f} test {test:.3f} ({seconds:.0f} s)", flush=True)
            write(rows, curves)
    ray.shutdown()
    write(rows, curves)
    plot()


def write(rows: list[dict[str, Any]], curves: list[dict[str, Any]]) -> None:
    fields = ["method", "seed", "candidates", "val_mean", "test_mean", *TEST_TASKS, "seconds"]
    with open(HERE / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fields)
        w.writeheader()
        w.writerows({k: (f"{v:.4f}" if isinstance(v, float) and k != "seconds" else v) for k, v in r.items()}
                    for r in rows)  # fmt: skip
    with open(HERE / "curves.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["method", "seed", "evaluations", "best_val_mean"])
        w.writeheader()
        w.writerows(curves)
    summary = []
    for m in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == m]
        val, test = np.array([r["val_mean"] for r in mine]), np.array([r["test_mean"] for r in mine])
        summary.append({"method": m, "runs": len(mine), "val_mean": f"{val.mean():.4f}", "test_mean": f"{test.mean():.4f}",
                        "test_std": f"{test.std():.4f}", "test_min": f"{test.min():.4f}", "test_max": f"{test.max():.4f}"})  # fmt: skip
    with open(HERE / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(summary[0]))
        w.writeheader()
        w.writerows(summary)


def plot() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(HERE / "curves.csv") as f:
        curves = list(csv.DictReader(f))
    with open(HERE / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for m in dict.fromkeys(c["method"] for c in curves):
        seeds = sorted({c["seed"] for c in curves if c["method"] == m})
        runs = [
            [float(c["best_val_mean"]) for c in curves if c["method"] == m and c["seed"] == s] for s in seeds
        ]
        n = min(len(r) for r in runs)
        mean = np.mean([r[:n] for r in runs], axis=0)
        ax1.plot(np.arange(1, n + 1), mean, label=m)
    ax1.set_xlabel("evaluations")
    ax1.set_ylabel("best validation mean (zoo_search), mean over seeds")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    names = [s["method"] for s in summary]
    ax2.barh(names, [float(s["test_mean"]) for s in summary], xerr=[float(s["test_std"]) for s in summary])
    ax2.set_xlabel("test mean (zoo, 4 x 250 prompts) of each run's best, mean +/- std over seeds")
    ax2.invert_yaxis()
    ax2.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(HERE / "search_compare.png", dpi=110)


if __name__ == "__main__":
    main()
