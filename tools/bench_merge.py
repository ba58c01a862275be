"""evomerge merge vs mergekit-yaml, whole process, same YAML, in one run: wall time and peak RSS.

Builds a synthetic ~100M-parameter Llama (a base and three experts, bf16 safetensors) under --work, then
runs each config through both tools as separate processes (`/usr/bin/time` reports peak RSS), checks the
two outputs agree, and prints the figures and their ratios.

    python tools/bench_merge.py [--work /tmp/evomerge_bench] [--repeats 1] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

SHAPE = {"hidden": 768, "inter": 2048, "layers": 10, "vocab": 16000, "heads": 12}
TINY = {"hidden": 64, "inter": 128, "layers": 2, "vocab": 256, "heads": 4}  # --tiny: the smoke test's size


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
        out[name] = (noise * 0.02 if base is None else base[name].float() + noise * 0.002).to(torch.bfloat16)
    return out


def build_models(work: Path) -> dict[str, Path]:
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": SHAPE["hidden"],
        "intermediate_size": SHAPE["inter"], "num_hidden_layers": SHAPE["layers"], "num_attention_heads": SHAPE["heads"],
        "num_key_value_heads": SHAPE["heads"], "vocab_size": SHAPE["vocab"], "rms_norm_eps": 1e-5,
        "max_position_embeddings": 2048, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
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


def configs(models: dict[str, Path]) -> dict[str, dict]:
    experts = [str(models[e]) for e in ("e0", "e1", "e2")]
    return {
        "ties": {
            "merge_method": "ties", "base_model": str(models["base"]), "dtype": "bfloat16",
            "models": [{"model": e, "parameters": {"weight": w, "density": 0.5}} for e, w in zip(experts, (1.0, 0.7, 0.5))],
            "parameters": {"lambda": 1.0},
        },
        "linear": {
            "merge_method": "linear", "dtype": "bfloat16",
            "models": [{"model": e, "parameters": {"weight": w}} for e, w in zip(experts, (1.0, 0.7, 0.5))],
        },
    }  # fmt: skip


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of a whole process, from GNU time."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "evomerge_bench")
    parser.add_argument("--repeats", type=int, default=1, help="runs per tool and config; the best is kept")
    parser.add_argument("--tiny", action="store_true", help="a 0.2M-parameter model: checks the script runs")
    args = parser.parse_args()
    if args.tiny:
        SHAPE.update(TINY)
    bindir = Path(sys.executable).parent
    models = build_models(args.work)
    params = sum(t.numel() for t in load_file(models["base"] / "model.safetensors").values())
    print(f"synthetic Llama: {params / 1e6:.1f}M parameters, bf16, base + 3 experts in {args.work}")
    print(f"{'config':8} {'tool':10} {'wall s':>8} {'peak RSS MiB':>13}")
    rows = []
    for name, cfg in configs(models).items():
        cfg_path = args.work / f"{name}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        result = {}
        for tool in ("evomerge", "mergekit"):
            out = args.work / f"out_{name}_{tool}"
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
            print(f"{name:8} {tool:10} {best[0]:8.2f} {best[1]:13.0f}", flush=True)
        diff = max_diff(args.work / f"out_{name}_evomerge", args.work / f"out_{name}_mergekit")
        rows.append((name, result, diff))
    print("\nratios (mergekit / evomerge; > 1 means evomerge is better)")
    print(f"{'config':8} {'speed-up':>9} {'RSS ratio':>10} {'max |diff| (bf16 outputs)':>27}")
    for name, r, diff in rows:
        print(
            f"{name:8} {r['mergekit'][0] / r['evomerge'][0]:8.2f}x {r['mergekit'][1] / r['evomerge'][1]:9.2f}x {diff:27.2e}"
        )


if __name__ == "__main__":
    main()
