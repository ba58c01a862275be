"""The demo search (`configs/demo.yaml`: CMA-ES, 48 candidates, `zoo_search` = 4 x 150 validation prompts) under
four fidelity settings; the best of each run is scored on the held-out test split (`zoo`). Decides the demo's
default (`make demo`).

    .venv/bin/python experiments/cheap_fitness/demo.py     # writes demo.csv next to this file
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

VARIANTS = {
    "full": {},
    "racing [32, 96]": {"racing": {"rungs": [32, 96]}},
    "mean, 20 items": {"estimator": {"name": "mean", "items": 20}},
    "mean, 50 items": {"estimator": {"name": "mean", "items": 50}},
}


def main(out: Path = Path("/tmp/cheap_fitness_demo")) -> None:
    from search import TestScorer

    from evomerge.config import parse_config
    from evomerge.runtime.run import create_run_dir, execute
    from evomerge.zoo import build_zoo

    base = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    rows = []
    for name, fidelity in VARIANTS.items():
        data = dict(base, fidelity=fidelity, output=str(out / name.replace(" ", "_").replace(",", "")),
                    tracking={"enabled": False}, models={"zoo": str(ROOT / "zoo")})  # fmt: skip
        cfg = parse_config(data, name)
        state, summary = execute(create_run_dir(cfg, None, None), cfg)
        rows.append({"setting": name, "forward_passes": state.forward_passes, "best": summary["best"]["id"],
                     "recipe": summary["best"]["recipe"]})  # fmt: skip
    tests = TestScorer(build_zoo(ROOT / "zoo"))
    for row in rows:
        scores = tests(row.pop("recipe"))
        row.update(
            {k: round(v, 4) for k, v in scores.items()},
            test_mean=round(float(np.mean(list(scores.values()))), 4),
        )
        print(row, flush=True)
    with (HERE / "demo.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
