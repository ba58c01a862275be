"""The parent run's figures: pareto.png, progress.png and (3 or more objectives) parallel.png, drawn on
standalone Agg figures from a Record."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.tracking.names import mlflow_key
from evomerge.tracking.record import Record

MAX_PAIR_OBJECTIVES = 6  # pareto.png: one panel per pair of the first 6 objectives (15 panels)


def _figure(width: float, height: float) -> Any:
    """A standalone Agg figure: no pyplot, so no global figure registry and nothing to leak between figures."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)  # manual margins: constrained layout doubles the cost
    FigureCanvasAgg(fig)
    return fig


def plot_front(path: str | Path, record: Record) -> Path:
    """pareto.png: every successful candidate (coloured by evaluation order), the front circled, the knee
    starred; one panel per pair of objectives (the first 6), or score over evaluations for one objective."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    path = Path(path)
    names, dirs = record.names, ["max" if s > 0 else "min" for s in record.signs]
    n = len(record.ok)
    fig = _figure(6.0, 4.5)
    if n == 0:
        fig.text(0.5, 0.5, "no successful candidate yet", ha="center")
        fig.savefig(path)
        return path
    scores = record.scores_of(record.ok)
    front = np.array([c in record.front() for c in record.ok])
    order = np.arange(1, n + 1)
    knee = record.ok.index(record.knee())
    if len(names) == 1:
        pairs, xs = [(None, 0)], {None: order}
    else:
        pairs = list(combinations(range(min(len(names), MAX_PAIR_OBJECTIVES)), 2))
        xs = {i: scores[:, i] for i in range(len(names))}
    cols = min(3, len(pairs))
    rows = -(-len(pairs) // cols)
    fig.set_size_inches(5.2 * cols, 4.4 * rows)
    for k, (i, j) in enumerate(pairs):
        ax = fig.add_subplot(rows, cols, k + 1)
        x, y = xs[i], scores[:, j]
        ax.scatter(
            x[~front],
            y[~front],
            c=order[~front],
            cmap="viridis",
            vmin=1,
            vmax=max(n, 2),
            s=16,
            alpha=0.7,
            linewidths=0,
            label="candidate",
        )
        ax.scatter(
            x[front],
            y[front],
            c=order[front],
            cmap="viridis",
            vmin=1,
            vmax=max(n, 2),
            s=46,
            edgecolors="crimson",
            linewidths=1.6,
            label="Pareto front",
        )
        if len(names) == 2:
            line = np.argsort(x[front])
            ax.plot(x[front][line], y[front][line], color="crimson", lw=0.8, alpha=0.6)
        ax.scatter(
            [x[knee]],
            [y[knee]],
            marker="*",
            s=240,
            color="gold",
            edgecolors="black",
            linewidths=0.8,
            zorder=5,
            label=f"knee {record.ok[knee]}",
        )
        ax.set_xlabel("evaluation" if i is None else f"{names[i]} ({dirs[i]})")
        ax.set_ylabel(f"{names[j]} ({dirs[j]})")
        ax.grid(alpha=0.3)
        if k == 0:
            ax.legend(fontsize=8, loc="best")
    fig.subplots_adjust(
        left=0.1 / cols + 0.04,
        right=0.86 if cols == 1 else 0.95,
        bottom=0.12 / rows + 0.02,
        top=1 - 0.1 / rows,
        wspace=0.3,
        hspace=0.3,
    )
    fig.colorbar(
        ScalarMappable(Normalize(1, max(n, 2)), cmap="viridis"),
        ax=fig.axes,
        label="evaluation",
        shrink=0.8,
        pad=0.03,
    )
    fig.suptitle(f"Pareto front: {int(front.sum())} of {n} successful candidates")
    fig.savefig(path)
    return path


def plot_parallel(path: str | Path, record: Record) -> Path:
    """parallel.png: parallel coordinates of the objectives (each scaled to [0, 1] over all candidates,
    1 = best), the front in colour over the rest in grey."""
    from matplotlib.collections import LineCollection

    path = Path(path)
    m = len(record.names)
    fig = _figure(max(6.0, 1.7 * m), 4.8)
    ax = fig.add_subplot(1, 1, 1)
    if record.ok:
        obj = np.array(record.points)
        lo, hi = obj.min(axis=0), obj.max(axis=0)
        x = (obj - lo) / np.where(hi > lo, hi - lo, 1.0)
        front = np.array([c in record.front() for c in record.ok])
        axes_x = np.arange(m)
        rest = [np.column_stack([axes_x, row]) for row in x[~front]]
        ax.add_collection(LineCollection(rest, colors="0.7", linewidths=0.6, alpha=0.5))
        knee = record.knee()
        colors = [f"C{i % 10}" for i in range(int(front.sum()))]
        for color, i in zip(colors, np.flatnonzero(front)):
            wide = record.ok[i] == knee
            ax.plot(
                axes_x,
                x[i],
                color=color,
                lw=2.4 if wide else 1.2,
                label=record.ok[i] + (" (knee)" if wide else "") if front.sum() <= 12 or wide else None,
            )
        for k in range(m):
            worst, best = record.signs[k] * lo[k], record.signs[k] * hi[k]
            ax.text(k, -0.06, f"{worst:.3g}", ha="center", va="top", fontsize=8)
            ax.text(k, 1.06, f"{best:.3g}", ha="center", va="bottom", fontsize=8)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_xlim(-0.2, m - 0.8)
    ax.set_ylim(-0.15, 1.15)
    ax.set_xticks(
        range(m), [f"{n}\n({'max' if s > 0 else 'min'})" for n, s in zip(record.names, record.signs)]
    )
    ax.set_ylabel("scaled objective (1 = best seen)")
    ax.grid(axis="x", alpha=0.5)
    ax.set_title(f"{len(record.front())} front candidates (colour) of {len(record.ok)}")
    fig.subplots_adjust(left=0.1, right=0.8, bottom=0.16, top=0.9)
    fig.savefig(path)
    return path


def plot_progress(path: str | Path, record: Record) -> Path:
    """progress.png: hypervolume (fixed r) and best score per objective over evaluations."""
    path = Path(path)
    series = record.series()
    fig = _figure(7.0, 6.0)
    top, bottom = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2)
    if series:
        steps = [s for s, _, _ in series]
        last = max(len(record.results), steps[-1])
        if "hypervolume" in series[-1][2]:
            hv = [v["hypervolume"] for _, _, v in series]
            top.step(steps + [last], hv + hv[-1:], where="post", color="crimson")
        ref = ", ".join(f"{v:.3g}" for v in record.ref)
        top.set_title(f"hypervolume (reference point [{ref}])", fontsize=10)
        for n in record.names:
            best = [v[f"best/{mlflow_key(n)}"] for _, _, v in series]
            bottom.step(steps + [last], best + best[-1:], where="post", label=n)
        bottom.legend(fontsize=8, loc="best")
    else:
        top.text(0.5, 0.5, "no successful evaluation yet", ha="center", transform=top.transAxes)
    top.set_ylabel("hypervolume")
    bottom.set_ylabel("best score so far")
    bottom.set_xlabel("evaluations")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.09, top=0.95, hspace=0.28)
    fig.savefig(path)
    return path


def write_plots(record: Record, out_dir: str | Path) -> list[Path]:
    """pareto.png, progress.png and (3 or more objectives) parallel.png in out_dir."""
    out_dir = Path(out_dir)
    paths = [plot_front(out_dir / "pareto.png", record), plot_progress(out_dir / "progress.png", record)]
    if len(record.names) >= 3:
        paths.append(plot_parallel(out_dir / "parallel.png", record))
    return paths
