"""Curves and the results table of the M2N2 digits experiment, from `curves.csv` (written by run.py).

python experiments/m2n2_digits/plot.py      # -> scratch.png, pretrained.png, results.csv (mean +- std)
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent


def load(path: Path) -> dict[tuple[str, str], dict[int, list[tuple[int, float, float]]]]:
    runs: dict[tuple[str, str], dict[int, list[tuple[int, float, float]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    with path.open() as f:
        for row in csv.DictReader(f):
            runs[row["part"], row["method"]][int(row["seed"])].append(
                (int(row["forward_passes"]), float(row["train_acc"]), float(row["test_acc"]))
            )
    return runs


def final(curve: list[tuple[int, float, float]]) -> tuple[int, float, float]:
    return max(curve)


def mean_curve(
    seeds: dict[int, list[tuple[int, float, float]]], column: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """(passes, mean over seeds) of one column (1 train, 2 test), each seed's curve interpolated on the union
    of their pass counts."""
    grid = np.unique(np.concatenate([[x[0] for x in c] for c in seeds.values()]))
    ys = np.array(
        [np.interp(grid, [x[0] for x in sorted(c)], [x[column] for x in sorted(c)]) for c in seeds.values()]
    )
    return grid, ys.mean(0)


def sample_efficiency(runs, part: str, method: str, against: str) -> dict[str, float] | None:
    """Passes `method` needs for its mean test curve to reach `against`'s mean final test accuracy (the
    paper's sample-efficiency claim), and that as a fraction of `against`'s budget (nan: never reached)."""
    if (part, method) not in runs or (part, against) not in runs:
        return None
    target = float(np.mean([final(c)[2] for c in runs[part, against].values()]))
    budget = max(final(c)[0] for c in runs[part, against].values())
    grid, mean = mean_curve(runs[part, method])
    hit = np.flatnonzero(mean >= target)
    passes = float(grid[hit[0]]) if len(hit) else float("nan")
    return {"target": target, "budget": budget, "passes": passes, "best_mean": float(mean.max())}


def main() -> None:
    runs = load(HERE / "curves.csv")
    rows = []
    for (part, method), seeds in sorted(runs.items()):
        ends = np.array([final(c) for c in seeds.values()])
        rows.append({
            "part": part, "method": method, "seeds": len(seeds), "forward_passes": int(ends[:, 0].max()),
            "train_mean": ends[:, 1].mean(), "train_std": ends[:, 1].std(),
            "test_mean": ends[:, 2].mean(), "test_std": ends[:, 2].std(), "test_median": float(np.median(ends[:, 2])),
        })  # fmt: skip
    with (HERE / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in r.items()})
    for part in sorted({p for p, _ in runs}):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (p, method), seeds in sorted(runs.items()):
            if p != part or method == "slerp_grid":
                continue
            grid = np.unique(np.concatenate([[x[0] for x in c] for c in seeds.values()]))
            ys = np.array([np.interp(grid, [x[0] for x in sorted(c)], [x[2] for x in sorted(c)])
                           for c in seeds.values()])  # fmt: skip
            ax.plot(grid, ys.mean(0), label=f"{method} ({len(seeds)} seeds)")
            ax.fill_between(grid, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), alpha=0.2)
        if (part, "slerp_grid") in runs:
            best = np.mean([c[0][2] for c in runs[part, "slerp_grid"].values()])
            ax.axhline(best, ls="--", c="gray", label="best SLERP of the pair (grid)")
        ax.set_xlabel("forward passes (child evaluations)")
        ax.set_ylabel("test accuracy of the archive's best-train member")
        ax.set_title(
            f"M2N2 on sklearn digits: {'from scratch' if part == 'scratch' else 'merging pre-trained halves'}"
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(HERE / f"{part}.png", dpi=120)
    for r in rows:
        print(f"{r['part']:10s} {r['method']:18s} n={r['seeds']} fp={r['forward_passes']:6d} "
              f"train {r['train_mean']:.3f}±{r['train_std']:.3f}  test {r['test_mean']:.3f}±{r['test_std']:.3f} "
              f"(median {r['test_median']:.3f})")  # fmt: skip
    for against in ("cma_es_iso", "cma_es_sep"):
        eff = sample_efficiency(runs, "scratch", "m2n2", against)
        if eff:
            print(f"m2n2's mean test curve reaches {against}'s mean final {eff['target']:.3f} at "
                  f"{eff['passes']:.0f} passes ({eff['passes'] / eff['budget']:.0%} of {eff['budget']}; "
                  f"its best mean {eff['best_mean']:.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
