"""Driver overhead per candidate at search scale, and what MLflow tracking adds, measured side by side in one
run with an instant evaluator (so everything measured is bookkeeping):

1. tracking off: ask + tell + journal (fsync per event) + Ray scheduling, per candidate, for N candidates;
   the first and last tenth are compared, since per-candidate bookkeeping must stay flat as the run grows;
2. tracking on (`children: all` and `children: front`): the same search, per-candidate wall time while it
   runs, and how long the tracking side process takes to drain after the search ended.

    python tools/bench_tracking.py [--candidates 2000] [--tracked 300] [--strategy random]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch
from bench_engine import synthetic_config  # tools/ is on the path of a script run from it


def _result_times(run_dir: Path) -> list[float]:
    with open(run_dir / "journal.jsonl") as f:
        events = [json.loads(line) for line in f]
    return sorted(e["t"] for e in events if e["event"] == "result")


def measure(work: Path, name: str, strategy: str, n: int, tracking: dict) -> dict[str, float]:
    """ms per candidate between the first and last result (pool start-up excluded), over the whole run and
    over its first and last tenth; seconds from the last result to `execute` returning (tracking drain)."""
    from evomerge.runtime.run import create_run_dir, execute

    cfg = synthetic_config(work, name, strategy, n, tracking=tracking)
    run_dir = create_run_dir(cfg, None, None)
    cpu = time.process_time()
    execute(run_dir, cfg)
    done, cpu = time.time(), time.process_time() - cpu
    t = _result_times(run_dir)
    tenth = max(2, len(t) // 10)
    return {
        "ms": (t[-1] - t[0]) / (len(t) - 1) * 1000,
        "first_ms": (t[tenth - 1] - t[0]) / (tenth - 1) * 1000,
        "last_ms": (t[-1] - t[-tenth]) / (tenth - 1) * 1000,
        "driver_cpu_ms": cpu / n * 1000,
        "drain_s": done - t[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=2000)
    parser.add_argument("--tracked", type=int, default=300, help="candidates of the tracked runs")
    parser.add_argument("--strategy", default="random")
    args = parser.parse_args()
    import ray

    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        off = measure(work, "off", args.strategy, args.candidates, {"enabled": False})
        print(f"1. driver overhead, tracking off, {args.candidates} candidates, {args.strategy}, 2 workers:")
        print(f"   {off['ms']:.2f} ms/candidate wall (first tenth {off['first_ms']:.2f}, last tenth "
              f"{off['last_ms']:.2f}); driver CPU {off['driver_cpu_ms']:.2f} ms/candidate")  # fmt: skip
        rows = {"off": measure(work, "off_small", args.strategy, args.tracked, {"enabled": False})}
        for children in ("front", "all"):
            rows[children] = measure(work, f"mlflow_{children}", args.strategy, args.tracked,
                                     {"enabled": True, "children": children})  # fmt: skip
        print(f"2. tracking overhead, {args.tracked} candidates:")
        print(
            f"   {'tracking':10} {'ms/cand':>8} {'driver CPU ms/cand':>19} {'drain after the search s':>25}"
        )
        for name, r in rows.items():
            print(f"   {name:10} {r['ms']:8.2f} {r['driver_cpu_ms']:19.2f} {r['drain_s']:25.1f}")
        print(json.dumps({"overhead": off, "tracking": rows}))
    ray.shutdown()


if __name__ == "__main__":
    main()
