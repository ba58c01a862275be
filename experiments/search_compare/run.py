"""Search strategies on the zoo at the budgets population methods are built for: hand-tuned TA / TIES /
DARE-TIES (one evaluation each) vs CMA-ES over task-vector coefficients (parameter space) vs M2N2 vs GENOME+ vs
Evo-Merging [ours] vs PS+DFS (data-flow search over {a task-arithmetic merge, the experts}). Every search goes
through the real engine (`evomerge.runtime.run.execute`: Ray workers, in-place merges, lm-eval on `zoo_search`,
the validation split, 4 x 150 prompts). At each budget in --checkpoints (default 40, 100, 200 candidates) the
best candidate so far (by validation mean, among candidates scored on every search item) is scored on the
held-out test split (`zoo`, 4 x 250 prompts) in this process.

    .venv/bin/python experiments/search_compare/run.py --seeds 0 1 2      # what the committed CSVs hold

Search fitness, with the cheap-fitness settings where they apply: racing (`fidelity: {racing: {rungs: [16, 50]}}`:
a candidate is scored on 16, then 50, then all 150 items per task, and stops at a rung where successive halving
or the Wilcoxon test against the incumbent says it cannot win). M2N2 cannot race (its resource competition
needs every member's score on every item), so it is scored on the first 50 items per task (`evaluator.limit`).

Writes, next to this file: `results.csv` (one row per method, seed and budget: the best's validation and test
scores, the forward passes spent so far), `curves.csv` (best validation mean after each evaluation),
`summary.csv` (mean and std over seeds per budget) and `search_compare.png`. Rows of methods and seeds not run
again are kept, so seeds can be run one at a time. Run directories go to --out (default
/tmp/search_compare_runs). The 40-candidate, 2-seed results of the first version are kept as `*_40.csv`.
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
RACING = {"racing": {"rungs": [16, 50]}}
M2N2_LIMIT = 50  # items per task M2N2 is scored on (it cannot race)


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
            "fidelity": RACING,
        },
        "M2N2": {
            "models": {"base": base, "sources": experts},
            "space": {"type": "model", "chunk": "tensor", "delta": True},
            "strategy": {"name": "m2n2", "options": {"pop_size": 12}},
            "evaluator": {**LMEVAL, "limit": M2N2_LIMIT},
        },
        "GENOME+": {
            "models": {"base": base, "sources": experts},
            "space": {"type": "model", "chunk": "tensor", "delta": True},
            "strategy": {"name": "genome", "options": {"pop_size": 10, "succession": True, "sigma": 0.1}},
            "fidelity": RACING,
        },
        "Evo-Merging [ours]": {
            "models": {"base": base, "sources": experts},
            "space": {"type": "evo_merging", "init_density": 0.5},
            "strategy": {"name": "cma", "options": {"popsize": 8, "sigma": 0.2}},
            "fidelity": RACING,
        },
        "PS+DFS (TA + data flow)": {
            "models": {"base": base, "sources": [ps_model, *experts]},
            "space": {"type": "dataflow", "repeats": 2, "scaling": "slot"},
            "strategy": {"name": "cma", "options": {"popsize": 8, "sigma": 0.2}},
            "fidelity": RACING,
        },
    }


def run_search(name: str, spec: dict[str, Any], seed: int, budget: int, out: Path) -> tuple[Any, Path, float]:
    from evomerge.config import parse_config
    from evomerge.runtime.run import create_run_dir, execute

    run_dir = out / f"{name.split()[0].lower().replace('+', 'p')}_{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    data = {"name": run_dir.name, "evaluator": LMEVAL, **spec, "budget": {"candidates": budget},
            "workers": {"count": 2, "torch_threads": 1}, "tracking": {"enabled": False}, "device": "cpu",
            "seed": seed, "output": str(run_dir)}  # fmt: skip
    config = parse_config(data, name)
    start = time.time()
    state, _ = execute(create_run_dir(config, None, None), config)
    return state, run_dir, time.time() - start


def in_result_order(run_dir: Path) -> list[tuple[dict[str, Any], int]]:
    """(result, forward passes spent up to and with it) for every `result` event, in journal order: racing's
    stopped candidates count what they cost, and only candidates scored on every item compete for the best."""
    from evomerge.journal import read_journal

    spent, out = 0, []
    for e in read_journal(run_dir / "journal.jsonl", repair=False):
        if e["event"] in ("fidelity", "result"):
            spent += int(e.get("forward_passes", 0))
        if e["event"] == "result":
            out.append((e, spent))
    return out


def best_by(results: list[tuple[dict[str, Any], int]]) -> list[str | None]:
    """The id of the best exact candidate after each result (None while there is none)."""
    from evomerge.fidelity.plan import is_exact

    best, best_val, out = None, -np.inf, []
    for r, _ in results:
        if r["status"] == "ok" and is_exact(r) and float(np.mean(r["objectives"])) > best_val:
            best, best_val = r["id"], float(np.mean(r["objectives"]))
        out.append(best)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[40, 100, 200],
                        help="budgets (candidates) at which the best so far is scored on the test split; the last is the run's")  # fmt: skip
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

    def score(recipe: Any) -> dict[str, Any]:
        ev = backend.evaluate(candidate_recipe(recipe))
        return {"val_mean": float(np.mean([ev.scores[t] for t in VAL_TASKS])),
                "test_mean": float(np.mean([ev.scores[t] for t in TEST_TASKS])), **{t: ev.scores[t] for t in TEST_TASKS}}  # fmt: skip

    rows = [{"method": name, "seed": "-", "budget": 1, "candidates": 1, "forward_passes": 0, **score(recipe),
             "seconds": 0.0} for name, recipe in hand.items()]  # fmt: skip
    curves: list[dict[str, Any]] = []
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    searches = search_configs(base, experts, str(ps_model))
    chosen = [
        n for n in searches if args.methods is None or any(m.lower() in n.lower() for m in args.methods)
    ]
    for seed in args.seeds:
        for name in chosen:
            state, run_dir, seconds = run_search(name, searches[name], seed, max(args.checkpoints), args.out)
            results = in_result_order(run_dir)
            best = best_by(results)
            for budget in args.checkpoints:
                n = min(budget, len(results))
                if best[n - 1] is None:
                    continue
                scores = score(state.candidates[best[n - 1]].recipe.to_dict())
                rows.append({"method": name, "seed": seed, "budget": budget, "candidates": n,
                             "forward_passes": results[n - 1][1], **scores, "seconds": round(seconds, 1)})  # fmt: skip
                print(f"{name:28s} seed {seed} at {budget:4d}: val {scores['val_mean']:.3f} test "
                      f"{scores['test_mean']:.3f} ({seconds:.0f} s)", flush=True)  # fmt: skip
            vals = {r["id"]: float(np.mean(r["objectives"])) for r, _ in results if r["status"] == "ok"}
            curves += [{"method": name, "seed": seed, "evaluations": i + 1, "forward_passes": spent,
                        "best_val_mean": round(vals[b], 4) if b else ""}
                       for i, ((_, spent), b) in enumerate(zip(results, best))]  # fmt: skip
            write(rows, curves)
    ray.shutdown()
    write(rows, curves)
    plot()


RESULT_FIELDS = ["method", "seed", "budget", "candidates", "forward_passes", "val_mean", "test_mean", *TEST_TASKS,
                 "seconds"]  # fmt: skip
CURVE_FIELDS = ["method", "seed", "evaluations", "forward_passes", "best_val_mean"]


def merged(path: Path, new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`new` plus the rows of `path` for the (method, seed) pairs `new` does not hold: seeds run one at a time
    add up."""
    ran = {(str(r["method"]), str(r["seed"])) for r in new}
    old = []
    if path.exists():
        with path.open() as f:
            old = [r for r in csv.DictReader(f) if (r["method"], r["seed"]) not in ran]
    return old + [
        {k: (f"{v:.4f}" if isinstance(v, float) and k != "seconds" else str(v)) for k, v in r.items()}
        for r in new
    ]


def write(rows: list[dict[str, Any]], curves: list[dict[str, Any]]) -> None:
    rows, curves = merged(HERE / "results.csv", rows), merged(HERE / "curves.csv", curves)
    for name, fields, data in (("results.csv", RESULT_FIELDS, rows), ("curves.csv", CURVE_FIELDS, curves)):
        with open(HERE / name, "w", newline="") as f:
            w = csv.DictWriter(f, fields)
            w.writeheader()
            w.writerows(sorted(data, key=lambda r: (str(r["seed"]) != "-", r["method"], str(r["seed"]))))
    summary = []
    for m, budget in dict.fromkeys((r["method"], r["budget"]) for r in rows):
        mine = [r for r in rows if r["method"] == m and r["budget"] == budget]
        test = np.array([float(r["test_mean"]) for r in mine])
        summary.append({"method": m, "budget": budget, "runs": len(mine),
                        "forward_passes": f"{np.mean([float(r['forward_passes']) for r in mine]):.0f}",
                        "val_mean": f"{np.mean([float(r['val_mean']) for r in mine]):.4f}",
                        "test_mean": f"{test.mean():.4f}", "test_std": f"{test.std():.4f}",
                        "test_min": f"{test.min():.4f}", "test_max": f"{test.max():.4f}"})  # fmt: skip
    with open(HERE / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(summary[0]))
        w.writeheader()
        w.writerows(sorted(summary, key=lambda r: (r["method"], int(r["budget"]))))


def plot() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(HERE / "curves.csv") as f:
        curves = list(csv.DictReader(f))
    with open(HERE / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    methods = list(dict.fromkeys(c["method"] for c in curves))
    for i, m in enumerate(methods):
        seeds = sorted({c["seed"] for c in curves if c["method"] == m})
        runs = [[float(c["best_val_mean"] or "nan") for c in curves if c["method"] == m and c["seed"] == s]
                for s in seeds]  # fmt: skip
        n = min(len(r) for r in runs)
        ax1.plot(np.arange(1, n + 1), np.mean([r[:n] for r in runs], axis=0), label=m, color=f"C{i}")
        mine = [s for s in summary if s["method"] == m]
        ax2.errorbar([int(s["budget"]) for s in mine], [float(s["test_mean"]) for s in mine],
                     yerr=[float(s["test_std"]) for s in mine], marker="o", capsize=3, label=m, color=f"C{i}")  # fmt: skip
    for s in summary:
        if s["budget"] == "1":
            ax2.axhline(float(s["test_mean"]), ls=":", lw=1, color="grey")
            ax2.text(0.01, float(s["test_mean"]), s["method"], fontsize=7, color="grey", va="bottom",
                     transform=ax2.get_yaxis_transform())  # fmt: skip
    ax1.set_xlabel("candidates")
    ax1.set_ylabel("best search fitness so far (zoo_search), mean over seeds")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    ax2.set_xscale("log")
    ax2.set_xlabel("budget (candidates)")
    ax2.set_ylabel("test mean (zoo, 4 x 250) of the best so far, mean +/- std over seeds")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(HERE / "search_compare.png", dpi=110)


if __name__ == "__main__":
    main()
