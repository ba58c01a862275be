"""(b) Search efficiency: full evaluation vs racing vs a subset estimator, held-out test score against forward
passes spent.

Every run goes through the real engine (`evomerge.runtime.run.execute`: Ray, 2 workers, in-place merges, lm-eval)
on the zoo's search split (`zoo_search1k`, 4 tasks x 1,000 items), space = one task-vector coefficient per expert
in [0, 1.2]. Strategies: CMA-ES on the mean of the 4 tasks (the demo) and NSGA-II on the 4 tasks. Modes:

- `full`: every candidate on all 4,000 items;
- `racing`: `fidelity: {racing: {rungs: [32, 96]}}` (successive halving, eta 3, + Wilcoxon vs the incumbent);
- `estimate`: `fidelity: {estimator: {name: ..., items: ...}}` (the best estimator of part (a)).

Reduced-fidelity runs get `--scale` times the candidates of the full run (the point is more candidates for the
same passes) and re-score their best (CMA) or front (NSGA-II) on every item at the end. The best-so-far curve
follows what the search itself reports (racing: candidates scored on every item; estimate: estimates; after the
final re-scoring: exact); each best-so-far candidate is scored on the held-out test split (`zoo`, 4 x 250 items,
never seen by any search) in this process.

    .venv/bin/python experiments/cheap_fitness/search.py --seeds 0 1 2      # what the committed CSVs hold

Writes next to this file: search_runs.csv (one row per strategy, mode, seed), search_curves.csv (test score of the
best so far vs forward passes), search_summary.csv and search.png. Run dirs go to --out.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SEARCH_GROUP = "zoo_search1k"
STRATEGIES = {
    "cma": {"name": "cma", "options": {"popsize": 8, "sigma": 0.25}},
    "nsga2": {"name": "nsga2", "options": {"population_size": 16}},
}


def run_config(zoo: str, strategy: str, mode: str, seed: int, candidates: int, estimator: dict[str, Any],
               out: Path) -> dict[str, Any]:  # fmt: skip
    fidelity: dict[str, Any] = {"full": {}, "racing": {"racing": {"rungs": [32, 96]}},
                                "estimate": {"estimator": estimator}}[mode]  # fmt: skip
    return {
        "name": f"{strategy}-{mode}-{seed}",
        "models": {"zoo": zoo},
        "space": {"type": "task_vector", "low": 0.0, "high": 1.2},
        "strategy": STRATEGIES[strategy],
        "evaluator": {"type": "lmeval", "tasks": [SEARCH_GROUP], "batch_size": 128},
        "budget": {"candidates": candidates},
        "workers": {"count": 2},
        "tracking": {"enabled": False},
        "fidelity": fidelity,
        "seed": seed,
        "output": str(out),
    }


def best_so_far(events: list[dict[str, Any]], mode: str) -> list[tuple[int, str]]:
    """(forward passes spent, id of the best candidate by mean reported score) after each event that changes it.
    Racing: only candidates scored on every item compete (a stopped candidate's prefix mean is not comparable);
    estimate: every estimate; a `rescore` replaces a candidate's score by its exact one."""
    spent, scores, out = 0, {}, []
    for e in events:
        spent += int(e.get("forward_passes", 0)) if e["event"] in ("fidelity", "result", "rescore") else 0
        if e["event"] == "result" and e["status"] == "ok":
            exact = e.get("fidelity", {}).get("exact", True)
            if mode != "racing" or exact:
                scores[e["id"]] = float(np.mean(list(e["scores"].values())))
        elif e["event"] == "rescore":
            scores[e["id"]] = float(np.mean(list(e["scores"].values())))
        else:
            continue
        if scores:
            best = max(scores, key=lambda c: scores[c])
            if not out or out[-1][1] != best:
                out.append((spent, best))
    out.append((spent, out[-1][1]) if out else (spent, ""))
    return out


class TestScorer:
    """Held-out test scores (`zoo`: 4 x 250 prompts) of recipes, merged in place into one resident model."""

    def __init__(self, zoo_paths: dict[str, Path]) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from evomerge.evaluate.lmeval import LMEvalSpec
        from evomerge.merge.engine import ResidentPool

        torch.set_num_threads(2)
        base = str(zoo_paths["base"])
        experts = [str(p) for n, p in sorted(zoo_paths.items()) if n != "base"]
        self.evaluator = LMEvalSpec(tasks=("zoo",), batch_size=128).build()
        self.tokenizer = AutoTokenizer.from_pretrained(base)
        self.model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        self.pool = ResidentPool.from_refs([*experts, base])
        self.cache: dict[str, dict[str, float]] = {}

    def __call__(self, recipe: dict[str, Any]) -> dict[str, float]:
        from evomerge.merge.engine import apply_in_place
        from evomerge.merge.mixture import candidate_recipe

        key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
        if key not in self.cache:
            apply_in_place(candidate_recipe(recipe), self.pool, self.model)
            self.cache[key] = self.evaluator.evaluate(self.model, self.tokenizer).scores
        return self.cache[key]


def test_hypervolume(points: np.ndarray) -> float:
    import moocore

    return float(moocore.hypervolume(-points, ref=np.zeros(points.shape[1]))) if len(points) else 0.0


def analyse(
    run_dir: Path, strategy: str, mode: str, seed: int, tests: TestScorer, wall: float
) -> tuple[dict, list]:
    from evomerge.journal import final_results, read_journal

    events = read_journal(run_dir / "journal.jsonl", repair=False)
    recipes = {c["id"]: c["recipe"] for e in events if e["event"] == "ask" for c in e["candidates"]}
    curve = []
    for spent, cid in best_so_far(events, mode):
        curve.append({"strategy": strategy, "mode": mode, "seed": seed, "forward_passes": spent, "best": cid,
                      "test_mean": float(np.mean(list(tests(recipes[cid]).values())))})  # fmt: skip
    summary = json.loads((run_dir / "front.json").read_text())
    results = final_results(events)
    best = summary["best"]["id"]
    front = [r["id"] for r in summary["front"] if r.get("exact", True)]
    front_test = np.array([list(tests(recipes[c]).values()) for c in front]) if front else np.zeros((0, 4))
    passes = curve[-1]["forward_passes"]
    row = {
        "strategy": strategy, "mode": mode, "seed": seed, "candidates": len(results),
        "forward_passes": passes, "stopped_or_estimated": sum(not r.get("fidelity", {}).get("exact", True)
                                                              for r in results.values()),
        "rescored": sum(e["event"] == "rescore" for e in events), "best": best,
        "search_mean": float(np.mean(list(results[best]["scores"].values()))),
        "best_exact": bool(results[best].get("fidelity", {}).get("exact", True)),
        **{f"test_{t}": v for t, v in tests(recipes[best]).items()},
        "test_mean": float(np.mean(list(tests(recipes[best]).values()))),
        "front_exact": len(front), "front_test_hv": test_hypervolume(front_test), "seconds": round(wall, 1),
    }  # fmt: skip
    return row, curve


def reach_ratio(curves: list[dict], runs: list[dict], strategy: str, mode: str, seed: int) -> float | None:
    """Full evaluation's forward passes divided by the passes at which `mode` first reaches the full run's final
    held-out test mean (same strategy and seed); None when it never does."""
    full = next(r for r in runs if (r["strategy"], r["mode"], r["seed"]) == (strategy, "full", seed))
    for point in (c for c in curves if (c["strategy"], c["mode"], c["seed"]) == (strategy, mode, seed)):
        if point["test_mean"] >= full["test_mean"] - 1e-9:
            return full["forward_passes"] / max(point["forward_passes"], 1)
    return None


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def summarize(runs: list[dict], curves: list[dict]) -> list[dict]:
    out = []
    for strategy in dict.fromkeys(r["strategy"] for r in runs):
        for mode in dict.fromkeys(r["mode"] for r in runs):
            rows = [r for r in runs if (r["strategy"], r["mode"]) == (strategy, mode)]
            if not rows:
                continue
            ratios = [reach_ratio(curves, runs, strategy, mode, r["seed"]) for r in rows]
            full_passes = np.mean(
                [r["forward_passes"] for r in runs if (r["strategy"], r["mode"]) == (strategy, "full")]
            )
            out.append({
                "strategy": strategy, "mode": mode, "seeds": len(rows),
                "candidates": int(np.mean([r["candidates"] for r in rows])),
                "forward_passes": int(np.mean([r["forward_passes"] for r in rows])),
                "passes_vs_full": round(full_passes / np.mean([r["forward_passes"] for r in rows]), 2),
                "test_mean": round(float(np.mean([r["test_mean"] for r in rows])), 4),
                "test_mean_std": round(float(np.std([r["test_mean"] for r in rows])), 4),
                "front_test_hv": round(float(np.mean([r["front_test_hv"] for r in rows])), 4),
                "reach_full_test_ratio": ";".join("never" if x is None else f"{x:.1f}" for x in ratios),
            })  # fmt: skip
    return out


def plot(curves: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = list(dict.fromkeys(c["strategy"] for c in curves))
    fig, axes = plt.subplots(1, len(strategies), figsize=(6 * len(strategies), 4), squeeze=False)
    colors = {"full": "tab:gray", "racing": "tab:blue", "estimate": "tab:orange"}
    for ax, strategy in zip(axes[0], strategies):
        for mode, seed in dict.fromkeys((c["mode"], c["seed"]) for c in curves if c["strategy"] == strategy):
            pts = [c for c in curves if (c["strategy"], c["mode"], c["seed"]) == (strategy, mode, seed)]
            ax.step([p["forward_passes"] for p in pts], [p["test_mean"] for p in pts], where="post",
                    color=colors.get(mode), alpha=0.8, label=mode if seed == pts[0]["seed"] and
                    seed == min(c["seed"] for c in curves) else None)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("forward passes spent")
        ax.set_ylabel("held-out test mean of the best so far")
        ax.set_title(strategy)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--modes", nargs="+", default=["full", "racing", "estimate"])
    parser.add_argument("--candidates", type=int, default=48, help="candidates of a full-evaluation run")
    parser.add_argument("--scale", type=int, default=4, help="reduced-fidelity runs get scale x candidates")
    parser.add_argument("--estimator", default="mean")
    parser.add_argument("--items", type=int, default=50, help="estimator subset size per task")
    parser.add_argument("--zoo", default=str(ROOT / "zoo"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/cheap_fitness_search"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from evomerge.config import parse_config
    from evomerge.runtime.run import create_run_dir, execute
    from evomerge.zoo import build_zoo

    zoo_paths = build_zoo(args.zoo)
    runs, curves = [], []
    tests = None
    estimator = {"name": args.estimator, "items": args.items}
    for strategy in args.strategies:
        for seed in args.seeds:
            for mode in args.modes:
                out = args.out / f"{strategy}-{mode}-{seed}"
                if not (out / "front.json").exists():
                    shutil.rmtree(out, ignore_errors=True)
                    n = args.candidates * (1 if mode == "full" else args.scale)
                    cfg = parse_config(
                        run_config(args.zoo, strategy, mode, seed, n, estimator, out), "search.py"
                    )
                    start = time.time()
                    execute(create_run_dir(cfg, None, None), cfg)
                    (out / "wall.txt").write_text(f"{time.time() - start:.1f}")
                tests = tests or TestScorer(zoo_paths)
                wall = float((out / "wall.txt").read_text()) if (out / "wall.txt").exists() else float("nan")
                row, curve = analyse(out, strategy, mode, seed, tests, wall)
                runs.append(row)
                curves += curve
                print(f"{strategy:6s} {mode:8s} seed {seed}: {row['candidates']} candidates, "
                      f"{row['forward_passes']} passes, test mean {row['test_mean']:.4f}", flush=True)  # fmt: skip
    write_csv(HERE / "search_runs.csv", runs)
    write_csv(HERE / "search_curves.csv", curves)
    summary = summarize(runs, curves)
    write_csv(HERE / "search_summary.csv", summary)
    plot(curves, HERE / "search.png")
    for row in summary:
        print(row)


if __name__ == "__main__":
    main()
