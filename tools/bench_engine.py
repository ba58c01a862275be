"""Search-engine figures, each measured side by side in one run:

1. driver overhead per candidate: ask + tell + journal (fsync) + Ray scheduling, with an evaluator that
   returns at once (target < 10 ms);
2. in-place candidate switch for a ~100M-parameter model vs the memory-bandwidth floor
   (bytes read + written / measured copy bandwidth; target <= 2x);
3. worker-pool scaling with a sleeping evaluator from 1 to 16 workers (target >= 90% efficiency);
4. batched dispatch (`workers.batch`) for a 5 ms evaluator on 2 workers, one candidate per call vs batches:
   engine overhead per candidate = wall time per candidate x workers - the evaluation (target <= 2 ms).

    python tools/bench_engine.py [--skip-switch] [--work /tmp/evomerge_bench] [--candidates 200]
        [--strategies random cma tpe nsga2] [--max-workers 16] [--sleep 0.5] [--batch-candidates 2000]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch


def synthetic_config(work: Path, name: str, strategy: str, n: int, **extra: object) -> object:
    """A search of n candidates over the synthetic objectives (no model read, so what is measured is the
    driver's bookkeeping), 2 workers, in `work/name`; also bench_tracking's."""
    from evomerge.config import parse_config

    return parse_config({
        "name": name,
        "models": {"base": "unused", "sources": ["a", "b", "c"]},
        "space": {"type": "task_vector"},
        "strategy": {"name": strategy},
        "evaluator": {"type": "function", "function": "evomerge.evaluate.synthetic:quadratic"},
        "objectives": [{"name": "q0"}, {"name": "q1"}],
        "budget": {"candidates": n},
        "workers": {"count": 2},
        "output": str(work / name),
        **extra,
    }, "bench")  # fmt: skip


def _seconds_per_result(run_dir: Path) -> float:
    """Wall seconds per candidate between the first and the last result (pool start-up not counted)."""
    times = [float(line.split('"t":')[1].split(",")[0])
             for line in (run_dir / "journal.jsonl").read_text().splitlines() if '"event":"result"' in line]  # fmt: skip
    return (max(times) - min(times)) / (len(times) - 1)


def batched_dispatch(
    n: int, work: Path, evaluation: float = 0.005, batches: tuple[int, ...] = (1, 16)
) -> None:
    from evomerge.runtime.run import create_run_dir, execute

    print(f"\n4. batched dispatch ({n} candidates, {evaluation * 1000:.0f} ms evaluator, 2 workers, random)")
    print(f"{'batch':>5} {'wall ms/cand':>13} {'overhead ms/cand':>17} {'vs batch 1':>11}")
    first = None
    for batch in batches:
        evaluator = {"type": "function", "function": "evomerge.evaluate.synthetic:sleep",
                     "kwargs": {"seconds": evaluation}}  # fmt: skip
        cfg = synthetic_config(work, f"batch{batch}", "random", n, evaluator=evaluator,
                               workers={"count": 2, "batch": batch}, tracking={"enabled": False})  # fmt: skip
        run_dir = create_run_dir(cfg, None, None)
        execute(run_dir, cfg)
        per = _seconds_per_result(run_dir)
        overhead = per * 2 - evaluation
        first = first or overhead
        print(f"{batch:5d} {per * 1000:13.2f} {overhead * 1000:17.2f} {overhead / first:10.2f}x")


def driver_overhead(strategies: list[str], n: int, work: Path) -> None:
    from evomerge.runtime.run import create_run_dir, execute

    print(f"\n1. driver overhead per candidate ({n} candidates, instant evaluator, 2 workers)")
    print(f"{'strategy':10} {'wall ms/cand':>13} {'driver CPU ms/cand':>19}")
    for name in strategies:
        cfg = synthetic_config(work, f"overhead_{name}", name, n)
        run_dir = create_run_dir(cfg, None, None)
        # per-candidate time is taken between the first and last result, so pool start-up is not counted
        wall, cpu = time.perf_counter(), time.process_time()
        execute(run_dir, cfg)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        per = _seconds_per_result(run_dir) * 1000
        print(f"{name:10} {per:13.2f} {cpu / n * 1000:19.2f}   (whole call incl. pool start: {wall:.1f} s)")


def switch_time(work: Path, repeats: int) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from evomerge.merge.engine import ResidentPool, apply_in_place
    from evomerge.merge.mergekit_io import recipe_from_dict

    sys_path = Path(__file__).parent
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_merge", sys_path / "bench_merge.py")
    bench_merge = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_merge)
    models = bench_merge.build_models(work)
    experts = [str(models[e]) for e in ("e0", "e1", "e2")]
    pool = ResidentPool.from_refs([*experts, str(models["base"])])  # the order of the recipe's inputs
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(models["base"]), dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())
    recipe = recipe_from_dict({
        "merge_method": "task_arithmetic", "base_model": str(models["base"]),
        "models": [{"model": e, "parameters": {"weight": w}} for e, w in zip(experts, (0.5, 0.3, 0.4))],
    })  # fmt: skip
    apply_in_place(recipe, pool, model)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        apply_in_place(recipe, pool, model)
        times.append(time.perf_counter() - t)
    switch = min(times)
    stored = [*pool.stacked.values(), *(t for src in pool.tensors.values() for t in src.values())]
    read_bytes = sum(t.numel() * t.element_size() for t in stored)
    write_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    a = torch.empty(256 * 1024 * 1024 // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    copies = []
    for _ in range(5):
        t = time.perf_counter()
        b.copy_(a)
        copies.append(time.perf_counter() - t)
    bandwidth = 2 * a.numel() * 4 / min(copies)  # bytes read + written per second
    floor = (read_bytes + write_bytes) / bandwidth
    print(f"\n2. in-place candidate switch, task_arithmetic over 3 experts, {params / 1e6:.1f}M params "
          f"(sources bf16, target fp32), {torch.get_num_threads()} threads")  # fmt: skip
    print(f"   switch {switch * 1000:.0f} ms; floor {floor * 1000:.0f} ms "
          f"({(read_bytes + write_bytes) / 1e9:.2f} GB moved at {bandwidth / 1e9:.1f} GB/s copy bandwidth); "
          f"ratio {switch / floor:.2f}x")  # fmt: skip


def scaling(counts: list[int], per_worker: int, seconds: float) -> None:
    import ray

    from evomerge.merge.recipe import Recipe
    from evomerge.runtime.search import WorkerPool
    from evomerge.runtime.worker import FunctionBackendSpec

    print(f"\n3. worker-pool scaling, evaluator sleeping {seconds} s, {per_worker} candidates per worker")
    print(f"{'workers':>8} {'cand/s':>8} {'ideal':>8} {'efficiency':>11}")
    recipe = Recipe(merge_method="linear", models=[{"model": "m", "parameters": {"weight": 1.0}}]).to_dict()
    backend = FunctionBackendSpec("evomerge.evaluate.synthetic:sleep", {"seconds": seconds})
    base_rate = None
    for n in counts:
        pool = WorkerPool(backend, count=n, num_cpus=0.1, num_gpus=0, torch_threads=1)
        pool.pids()  # all actors up before timing
        todo = n * per_worker
        start = time.perf_counter()
        in_flight = {a.evaluate.remote(f"c{i}", recipe): a for i, a in enumerate(pool.actors)}
        sent, done = n, 0
        while done < todo:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            actor = in_flight.pop(ready[0])
            ray.get(ready[0])
            done += 1
            if sent < todo:
                in_flight[actor.evaluate.remote(f"c{sent}", recipe)] = actor
                sent += 1
        rate = todo / (time.perf_counter() - start)
        base_rate = base_rate or rate
        print(f"{n:8d} {rate:8.2f} {base_rate * n:8.2f} {rate / (base_rate * n):10.1%}")
        pool.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "evomerge_bench")
    parser.add_argument("--skip-switch", action="store_true")
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--strategies", nargs="+", default=["random", "cma", "tpe", "nsga2"])
    parser.add_argument("--max-workers", type=int, default=16, help="scaling: 1, 2, 4, ... up to this many")
    parser.add_argument(
        "--sleep", type=float, default=0.5, help="scaling: the evaluator's seconds per candidate"
    )
    parser.add_argument("--batch-candidates", type=int, default=2000, help="batched dispatch: candidates")
    args = parser.parse_args()
    import ray

    torch.set_num_threads(2)
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        driver_overhead(args.strategies, args.candidates, Path(tmp))
        batched_dispatch(args.batch_candidates, Path(tmp))
    counts = [2**i for i in range(args.max_workers.bit_length()) if 2**i <= args.max_workers]
    scaling(counts, per_worker=6, seconds=args.sleep)
    ray.shutdown()
    if not args.skip_switch:
        switch_time(args.work, repeats=3)


if __name__ == "__main__":
    main()
