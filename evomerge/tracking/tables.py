"""The parent run's tables: pareto.csv (one row per front candidate) and front_recipes.yaml."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import yaml

from evomerge.strategies.base import Candidate
from evomerge.tracking.record import Record


def write_tables(record: Record, out_dir: str | Path) -> list[Path]:
    """pareto.csv (one row per front candidate) and front_recipes.yaml (the front's recipes)."""
    out_dir = Path(out_dir)
    ids = record.front_ids()
    knee = record.knee()
    tasks = list(dict.fromkeys(k for c in ids for k in record.results[c]["scores"]))

    def predicted(cand: Candidate) -> list[Any]:
        """A strategy's prediction of each (maximized) objective, from info["predicted"] keyed by objective
        name or index (MAP); empty where it made none."""
        pred = cand.info.get("predicted") or {}
        by_index = {str(i): n for i, n in enumerate(record.names)}
        values = {by_index.get(str(k), str(k)): v for k, v in pred.items()}
        return [values.get(n, "") for n in record.names]

    with open(out_dir / "pareto.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["id", "generation", "step", "knee", *tasks, *(f"objective/{n}" for n in record.names), "recipe",
             *(f"predicted/{n}" for n in record.names)]
        )  # fmt: skip
        for c in ids:
            r, cand = record.results[c], record.candidates[c]
            w.writerow(
                [
                    c,
                    cand.generation,
                    record.steps[c],
                    str(c == knee).lower(),
                    *(r["scores"].get(t, "") for t in tasks),
                    *r["objectives"],
                    json.dumps(cand.recipe.to_dict(), separators=(",", ":")),
                    *predicted(cand),
                ]
            )
    doc = {
        "objectives": [
            {"name": n, "direction": "maximize" if s > 0 else "minimize"}
            for n, s in zip(record.names, record.signs)
        ],
        "reference_point": None if record.ref is None else [float(v) for v in record.ref],
        "knee": knee,
        "front": [
            {
                "id": c,
                "generation": record.candidates[c].generation,
                "scores": record.results[c]["scores"],
                "recipe": record.candidates[c].recipe.to_dict(),
            }
            for c in ids
        ],
    }
    (out_dir / "front_recipes.yaml").write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    return [out_dir / "pareto.csv", out_dir / "front_recipes.yaml"]
