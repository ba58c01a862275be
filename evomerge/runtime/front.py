"""The Pareto front of a run, read from its journal (works while the run is still going)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from evomerge.config import load_config
from evomerge.errors import ConfigError
from evomerge.fidelity.plan import is_exact
from evomerge.journal import final_results, read_journal
from evomerge.pareto import non_dominated


def front_from_journal(run_dir: Path) -> dict[str, Any]:
    if not (run_dir / "journal.jsonl").exists():
        raise ConfigError(f"{run_dir}: no journal.jsonl (not a run directory?)")
    config = load_config(run_dir / "config.yaml")
    events = read_journal(run_dir / "journal.jsonl", repair=False)
    recipes = {c["id"]: c["recipe"] for e in events if e["event"] == "ask" for c in e["candidates"]}
    ok = [e for e in final_results(events).values() if e["status"] == "ok"]
    if not ok:
        return {"objectives": [], "front": [], "best": None}
    names = [o.name for o in config.objectives] if config.objectives else list(ok[0]["scores"])
    weights = np.array([o.weight for o in config.objectives]) if config.objectives else np.ones(len(names))
    points = np.array([e["objectives"] for e in ok])
    rows = [
        {
            "id": e["id"],
            "scores": e["scores"],
            "objectives": e["objectives"],
            "recipe": recipes[e["id"]],
            "exact": is_exact(e),
        }
        for e in ok
    ]
    front = [rows[i] for i in np.flatnonzero(non_dominated(points))]
    best = rows[int(np.argmax(points @ weights))]
    return {"objectives": names, "front": front, "best": best}
