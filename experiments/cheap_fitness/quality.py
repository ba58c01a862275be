"""Estimator quality on the zoo: how well does a candidate's score on n items per task rank it, against its
score on all 4 x 1000 items of the zoo's search split (`zoo_search1k`)?

Data (all real evaluations; cached in ``--out``/data.npz, so the analysis re-runs without re-evaluating):

- held-out candidates, through the real engine (`evomerge.runtime.run.execute`: Ray, 2 workers, in-place
  task-vector merges, lm-eval on every item, no fidelity section): a `random` run of ``--random`` (200)
  candidates (seed 100) and a pilot `cma` run of ``--pilot`` (48) candidates (popsize 8, sigma 0.25,
  seed 101) whose top ``--elites`` (40) by mean score are the elites;
- reference rows: base + the 4 experts, evaluated in this process (the estimators' endpoints).

Analysis: for n in ``--n`` items per task and subset seeds ``--seeds``, every estimator of
`evomerge.fidelity.estimators` (``mean``, ``anchor``, ``irt``, ``gmp_irt`` at its default delta 0.5 and at
delta 0 = pure mp-IRT, ``merge_aware``) is built per task from the 5 reference rows; a candidate's estimate
is the mean over tasks of its per-task estimates (the demo's objective), its truth the mean over all 4000
items. Metrics per (estimator, n, seed, task, pool): Spearman, Kendall tau-b, top-10 recall, selection
regret, pairwise-decision agreement, MAE (definitions in `metrics`).

    .venv/bin/python experiments/cheap_fitness/quality.py            # evaluates once (cached), analyses
    .venv/bin/python experiments/cheap_fitness/quality.py --analyse  # analysis only, from the cache
    .venv/bin/python experiments/cheap_fitness/quality.py --reevaluate  # evaluate again (~11 min on 2 cores)

The cache is ``--out``/data.npz, else the committed `quality_data.npz` (110 KB: 0/1 per item) next to this
file, which every evaluation also writes.

Writes, next to this file: `quality.csv` (one row per estimator, n, seed, task, pool), `quality_summary.csv`
(mean and std over seeds), `quality_vs_mean.csv` (each estimator minus `mean` at equal n and seed) and
`quality.png` (Spearman and regret vs n on the mean objective, all candidates; Spearman among the elites).
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
SKILLS = ("rev", "sort", "up", "shift")  # the order of the zoo_search1k group
TASKS = tuple(f"zoo_{s}_search1k" for s in SKILLS)
REFERENCE = ("base", *(f"expert_{s}" for s in SKILLS))  # endpoints: base first, then the sources
LMEVAL = {"type": "lmeval", "tasks": ["zoo_search1k"], "batch_size": 128}
# (label, estimator name, delta): delta None = the estimator's default
ESTIMATORS = (
    ("mean", "mean", None),
    ("anchor", "anchor", None),
    ("irt", "irt", None),
    ("gmp_irt", "gmp_irt", None),
    ("gmp_irt_d0", "gmp_irt", 0.0),
    ("merge_aware", "merge_aware", None),
)
TOP_K = 10
COMMITTED = HERE / "quality_data.npz"  # the per-item matrices of the committed figures
METRICS = ("spearman", "kendall", "top10_recall", "regret", "pair_agreement", "mae")


# ----------------------------------------------------------------------------- data


def evaluate_references(paths: dict[str, Path]) -> tuple[np.ndarray, float]:
    """(models, tasks, items) per-item scores of base + experts, in this process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluate.lmeval import LMEvalSpec

    torch.set_num_threads(2)
    start = time.time()
    evaluator = LMEvalSpec(tasks=("zoo_search1k",), batch_size=128).build()
    rows = []
    for name in REFERENCE:
        tok = AutoTokenizer.from_pretrained(paths[name])
        model = AutoModelForCausalLM.from_pretrained(paths[name], dtype=torch.float32).eval()
        ev = evaluator.evaluate(model, tok)
        rows.append(np.stack([np.asarray(ev.samples[t], dtype=np.float64) for t in TASKS]))
        print(f"reference {name}: " + " ".join(f"{t} {ev.scores[t]:.3f}" for t in TASKS), flush=True)
    torch.set_num_threads(1)
    return np.stack(rows), time.time() - start


def run_search(name: str, strategy: dict[str, Any], budget: int, seed: int, paths: dict[str, Path],
               out: Path) -> tuple[list[np.ndarray], list[np.ndarray], float]:  # fmt: skip
    """(per-item scores (tasks, items), genome) of every ok candidate of one full-evaluation run."""
    from evomerge.config import parse_config
    from evomerge.evaluate.base import unpack_samples
    from evomerge.runtime.run import create_run_dir, execute

    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    data = {"name": name, "models": {"base": str(paths["base"]), "sources": [str(paths[f"expert_{s}"]) for s in SKILLS]},
            "space": {"type": "task_vector", "low": 0.0, "high": 1.2}, "strategy": strategy, "evaluator": LMEVAL,
            "budget": {"candidates": budget}, "workers": {"count": 2}, "tracking": {"enabled": False},
            "device": "cpu", "seed": seed, "output": str(run_dir)}  # fmt: skip
    config = parse_config(data, name)
    start = time.time()
    state, _ = execute(create_run_dir(config, None, None), config)
    seconds = time.time() - start
    scores, genomes = [], []
    for cid, r in state.results.items():
        if r["status"] != "ok":
            continue
        scores.append(np.stack([unpack_samples(r["samples"][t]) for t in TASKS]))
        genomes.append(np.asarray(state.candidates[cid].genome, dtype=np.float64))
    print(f"{name}: {len(scores)} ok of {len(state.results)} candidates, {seconds:.0f} s", flush=True)
    return scores, genomes, seconds


def collect(args: argparse.Namespace) -> dict[str, np.ndarray]:
    import ray

    from evomerge.zoo import build_zoo

    paths = build_zoo(ROOT / "zoo", seed=0)
    args.out.mkdir(parents=True, exist_ok=True)
    reference, ref_seconds = evaluate_references(paths)
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        rnd, rnd_g, rnd_s = run_search("random", {"name": "random"}, args.random, 100, paths, args.out)
        cma = {"name": "cma", "options": {"popsize": 8, "sigma": 0.25}}
        pil, pil_g, pil_s = run_search("pilot_cma", cma, args.pilot, 101, paths, args.out)
    finally:
        ray.shutdown()
    pilot_mean = np.array([s.mean() for s in pil])
    elites = np.argsort(-pilot_mean, kind="stable")[: args.elites]
    scores = np.stack(rnd + [pil[i] for i in elites])
    data = {
        "reference": reference.astype(np.uint8),
        "candidates": scores.astype(np.uint8),
        "genomes": np.stack(rnd_g + [pil_g[i] for i in elites]),
        "pool": np.array(["random"] * len(rnd) + ["elite"] * len(elites)),
        "pilot_means": pilot_mean,
        "seconds": np.array([ref_seconds, rnd_s, pil_s]),
    }
    assert np.array_equal(data["candidates"], scores) and np.array_equal(data["reference"], reference), (
        "per-item scores are not 0/1: store them as floats"
    )
    np.savez_compressed(args.out / "data.npz", **data)
    shutil.copyfile(args.out / "data.npz", COMMITTED)  # ~110 KB: committed, so the analysis re-runs anywhere
    return data


# ----------------------------------------------------------------------------- metrics


def top_membership(x: np.ndarray, k: int) -> np.ndarray:
    """Probability that each item is in the top k when ties at the cut are broken uniformly at random."""
    t = np.sort(x)[::-1][k - 1]
    above, at = x > t, x == t
    return above + at * (k - above.sum()) / at.sum()


def metrics(est: np.ndarray, true: np.ndarray, k: int = TOP_K) -> dict[str, float]:
    """Ranking quality of ``est`` against ``true`` (one value per candidate).

    Spearman (average ranks) and Kendall tau-b from scipy; a constant estimate has no ranking: 0, not NaN.
    Top-k recall, regret and pair agreement are expectations under random tie-breaking of the estimate:
    top-k recall = E|est top k & true top k| / k; regret = mean true score of the candidates tied at the
    estimated best, minus the true best (<= 0); pair agreement = share of pairs with distinct true scores
    that the estimate orders the same way (an estimated tie counts 1/2).
    """
    from scipy.stats import kendalltau, spearmanr

    k = min(k, len(est))
    constant = np.ptp(est) == 0 or np.ptp(true) == 0
    rho = 0.0 if constant else float(spearmanr(est, true).statistic)
    tau = 0.0 if constant else float(kendalltau(est, true).statistic)
    recall = float(top_membership(est, k) @ top_membership(true, k)) / k
    regret = float(true[est == est.max()].mean() - true.max())
    d_true, d_est = np.sign(true[:, None] - true[None, :]), np.sign(est[:, None] - est[None, :])
    upper = np.triu(np.ones_like(d_true, dtype=bool), 1) & (d_true != 0)
    agree = np.where(d_est[upper] == 0, 0.5, (d_est[upper] == d_true[upper]).astype(float))
    return {"spearman": rho, "kendall": tau, "top10_recall": recall, "regret": regret,
            "pair_agreement": float(agree.mean()), "mae": float(np.abs(est - true).mean())}  # fmt: skip


# ----------------------------------------------------------------------------- analysis


def estimates(
    data: dict[str, np.ndarray], ns: list[int], seeds: list[int]
) -> dict[tuple[str, int, int], np.ndarray]:
    """(label, n, seed) -> (candidates, tasks) estimated per-task scores."""
    from evomerge.fidelity.estimators import build_estimator

    ref = data["reference"].astype(np.float64)
    cand = data["candidates"].astype(np.float64)
    out = {}
    for n in ns:
        for seed in seeds:
            for label, name, delta in ESTIMATORS:
                start = time.time()
                per_task = []
                for t in range(len(TASKS)):
                    est = build_estimator(name, ref[:, t], n, seed, delta=delta)
                    per_task.append([est.estimate(row[t, est.items]) for row in cand])
                out[label, n, seed] = np.array(per_task).T
                print(f"  n {n:3d} seed {seed} {label:12s} {time.time() - start:5.1f} s", flush=True)
    return out


def analyse(data: dict[str, np.ndarray], ns: list[int], seeds: list[int]) -> None:
    cand = data["candidates"].astype(np.float64)
    true = cand.mean(axis=2)  # (candidates, tasks)
    pools = {"all": np.ones(len(cand), dtype=bool), "elites": data["pool"] == "elite"}
    est = estimates(data, ns, seeds)
    rows = []
    for (label, n, seed), e in est.items():
        for pool, mask in pools.items():
            cols = [("all", e[mask].mean(axis=1), true[mask].mean(axis=1))]
            cols += [(t, e[mask, i], true[mask, i]) for i, t in enumerate(TASKS)]
            for task, x, y in cols:
                rows.append(
                    {"estimator": label, "n": n, "seed": seed, "task": task, "pool": pool, **metrics(x, y)}
                )
    write_csv(HERE / "quality.csv", rows, digits=4)
    summary = summarise(rows)
    write_csv(HERE / "quality_summary.csv", summary, digits=4)
    vs_mean = compare_to_mean(rows, summary)
    write_csv(HERE / "quality_vs_mean.csv", vs_mean, digits=4)
    structure(data, est, ns, seeds)
    describe(data, summary, vs_mean)
    plot(summary)


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["estimator"], r["n"], r["task"], r["pool"]), []).append(r)
    out = []
    for (label, n, task, pool), rs in groups.items():
        row: dict[str, Any] = {"estimator": label, "n": n, "task": task, "pool": pool, "seeds": len(rs)}
        for m in METRICS:
            v = np.array([r[m] for r in rs])
            row[f"{m}_mean"], row[f"{m}_std"] = float(v.mean()), float(v.std())
        out.append(row)
    return out


def compare_to_mean(rows: list[dict[str, Any]], summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each estimator minus `mean` at equal n (paired by seed: same items for mean/irt/gmp/merge_aware).

    A win needs the mean difference to exceed the larger of the two estimators' seed spreads (std over
    seeds) and to have the same sign on every seed."""
    index = {(r["estimator"], r["n"], r["seed"], r["task"], r["pool"]): r for r in rows}
    spread = {(s["estimator"], s["n"], s["task"], s["pool"]): s for s in summary}
    out = []
    for s in summary:
        if s["estimator"] == "mean":
            continue
        key = (s["n"], s["task"], s["pool"])
        seeds = sorted(
            r["seed"]
            for r in rows
            if (r["estimator"], r["n"], r["task"], r["pool"]) == (s["estimator"], *key)
        )
        row: dict[str, Any] = {"estimator": s["estimator"], "n": s["n"], "task": s["task"], "pool": s["pool"]}
        for m in ("spearman", "regret", "top10_recall", "mae"):
            d = np.array([index[s["estimator"], s["n"], sd, s["task"], s["pool"]][m]
                          - index["mean", s["n"], sd, s["task"], s["pool"]][m] for sd in seeds])  # fmt: skip
            noise = max(s[f"{m}_std"], spread[("mean", *key)][f"{m}_std"])
            better = d.mean() < 0 if m == "mae" else d.mean() > 0
            consistent = np.all(d < 0) if m == "mae" else np.all(d > 0)
            worse = np.all(d > 0) if m == "mae" else np.all(d < 0)
            row[f"d_{m}"], row[f"d_{m}_seed_std"] = float(d.mean()), float(d.std())
            row[f"{m}_noise"] = float(noise)
            row[f"{m}_verdict"] = (
                "win" if better and consistent and abs(d.mean()) > noise
                else "loss" if not better and worse and abs(d.mean()) > noise
                else "tie"
            )  # fmt: skip
        out.append(row)
    return out


def structure(data: dict[str, np.ndarray], est: dict, ns: list[int], seeds: list[int]) -> None:
    """Print the endpoint structure: per task, the modal column pattern of the 5 reference rows and its share,
    and how far each merge-aware estimate is from the subset mean on the same items."""
    ref = data["reference"]
    print("\nendpoint structure (reference rows: " + ", ".join(REFERENCE) + ")")
    for t, task in enumerate(TASKS):
        pats, counts = np.unique(ref[:, t].T, axis=0, return_counts=True)
        top = np.argmax(counts)
        print(f"  {task}: {len(pats)} distinct patterns; modal {pats[top].tolist()} on {counts[top] / counts.sum():.1%}"
              f" of items; row means {ref[:, t].mean(axis=1).round(3).tolist()}")  # fmt: skip
    cand = data["candidates"].astype(np.float64)
    print("item alignment (reference in-process vs candidates from the workers): candidate accuracy on the")
    print("items the task's own expert fails, vs on the rest (lower = the item orders agree)")
    for t, task in enumerate(TASKS):
        fails = ref[np.argmax(ref[:, t].mean(axis=1)), t] == 0
        if fails.any():
            print(
                f"  {task}: {fails.sum()} items, {cand[:, t, fails].mean():.4f} vs {cand[:, t, ~fails].mean():.4f}"
            )
    print("|estimate - subset mean| on the mean objective (same items), mean / max over candidates and seeds")
    for label in ("irt", "gmp_irt", "gmp_irt_d0", "merge_aware"):
        parts = []
        for n in ns:
            d = np.concatenate([np.abs(est[label, n, s].mean(1) - est["mean", n, s].mean(1)) for s in seeds])
            parts.append(f"n {n}: {d.mean():.4f} / {d.max():.4f}")
        print(f"  {label:12s} " + "; ".join(parts))


def describe(
    data: dict[str, np.ndarray], summary: list[dict[str, Any]], vs_mean: list[dict[str, Any]]
) -> None:
    true = data["candidates"].astype(np.float64).mean(axis=(1, 2))
    for pool in ("random", "elite"):
        x = true[data["pool"] == pool]
        print(
            f"\n{pool}: {len(x)} candidates, true score min {x.min():.4f} median {np.median(x):.4f} max {x.max():.4f}"
        )
    print(
        f"all: {len(true)} candidates, min {true.min():.4f} median {np.median(true):.4f} max {true.max():.4f}"
    )
    print(f"seconds: references {data['seconds'][0]:.0f}, random run {data['seconds'][1]:.0f}, "
          f"pilot {data['seconds'][2]:.0f}")  # fmt: skip
    print(
        "\n| n | estimator | Spearman | Kendall | top-10 recall | regret | MAE |\n|---|---|---|---|---|---|---|"
    )
    for s in summary:
        if s["task"] == "all" and s["pool"] == "all":
            cells = [f"{s[f'{m}_mean']:.3f} ± {s[f'{m}_std']:.3f}" for m in ("spearman", "kendall", "top10_recall",
                                                                            "regret", "mae")]  # fmt: skip
            print(f"| {s['n']} | {s['estimator']} | " + " | ".join(cells) + " |")
    print("\nvs mean (objective, all candidates): d_spearman [verdict], d_regret [verdict]")
    for r in vs_mean:
        if r["task"] == "all" and r["pool"] == "all":
            print(f"  n {r['n']:3d} {r['estimator']:12s} {r['d_spearman']:+.3f} ({r['d_spearman_seed_std']:.3f}) "
                  f"[{r['spearman_verdict']}]  {r['d_regret']:+.4f} ({r['d_regret_seed_std']:.4f}) "
                  f"[{r['regret_verdict']}]")  # fmt: skip


def write_csv(path: Path, rows: list[dict[str, Any]], digits: int) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(
            {k: (round(v, digits) if isinstance(v, float) else v) for k, v in r.items()} for r in rows
        )


def plot(summary: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(s["estimator"] for s in summary))
    panels = (
        ("spearman", "all", "Spearman rho vs the full 4000-item score (240 candidates)"),
        ("regret", "all", "selection regret: true score of the estimated best - true best"),
        ("spearman", "elites", "Spearman rho among the 40 pilot elites only"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for ax, (m, pool, title) in zip(axes, panels):
        for i, label in enumerate(labels):
            mine = [s for s in summary if (s["estimator"], s["task"], s["pool"]) == (label, "all", pool)]
            mine.sort(key=lambda s: s["n"])
            x = np.array([s["n"] for s in mine]) * (1 + 0.025 * (i - len(labels) / 2))  # visible error bars
            y, err = [s[f"{m}_mean"] for s in mine], [s[f"{m}_std"] for s in mine]
            mean = label == "mean"
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label, lw=2.2 if mean else 1.2,
                        color="black" if mean else None)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xticks([10, 20, 50, 100], ["10", "20", "50", "100"])
        ax.set_xlabel("items per task (4 tasks)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Estimator quality on the zoo (mean objective; mean ± std over 3 subset seeds)", fontsize=11)
    fig.tight_layout()
    fig.savefig(HERE / "quality.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("/tmp/cheap_fitness_quality"))
    parser.add_argument("--analyse", action="store_true", help="analysis only, from --out/data.npz")
    parser.add_argument("--reevaluate", action="store_true", help="ignore the cache: evaluate again")
    parser.add_argument("--random", type=int, default=200, help="candidates of the random run")
    parser.add_argument("--pilot", type=int, default=48, help="candidates of the pilot CMA run")
    parser.add_argument("--elites", type=int, default=40, help="top pilot candidates kept")
    parser.add_argument("--n", type=int, nargs="+", default=[10, 20, 50, 100])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cache = args.out / "data.npz"
    if not cache.exists() and COMMITTED.exists():
        cache = COMMITTED
    if cache.exists() and not args.reevaluate:
        data = dict(np.load(cache))
        print(f"using cached {cache}")
    elif args.analyse:
        raise SystemExit(f"{cache} does not exist: run without --analyse first")
    else:
        data = collect(args)
    analyse(data, args.n, args.seeds)


if __name__ == "__main__":
    main()
