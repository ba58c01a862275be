"""Large models without large memory: stream a merge of synthetic sharded Llama-like checkpoints far larger
than the merge's memory, and report its peak RSS next to the size of its inputs and output.

Each model is written shard by shard, tensor by tensor (random bf16 values; experts = base + noise), so
building them needs no more memory than one tensor either. The merge (`merge_to_dir`, as `evomerge merge`
runs it) runs in a fresh subprocess that reports its own peak RSS (VmHWM) and its RSS after imports.

    python tools/bench_stream.py --gib 4 [--method ties] [--experts 2] [--work /tmp/evomerge_stream]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MERGE = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
from evomerge.merge.engine import merge_to_dir
from evomerge.merge.mergekit_io import recipe_from_dict

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

spec = json.loads(sys.argv[1])
recipe = recipe_from_dict(spec["recipe"])
baseline = rss("VmRSS:")
start = time.perf_counter()
merge_to_dir(recipe, spec["out"], max_shard_bytes=spec["shard_bytes"])
print(json.dumps({"baseline": baseline, "peak": rss("VmHWM:"), "seconds": time.perf_counter() - start}))
"""


def llama_shapes(hidden: int, layers: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    inter = int(hidden * 2.75) // 64 * 64
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
        out += [(p + f"self_attn.{n}_proj.weight", (hidden, hidden)) for n in "qkvo"]
        out += [(p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden))]
        out += [(p + "mlp.down_proj.weight", (hidden, inter))]
    return out + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def size_for(gib: float, hidden: int = 1024, vocab: int = 4096) -> tuple[int, int, int]:
    """(hidden, layers, vocab) of a bf16 model of about `gib` GiB."""
    per_layer = sum(math.prod(s) for _, s in llama_shapes(hidden, 1, vocab)) - 2 * vocab * hidden - hidden
    layers = max(1, round((gib * 1024**3 / 2 - 2 * vocab * hidden) / per_layer))
    return hidden, layers, vocab


def write_model(path: Path, seed: int, hidden: int, layers: int, vocab: int, shard_bytes: int,
                base_seed: int | None = None, scale: float = 0.01) -> int:  # fmt: skip
    """A bf16 LlamaForCausalLM checkpoint, sharded; with `base_seed`, base + scale * noise. Returns bytes."""
    path.mkdir(parents=True)
    shapes = llama_shapes(hidden, layers, vocab)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        n = math.prod(shape) * 2
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in shard:
            n = math.prod(shape) * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = file
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        with open(path / file, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            for t, (_name, shape) in enumerate(shard):
                key = (i << 20) + t
                x = torch.randn(
                    shape, generator=torch.Generator().manual_seed((base_seed or seed) * 7919 + key)
                )
                x.mul_(0.02)
                if base_seed is not None:
                    g = torch.Generator().manual_seed(seed * 7919 + key)
                    x.add_(torch.randn(shape, generator=g), alpha=scale)
                f.write(memoryview(x.to(torch.bfloat16).reshape(-1).view(torch.uint8).numpy()))
                del x
    total = sum(math.prod(s) * 2 for _, s in shapes)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": int(hidden * 2.75) // 64 * 64, "num_hidden_layers": layers,
              "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 64, "vocab_size": vocab,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}  # fmt: skip
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return total


def build(work: Path, gib: float, experts: int, shard_bytes: int, hidden: int = 1024,
          vocab: int = 4096) -> tuple[dict[str, Path], int, int]:  # fmt: skip
    """{'base': ..., 'e0': ...} written under `work`; (paths, bytes per model, largest tensor's elements)."""
    hidden, layers, vocab = size_for(gib, hidden, vocab)
    paths = {"base": work / "base", **{f"e{i}": work / f"e{i}" for i in range(experts)}}
    nbytes = write_model(paths["base"], 1, hidden, layers, vocab, shard_bytes)
    for i in range(experts):
        write_model(paths[f"e{i}"], i + 2, hidden, layers, vocab, shard_bytes, base_seed=1)
    largest = max(math.prod(s) for _, s in llama_shapes(hidden, layers, vocab))
    return paths, nbytes, largest


def recipe(paths: dict[str, Path], method: str) -> dict:
    experts = sorted(k for k in paths if k != "base")
    if method == "linear":
        models = [{"model": str(paths[k]), "parameters": {"weight": 1.0}} for k in ["base", *experts]]
        return {"merge_method": "linear", "models": models, "dtype": "bfloat16"}
    models = [{"model": str(paths[k]), "parameters": {"weight": 0.5, "density": 0.5}} for k in experts]
    return {"merge_method": method, "base_model": str(paths["base"]), "models": models, "dtype": "bfloat16"}


def merge_subprocess(paths: dict[str, Path], method: str, out: Path, shard_bytes: int) -> dict[str, float]:
    spec = {"recipe": recipe(paths, method), "out": str(out), "shard_bytes": shard_bytes}
    proc = subprocess.run([sys.executable, "-c", MERGE, json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"merge failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="size of each model (bf16)")
    parser.add_argument("--experts", type=int, default=2)
    parser.add_argument(
        "--method", default="ties", choices=["ties", "linear", "task_arithmetic", "dare_ties"]
    )
    parser.add_argument("--shard-mib", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="evomerge_stream_", dir=args.work))
    shard_bytes = args.shard_mib * 1024**2
    try:
        t = time.perf_counter()
        paths, nbytes, largest = build(work, args.gib, args.experts, shard_bytes, args.hidden, args.vocab)
        built = time.perf_counter() - t
        r = merge_subprocess(paths, args.method, work / "out", shard_bytes)
        inputs = nbytes * len(paths)
        mib = 1024**2
        print(f"{len(paths)} models x {nbytes / 1024**3:.2f} GiB (bf16, {args.shard_mib} MiB shards; built in "
              f"{built:.0f} s), {args.method} -> {nbytes / 1024**3:.2f} GiB output in {r['seconds']:.1f} s")  # fmt: skip
        print(f"peak RSS {r['peak'] / mib:.0f} MiB (after imports {r['baseline'] / mib:.0f} MiB; merge working set "
              f"{(r['peak'] - r['baseline']) / mib:.0f} MiB) for {inputs / mib:.0f} MiB of inputs: "
              f"{inputs / r['peak']:.1f}x the peak; largest tensor {largest * 2 / mib:.0f} MiB in bf16")  # fmt: skip
        print(json.dumps({**r, "input_bytes": inputs, "model_bytes": nbytes, "largest_elements": largest}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
