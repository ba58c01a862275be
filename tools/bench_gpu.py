"""GPU figures, each measured side by side in one run on one CUDA device:

1. in-place candidate switch (task arithmetic over K experts into the resident target) vs the HBM
   bandwidth floor (bytes read + written / measured device copy bandwidth), for fp32 and bf16 pools; and with
   `workers.pool_device: cpu` (the pool pinned in host memory, streamed per tensor) vs the same pool on the
   GPU and vs the PCIe floor (pool bytes / measured pinned host-to-device bandwidth);
2. evaluation throughput: forward passes/s of the resident target on fixed-length prompts, and the lm-eval
   evaluator on the zoo mix vs a bare batched greedy loop over the same prompts (as tools/bench_eval.py);
3. a short end-to-end search on the zoo with GPU workers (fractional GPUs: `workers.num_gpus` 1/count).

Exits with a message (status 2) when no CUDA device exists. No GPU was available where evomerge was
developed: docs/benchmarks.md says so, and holds no GPU numbers until someone runs this.

    python tools/bench_gpu.py [--gib 2] [--experts 3] [--zoo zoo] [--workers 4] [--candidates 32]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def copy_bandwidth(device: str) -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy."""
    a = torch.empty(256 * 1024**2, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    return 2 * a.numel() * 4 / _timed(lambda: b.copy_(a), 5)


def switch(work: Path, gib: float, experts: int, repeats: int) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from evomerge.merge.engine import ResidentPool, apply_in_place
    from evomerge.merge.mergekit_io import recipe_from_dict

    stream = _tool("bench_stream")
    paths, model_bytes, _ = stream.build(work, gib, experts, 1024**3)
    names = sorted(k for k in paths if k != "base")
    refs = [*(str(paths[k]) for k in names), str(paths["base"])]
    recipe = recipe_from_dict({
        "merge_method": "task_arithmetic", "base_model": str(paths["base"]),
        "models": [{"model": str(paths[k]), "parameters": {"weight": 0.3 + 0.1 * i}} for i, k in enumerate(names)],
    })  # fmt: skip
    bandwidth = copy_bandwidth("cuda")
    params = model_bytes // 2
    print(f"\n1. candidate switch, task_arithmetic over {experts} experts, {params / 1e9:.2f}B params, "
          f"{torch.cuda.get_device_name()} (copy bandwidth {bandwidth / 1e9:.0f} GB/s)")  # fmt: skip
    print(f"   {'pool':9} {'target':9} {'switch ms':>10} {'floor ms':>9} {'ratio':>6}")
    config = AutoConfig.from_pretrained(paths["base"])
    for pool_dtype, target_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                     (torch.bfloat16, torch.float32)):  # fmt: skip
        pool = ResidentPool.from_refs(refs, device="cuda", dtype=pool_dtype)
        model = AutoModelForCausalLM.from_config(config, dtype=target_dtype).to("cuda").eval()
        seconds = _timed(functools.partial(apply_in_place, recipe, pool, model), repeats)
        moved = _held(pool) + sum(p.numel() * p.element_size() for p in model.parameters())
        floor = moved / bandwidth
        name = {torch.float32: "fp32", torch.bfloat16: "bf16"}
        print(f"   {name[pool_dtype]:9} {name[target_dtype]:9} {seconds * 1000:10.1f} {floor * 1000:9.1f} "
              f"{seconds / floor:5.2f}x")  # fmt: skip
        pool = model = None
        torch.cuda.empty_cache()
    host_switch(refs, recipe, config, repeats)


def _held(pool) -> int:
    stored = [*pool.stacked.values(), *(t for src in pool.tensors.values() for t in src.values())]
    return sum(t.numel() * t.element_size() for t in stored)


def host_switch(refs: list[str], recipe, config, repeats: int) -> None:
    """`pool_device: cpu`: the same switch from a pinned host pool, each stack copied to the GPU as it is used."""
    from transformers import AutoModelForCausalLM

    from evomerge.merge.engine import ResidentPool, apply_in_place
    from evomerge.runtime.memory import pcie_bandwidth

    pcie = pcie_bandwidth()
    print(f"\n   pool_device: cpu (pinned host pool streamed per tensor; host->device {pcie / 1e9:.1f} GB/s)")
    print(
        f"   {'pool':9} {'target':9} {'GPU pool ms':>12} {'host pool ms':>13} {'PCIe floor ms':>14} {'ratio':>6}"
    )
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}
    for pool_dtype, target_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)):
        model = AutoModelForCausalLM.from_config(config, dtype=target_dtype).to("cuda").eval()
        pool = ResidentPool.from_refs(refs, device="cuda", dtype=pool_dtype)
        on_gpu = _timed(functools.partial(apply_in_place, recipe, pool, model), repeats)
        pool = None
        torch.cuda.empty_cache()
        pool = ResidentPool.from_refs(refs, device="cpu", dtype=pool_dtype, pin=True)
        on_host = _timed(functools.partial(apply_in_place, recipe, pool, model), repeats)
        floor = _held(pool) / pcie
        print(f"   {name[pool_dtype]:9} {name[target_dtype]:9} {on_gpu * 1000:12.1f} {on_host * 1000:13.1f} "
              f"{floor * 1000:14.1f} {on_host / floor:5.2f}x")  # fmt: skip
        pool = model = None
        torch.cuda.empty_cache()


def throughput(zoo: Path, seq: int, batch: int, repeats: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluate.lmeval import LMEvalSpec
    from evomerge.zoo import build_zoo, greedy_exact_match, open_zoo

    paths = open_zoo(zoo) or build_zoo(zoo)
    model = AutoModelForCausalLM.from_pretrained(paths["expert_up"], dtype=torch.float32).to("cuda").eval()
    tok = AutoTokenizer.from_pretrained(paths["base"])
    ids = torch.randint(4, model.config.vocab_size, (batch, seq), device="cuda")
    with torch.no_grad():
        seconds = _timed(lambda: model(ids), repeats)
    print(f"\n2. evaluation throughput (zoo expert_up on cuda): {batch / seconds:,.0f} forward passes/s "
          f"({batch * seq / seconds:,.0f} tokens/s) at batch {batch} x {seq} tokens")  # fmt: skip
    evaluator = LMEvalSpec(tasks=("zoo_search",), batch_size=128).build()
    docs = [(doc["prompt"], doc["answer"]) for run in evaluator.runs for _, doc in run.docs]
    prompts, answers = [p for p, _ in docs], [a for _, a in docs]
    floor = _timed(lambda: greedy_exact_match(model, tok, prompts, answers, batch_size=128), repeats)
    ours = _timed(lambda: evaluator.evaluate(model, tok), repeats)
    print(f"   lm-eval evaluator {ours * 1000:.0f} ms vs bare greedy loop {floor * 1000:.0f} ms over "
          f"{len(prompts)} prompts: {ours / floor:.2f}x")  # fmt: skip


def search(zoo: Path, workers: int, candidates: int, work: Path) -> None:
    import ray

    from evomerge.config import parse_config
    from evomerge.runtime.run import create_run_dir, execute

    cfg = parse_config({
        "name": "gpu", "models": {"zoo": str(zoo)}, "space": {"type": "task_vector"},
        "strategy": {"name": "cma"}, "evaluator": {"type": "lmeval", "tasks": ["zoo_search"]},
        "budget": {"candidates": candidates}, "device": "cuda",
        "workers": {"count": workers, "num_gpus": 1 / workers, "num_cpus": 1},
        "tracking": {"enabled": False}, "output": str(work / "gpu_search"),
    }, "bench_gpu")  # fmt: skip
    ray.init(include_dashboard=False, logging_level=logging.WARNING)
    run_dir = create_run_dir(cfg, None, None)
    start = time.perf_counter()
    execute(run_dir, cfg)
    wall = time.perf_counter() - start
    events = [json.loads(line) for line in (run_dir / "journal.jsonl").read_text().splitlines()]
    results = sorted(e["t"] for e in events if e["event"] == "result")
    rate = (len(results) - 1) / (results[-1] - results[0])
    devices = {e.get("device") for e in events if e["event"] == "result"}
    print(f"\n3. end-to-end search, zoo, {workers} workers sharing one GPU (num_gpus {1 / workers:.2f}): "
          f"{candidates} candidates in {wall:.1f} s incl. start-up; {rate:.1f} candidates/s steady "
          f"(devices: {', '.join(sorted(map(str, devices)))})")  # fmt: skip
    ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0, help="size of each synthetic model for the switch")
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--zoo", type=Path, default=Path("zoo"))
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--candidates", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here (torch.cuda.is_available() is False; torch "
              f"{torch.__version__}); run it on a machine with a GPU and a CUDA build of torch", file=sys.stderr)  # fmt: skip
        sys.exit(2)
    with tempfile.TemporaryDirectory() as tmp:
        switch(Path(tmp), args.gib, args.experts, args.repeats)
        throughput(args.zoo, seq=64, batch=256, repeats=args.repeats)
        search(args.zoo, args.workers, args.candidates, Path(tmp))


if __name__ == "__main__":
    main()
