"""MAP vs a dense grid vs NSGA-II on the zoo: three experts (rev, sort, up), three tasks, one coefficient per
task vector in [0, 1]. Every run goes through the real engine (`evomerge.runtime.run.execute`: Ray workers,
in-place merges, lm-eval on the zoo's validation tasks).

    .venv/bin/python experiments/map_front/run.py            # ~15 min on 2 cores
    .venv/bin/python experiments/map_front/run.py --levels 6 --seeds 0   # a quicker look

Writes, next to this file: `journals/<run>/` (the MAP runs' journal and config, replayed by the tests),
`curves.csv` (hypervolume and IGD+ after each evaluation, per run), `summary.csv`
(one row per run), `fronts.csv` (every evaluated point), `map_fit.json` (MAP's surrogate fit reports and
predicted-vs-measured errors) and `map_front.png`. Hypervolume: reference point 0 (accuracies); IGD+:
against the grid's non-dominated set. Run directories go to --out (default /tmp/map_front_runs).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SKILLS = ("rev", "sort", "up")
TASKS = [f"zoo_{s}_search" for s in SKILLS]


def register_grid() -> None:
    """A strategy that asks the points of a full grid of the box in order (the dense reference front)."""
    from evomerge.space.base import Space
    from evomerge.strategies import STRATEGIES, Candidate, Result, Strategy

    class Grid(Strategy):
        name = "experiment_grid"
        multi_objective = True

        def __init__(self, space: Space, *, n_objectives: int = 1, seed: int = 0,
                     weights: Sequence[float] | None = None, budget: int | None = None, levels: int = 8) -> None:  # fmt: skip
            super().__init__(space, n_objectives=n_objectives, seed=seed, weights=weights, budget=budget)
            axes = [np.linspace(lo, hi, levels) for lo, hi in zip(space.lower, space.upper)]
            self.points = np.array(list(itertools.product(*axes)))
            self.next = 0

        def _ask(self, n: int) -> list[Candidate]:
            out = []
            for _ in range(n):
                out.append(self.make_candidate(self.points[self.next % len(self.points)], phase="grid"))
                self.next += 1
            return out

        def _tell(self, results: list[Result]) -> None:
            pass

    if Grid.name not in STRATEGIES.names():
        STRATEGIES.add(Grid.name, Grid)


def run_config(name: str, strategy: str, options: dict[str, Any], budget: int, seed: int, out: Path) -> Any:
    from evomerge.config import parse_config
    from evomerge.zoo import build_zoo

    zoo = build_zoo(ROOT / "zoo", seed=0)  # the demo's cached zoo (configs/demo.yaml: models.zoo = zoo)
    data = {
        "name": name,
        "models": {"base": str(zoo["base"]), "sources": [str(zoo[f"expert_{s}"]) for s in SKILLS]},
        "space": {"type": "task_vector", "low": 0.0, "high": 1.0},
        "strategy": {"name": strategy, "options": options},
        "evaluator": {"type": "lmeval", "tasks": TASKS, "batch_size": 128},
        "budget": {"candidates": budget},
        "workers": {"count": 2, "torch_threads": 1, "scheduling": "ordered"},
        "tracking": {"enabled": False},
        "seed": seed,
        "output": str(out / name),
    }
    return parse_config(data, name)


def execute_run(cfg: Any) -> tuple[Any, float]:
    from evomerge.runtime.run import create_run_dir, execute

    run_dir = Path(cfg.output)
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.time()
    state, _ = execute(create_run_dir(cfg, None, None), cfg)
    return state, time.time() - start


def points_in_order(state: Any) -> tuple[list[str], np.ndarray]:
    """Successful results in the order they arrived (the x axis of the curves) and their objectives."""
    ok = [r for r in state.results.values() if r["status"] == "ok"]
    return [r["id"] for r in ok], np.array([r["objectives"] for r in ok])


def curves(points: np.ndarray, ref_front: np.ndarray, hv_ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hypervolume and IGD+ of the first i evaluations, i = 1..n."""
    from evomerge.pareto import hypervolume_history, igd_plus

    hv = hypervolume_history(points, hv_ref)
    igd = np.array([igd_plus(points[: i + 1], ref_front) for i in range(len(points))])
    return hv, igd


def map_fit_summary(state: Any) -> dict[str, Any]:
    """Per front round: the fit report and the mean |predicted - measured| of its front points."""
    rounds: dict[int, dict[str, Any]] = {}
    for c in state.candidates.values():
        if c.info.get("phase") != "front" or state.results.get(c.id, {}).get("status") != "ok":
            continue
        r = rounds.setdefault(c.generation, {"fit": c.info["fit"], "abs_errors": []})
        pred = np.array([c.info["predicted"][str(j)] for j in range(len(TASKS))])
        r["abs_errors"].append(np.abs(pred - np.array(state.results[c.id]["objectives"])).tolist())
    return {
        str(g): {
            "fit": r["fit"],
            "points": len(r["abs_errors"]),
            "mean_abs_error": np.mean(r["abs_errors"], axis=0).round(4).tolist(),
        }  # fmt: skip
        for g, r in sorted(rounds.items())
    }


def plot(
    rows: list[dict[str, Any]], grid_n: int, path: Path, grid_front: np.ndarray, map_pts: np.ndarray
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    colors = {"map": "C0", "map_spread": "C4", "map_bayes": "C2", "nsga2": "C1", "grid": "k"}
    for (strategy, seed), group in itertools.groupby(rows, key=lambda r: (r["strategy"], r["seed"])):
        g = list(group)
        n = [r["evaluations"] for r in g]
        label = strategy if seed == 0 else None
        axes[0].plot(n, [r["hv_ratio"] for r in g], color=colors[strategy], alpha=0.8, label=label)
        axes[1].plot(n, [r["igd_plus"] for r in g], color=colors[strategy], alpha=0.8, label=label)
    for ax in axes[:2]:
        ax.axvline(0.2 * grid_n, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("evaluations")
        ax.legend()
    axes[0].axhline(0.95, color="grey", ls="--", lw=1)
    axes[0].set_ylabel("hypervolume / grid front's hypervolume")
    axes[0].set_ylim(0, 1.05)
    axes[1].set_ylabel("IGD+ to the grid front")
    axes[1].set_yscale("log")
    axes[2].scatter(grid_front[:, 0], grid_front[:, 1], c=grid_front[:, 2], marker="s", cmap="viridis", s=30,
                    label="grid front (colour: up)")  # fmt: skip
    axes[2].scatter(
        map_pts[:, 0], map_pts[:, 1], facecolors="none", edgecolors="C3", s=40, label="MAP front (seed 0)"
    )
    axes[2].set_xlabel("zoo_rev_search")
    axes[2].set_ylabel("zoo_sort_search")
    axes[2].legend(fontsize=8)
    fig.suptitle(f"MAP vs grid ({grid_n} evaluations) vs NSGA-II on the zoo: 3 task vectors, 3 tasks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", type=int, default=8, help="grid levels per coefficient (8: 512 points)")
    parser.add_argument(
        "--budget", type=int, default=100, help="evaluations of MAP, Bayesian MAP and NSGA-II"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("/tmp/map_front_runs"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("evomerge.strategies.map").setLevel(logging.INFO)

    import ray
    import torch

    from evomerge.pareto import hypervolume, non_dominated

    torch.set_num_threads(1)
    register_grid()
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    hv_ref = np.zeros(len(TASKS))
    grid_n = args.levels ** len(TASKS)
    runs: list[tuple[str, int, dict[str, Any], int]] = [("grid", 0, {"levels": args.levels}, grid_n)]
    for seed in args.seeds:
        runs += [("map", seed, {}, args.budget), ("map_spread", seed, {"select": "spread"}, args.budget),
                 ("map_bayes", seed, {"bayes_rounds": 2, "bayes_points": 10}, args.budget),
                 ("nsga2", seed, {"population_size": 20}, args.budget)]  # fmt: skip
    strategy_of = {
        "grid": "experiment_grid",
        "map": "map",
        "map_spread": "map",
        "map_bayes": "map",
        "nsga2": "nsga2",
    }
    results: dict[tuple[str, int], dict[str, Any]] = {}
    for label, seed, options, budget in runs:
        cfg = run_config(f"{label}_s{seed}", strategy_of[label], options, budget, seed, args.out)
        state, seconds = execute_run(cfg)
        ids, pts = points_in_order(state)
        results[(label, seed)] = {"state": state, "ids": ids, "points": pts, "seconds": seconds}
        if label.startswith("map"):  # kept: tests/strategies/test_map_replay.py replays each in a fresh process
            keep = HERE / "journals" / cfg.name
            keep.mkdir(parents=True, exist_ok=True)
            for file in ("config.yaml", "journal.jsonl"):
                shutil.copy(Path(cfg.output) / file, keep / file)
        print(f"{label} seed {seed}: {len(pts)} evaluations in {seconds:.0f} s", flush=True)
    ray.shutdown()

    grid_pts = results[("grid", 0)]["points"]
    grid_front = grid_pts[non_dominated(grid_pts)]
    grid_hv = hypervolume(grid_front, hv_ref)
    rows, summary, every = [], [], []
    for (label, seed), r in results.items():
        hv, igd = curves(r["points"], grid_front, hv_ref)
        for i in range(len(hv)):
            rows.append({"strategy": label, "seed": seed, "evaluations": i + 1, "hypervolume": round(float(hv[i]), 6),
                         "hv_ratio": round(float(hv[i] / grid_hv), 4), "igd_plus": round(float(igd[i]), 5)})  # fmt: skip
        reach = np.flatnonzero(hv >= 0.95 * grid_hv)
        summary.append({
            "strategy": label, "seed": seed, "evaluations": len(hv), "fraction_of_grid": round(len(hv) / grid_n, 3),
            "hv_ratio": round(float(hv[-1] / grid_hv), 4), "igd_plus": round(float(igd[-1]), 5),
            "evals_to_95pct_hv": int(reach[0] + 1) if len(reach) else "",
            "front_size": int(non_dominated(r["points"]).sum()), "wall_s": round(r["seconds"], 1),
        })  # fmt: skip
        state = r["state"]
        for cid, p in zip(r["ids"], r["points"]):
            every.append({"strategy": label, "seed": seed, "id": cid,
                          "phase": state.candidates[cid].info.get("phase", ""),
                          **{f"c_{s}": round(float(v), 4) for s, v in zip(SKILLS, state.candidates[cid].genome)},
                          **{t: round(float(v), 4) for t, v in zip(TASKS, p)}})  # fmt: skip
    for name, table in (("curves.csv", rows), ("summary.csv", summary), ("fronts.csv", every)):
        with open(HERE / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(table[0]))
            w.writeheader()
            w.writerows(table)
    fits = {
        f"{label}_s{seed}": map_fit_summary(r["state"])
        for (label, seed), r in results.items()
        if "map" in label
    }
    (HERE / "map_fit.json").write_text(json.dumps({"grid_hypervolume": grid_hv, "runs": fits}, indent=1))
    map_pts = results[("map", args.seeds[0])]["points"]
    plot(rows, grid_n, HERE / "map_front.png", grid_front, map_pts[non_dominated(map_pts)])
    print(f"grid: {grid_n} points, front {len(grid_front)}, hypervolume {grid_hv:.4f}")
    for s in summary:
        print(s)


if __name__ == "__main__":
    main()
