"""Large models without large memory: `merge_to_dir` streams tensor by tensor, so the merge's memory is set
by the largest tensor, not by the model. Three synthetic sharded Llama-like checkpoints (~0.25 GiB each,
written shard by shard) are TIES-merged in a subprocess whose peak RSS (VmHWM) must stay within a few
shards of its RSS after imports, far below the size of one input model, let alone all of them.
`tools/bench_stream.py --gib N` runs the same at any size.
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

spec = importlib.util.spec_from_file_location(
    "bench_stream", Path(__file__).parents[2] / "tools/bench_stream.py"
)
bench_stream = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_stream)

SHARD = 32 * 1024**2


@pytest.mark.slow  # builds and merges a 100 MB model in a measured process (~8 s)
def test_streamed_merge_memory_is_a_few_shards_not_the_model(tmp_path):
    paths, model_bytes, largest = bench_stream.build(tmp_path, 0.25, 2, SHARD, hidden=512, vocab=2048)
    assert largest * 4 < SHARD  # a shard holds the largest tensor even in fp32
    inputs = model_bytes * len(paths)
    assert len(list(paths["base"].glob("*.safetensors"))) >= 6
    r = bench_stream.merge_subprocess(paths, "ties", tmp_path / "out", SHARD)
    working = r["peak"] - r["baseline"]
    assert working < 3 * SHARD, (
        f"{working / 2**20:.0f} MiB working set for {inputs / 2**20:.0f} MiB of inputs"
    )
    assert working < model_bytes / 2
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == model_bytes and len(set(index["weight_map"].values())) >= 6
    name = "model.layers.3.mlp.down_proj.weight"
    with safe_open(str(out / index["weight_map"][name]), "pt") as f:
        merged = f.get_tensor(name)
    base_file = json.loads((paths["base"] / "model.safetensors.index.json").read_text())["weight_map"][name]
    with safe_open(str(paths["base"] / base_file), "pt") as f:
        base = f.get_tensor(name)
    assert merged.dtype == torch.bfloat16 and merged.shape == base.shape
    delta = (merged.float() - base.float()).abs()
    assert 0 < delta.max() < 0.1 and math.isfinite(delta.sum().item())  # base + trimmed, signed expert deltas
