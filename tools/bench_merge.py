"""evomerge merge vs mergekit-yaml, whole process, same YAML, in one run: wall time and peak RSS; then a
streamed merge of checkpoints larger than half the RAM beside its floor.

Builds synthetic Llamas (a base and three experts per shape: bf16 95M and fp32 111M parameters) under --work,
then runs each method's config through both tools as separate processes (`/usr/bin/time` reports peak RSS),
checks the two outputs agree (deterministic methods), and prints the figures and their ratios.

The streamed row (--stream-gib, by default three bf16 models that together hold 55% of the RAM) times
`evomerge merge` of a TIES recipe (base + 2 experts) against its floor, measured in the same run: reading
every input shard once, with a cold page cache (the files' pages evicted by posix_fadvise) and a warm one, plus
the merge's arithmetic timed in memory on one layer (inputs already read) and scaled by element count.

    python tools/bench_merge.py [--work /tmp/evomerge_bench] [--repeats 1] [--shapes bf16_95m fp32_111m]
                                [--methods linear task_arithmetic ties ...] [--stream-gib G] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from bench_stream import build as build_stream_models
from bench_stream import recipe as stream_recipe
from safetensors.torch import load_file, save_file

from evomerge.merge.engine import merge_tensor, open_recipe_sources, plan
from evomerge.merge.mergekit_io import recipe_from_dict

SHAPES = {
    "bf16_95m": {
        "hidden": 768,
        "inter": 2048,
        "layers": 10,
        "vocab": 16000,
        "heads": 12,
        "dtype": "bfloat16",
    },
    "fp32_111m": {"hidden": 1024, "inter": 2816, "layers": 8, "vocab": 4096, "heads": 16, "dtype": "float32"},
}
TINY = {"hidden": 64, "inter": 128, "layers": 2, "vocab": 256, "heads": 4}  # --tiny: the smoke test's size
METHODS = ["linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties", "della"]
RANDOM = {"dare_ties", "della"}  # the two tools draw different masks: outputs are not compared
SHAPE: dict = {}


def llama_tensors(gen: torch.Generator, base: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    h, i, v = SHAPE["hidden"], SHAPE["inter"], SHAPE["vocab"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for layer in range(SHAPE["layers"]):
        p = f"model.layers.{layer}."
        for proj in ("q", "k", "v", "o"):
            shapes[f"{p}self_attn.{proj}_proj.weight"] = (h, h)
        shapes[f"{p}mlp.gate_proj.weight"] = (i, h)
        shapes[f"{p}mlp.up_proj.weight"] = (i, h)
        shapes[f"{p}mlp.down_proj.weight"] = (h, i)
        shapes[f"{p}input_layernorm.weight"] = (h,)
        shapes[f"{p}post_attention_layernorm.weight"] = (h,)
    out = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=gen)
        dtype = getattr(torch, SHAPE["dtype"])
        out[name] = (noise * 0.02 if base is None else base[name].float() + noise * 0.002).to(dtype)
    return out


def build_models(work: Path) -> dict[str, Path]:
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": SHAPE["hidden"],
        "intermediate_size": SHAPE["inter"], "num_hidden_layers": SHAPE["layers"], "num_attention_heads": SHAPE["heads"],
        "num_key_value_heads": SHAPE["heads"], "vocab_size": SHAPE["vocab"], "rms_norm_eps": 1e-5,
        "max_position_embeddings": 2048, "tie_word_embeddings": False, "torch_dtype": SHAPE["dtype"],
    }  # fmt: skip
    paths, base = {}, None
    for i, name in enumerate(("base", "e0", "e1", "e2")):
        path = work / name
        paths[name] = path
        if (path / "model.safetensors").exists():
            base = base or load_file(path / "model.safetensors")
            continue
        path.mkdir(parents=True, exist_ok=True)
        tensors = llama_tensors(torch.Generator().manual_seed(i), base)
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        (path / "config.json").write_text(json.dumps(config))
        base = base or tensors
    return paths


def config(method: str, models: dict[str, Path]) -> dict:
    """One method over the three experts (weights 1.0, 0.7, 0.5; density 0.5 where the method prunes)."""
    experts = [str(models[e]) for e in ("e0", "e1", "e2")]
    extra = {"ties": {"density": 0.5}, "dare_ties": {"density": 0.5}, "breadcrumbs_ties": {"density": 0.5, "gamma": 0.01},
             "della": {"density": 0.5, "epsilon": 0.1}}.get(method, {})  # fmt: skip
    cfg = {"merge_method": method, "dtype": SHAPE["dtype"],
           "models": [{"model": e, "parameters": {"weight": w, **extra}} for e, w in zip(experts, (1.0, 0.7, 0.5))]}  # fmt: skip
    if method != "linear":
        cfg["base_model"] = str(models["base"])
        cfg["parameters"] = {"lambda": 1.0}
    return cfg


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of a whole process, from GNU time. The page cache is synced first, so
    no run pays for writing back what the one before it wrote."""
    os.sync()
    with tempfile.NamedTemporaryFile("r", suffix=".time") as f:
        proc = subprocess.run(
            ["/usr/bin/time", "-f", "%e %M", "-o", f.name, *cmd], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise SystemExit(f"{cmd[0]} failed:\n{proc.stderr[-2000:]}")
        wall, rss_kb = f.read().split()[-2:]
    return float(wall), int(rss_kb) / 1024


def max_diff(a: Path, b: Path) -> float:
    ta, tb = {}, {}
    for f in a.glob("*.safetensors"):
        ta.update(load_file(f))
    for f in b.glob("*.safetensors"):
        tb.update(load_file(f))
    assert set(ta) == set(tb), set(ta) ^ set(tb)
    return max((ta[k].float() - tb[k].float()).abs().max().item() for k in ta)


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache (clean pages only: sync first), so the next read is cold."""
    os.sync()
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_seconds(files: list[Path]) -> float:
    """Time to read every file once, front to back, in 64 MiB reads."""
    buf = memoryview(bytearray(64 << 20))
    start = time.perf_counter()
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - start


def arithmetic_seconds(recipe: dict, layer: str = "model.layers.0.") -> tuple[float, float]:
    """(seconds for one layer's tensors, that scaled to the whole model by element count): merge_tensor in this
    process on inputs already in memory, the best of 3 runs."""
    parsed = recipe_from_dict(recipe)
    sources = open_recipe_sources(parsed)
    jobs = plan(parsed, sources).jobs
    ours = [j for j in jobs if j.name.startswith(layer)]
    inputs = {ref_name: sources[ref_name[0]].read(ref_name[1]).clone() for j in ours for ref_name in j.inputs}
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        for job in ours:
            merge_tensor(job, lambda ref, name: inputs[(ref, name)])
        best = min(best, time.perf_counter() - start)
    scale = sum(math.prod(j.shape) for j in jobs) / sum(math.prod(j.shape) for j in ours)
    return best, best * scale


def stream_row(work: Path, gib: float, tiny: bool) -> None:
    """The streamed merge and its floor (cold and warm page cache), printed."""
    shard_bytes = (8 if tiny else 1024) << 20
    shape = {"hidden": 64, "vocab": 256} if tiny else {"hidden": 2048, "vocab": 32000}
    marker = work / "built.json"
    if not marker.exists():
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        t = time.perf_counter()
        _, nbytes, _ = build_stream_models(work, gib, 2, shard_bytes, **shape)
        marker.write_text(json.dumps({"model_bytes": nbytes}))
        print(f"built 3 x {nbytes / 1024**3:.2f} GiB in {time.perf_counter() - t:.0f} s", flush=True)
    paths = {name: work / name for name in ("base", "e0", "e1")}
    files = sorted(f for p in paths.values() for f in p.glob("*.safetensors"))
    inputs = sum(f.stat().st_size for f in files)
    recipe = stream_recipe(paths, "ties")
    cfg = work / "ties.yaml"
    cfg.write_text(yaml.safe_dump(recipe))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(f"\nstreamed TIES merge: base + 2 experts, bf16, {inputs / 1024**3:.2f} GiB of inputs "
          f"({inputs / ram:.0%} of the RAM), hidden {shape['hidden']}, vocab {shape['vocab']}", flush=True)  # fmt: skip
    evict(files)
    cold = read_seconds(files)
    warm = read_seconds(files)
    layer, arithmetic = arithmetic_seconds(recipe)
    print(f"read every shard once: cold {cold:.1f} s ({inputs / cold / 1e9:.2f} GB/s), warm {warm:.1f} s "
          f"({inputs / warm / 1e9:.2f} GB/s); arithmetic in memory: {layer:.3f} s for layer 0, "
          f"{arithmetic:.1f} s scaled to the model", flush=True)  # fmt: skip
    out = work / "out"
    cmd = [str(Path(sys.executable).parent / "evomerge"), "merge", str(cfg), str(out), "--force"]
    print(f"{'cache':6} {'floor s':>8} {'merge s':>8} {'merge / floor':>14} {'peak RSS MiB':>13}")
    for cache, read in (("cold", cold), ("warm", warm)):
        shutil.rmtree(out, ignore_errors=True)
        if cache == "cold":
            evict(files)
        else:
            read_seconds(files)
        wall, rss = timed(cmd)
        floor = read + arithmetic
        print(f"{cache:6} {floor:8.1f} {wall:8.1f} {wall / floor:13.2f}x {rss:13.0f}", flush=True)
    shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "evomerge_bench")
    parser.add_argument("--repeats", type=int, default=1, help="runs per tool and config; the best is kept")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument(
        "--tools", nargs="+", default=["evomerge", "mergekit"], choices=["evomerge", "mergekit"]
    )
    parser.add_argument("--tiny", action="store_true", help="0.2M-parameter models: checks the script runs")
    parser.add_argument("--stream-gib", type=float, default=None,
                        help="size of each streamed model (default: 3 of them fill 55%% of the RAM; 0 skips)")  # fmt: skip
    args = parser.parse_args()
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    stream_gib = (
        args.stream_gib if args.stream_gib is not None else (0.005 if args.tiny else 0.55 * ram_gib / 3)
    )
    bindir = Path(sys.executable).parent
    rows = []
    print(f"{'shape':10} {'method':17} {'tool':9} {'wall s':>8} {'peak RSS MiB':>13}")
    for shape in args.shapes:
        SHAPE.clear()
        SHAPE.update(SHAPES[shape], **(TINY if args.tiny else {}))
        work = args.work / (shape + ("_tiny" if args.tiny else ""))
        models = build_models(work)
        params = sum(t.numel() for t in load_file(models["base"] / "model.safetensors").values())
        print(
            f"{shape}: synthetic Llama, {params / 1e6:.1f}M parameters, {SHAPE['dtype']}, base + 3 experts",
            flush=True,
        )
        for method in args.methods:
            cfg_path = work / f"{method}.yaml"
            cfg_path.write_text(yaml.safe_dump(config(method, models)))
            result = {}
            for tool in args.tools:
                out = work / f"out_{method}_{tool}"
                best = (float("inf"), 0.0)
                for _ in range(args.repeats):
                    shutil.rmtree(out, ignore_errors=True)
                    cmd = (
                        [str(bindir / "evomerge"), "merge", str(cfg_path), str(out)]
                        if tool == "evomerge"
                        else [str(bindir / "mergekit-yaml"), str(cfg_path), str(out)]
                    )
                    best = min(best, timed(cmd))
                result[tool] = best
                print(f"{shape:10} {method:17} {tool:9} {best[0]:8.2f} {best[1]:13.0f}", flush=True)
            diff = None
            if len(result) == 2 and method not in RANDOM:
                diff = max_diff(work / f"out_{method}_evomerge", work / f"out_{method}_mergekit")
            rows.append((shape, method, result, diff))
    if len(args.tools) == 2:
        print_ratios(rows)
    if stream_gib > 0 and "evomerge" in args.tools:
        stream_row(args.work / f"stream_{stream_gib:g}gib", stream_gib, args.tiny)


def print_ratios(rows: list) -> None:
    print("\nratios (mergekit / evomerge; > 1 means evomerge is better)")
    print(f"{'shape':10} {'method':17} {'speed-up':>9} {'RSS ratio':>10} {'max |diff|':>11}")
    for shape, method, r, diff in rows:
        shown = "random" if diff is None else f"{diff:.2e}"
        print(f"{shape:10} {method:17} {r['mergekit'][0] / r['evomerge'][0]:8.2f}x "
              f"{r['mergekit'][1] / r['evomerge'][1]:9.2f}x {shown:>11}")  # fmt: skip


if __name__ == "__main__":
    main()
