"""Worker placement and pool dtype: what a GPU worker does, checked on the CPU (no GPU in CI).

A worker resolves `device: auto` to CUDA only when CUDA exists and (inside Ray) its actor reserved GPUs;
`workers.pool_dtype` stores the resident sources in bf16/fp16 while merges still accumulate in fp32.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from evomerge.checkpoints import Checkpoint
from evomerge.config import parse_config
from evomerge.errors import ConfigError
from evomerge.merge.engine import FP32_CHUNK, ResidentPool, apply_in_place, combine_into
from evomerge.merge.mergekit_io import recipe_from_dict
from evomerge.runtime.run import backend_spec
from evomerge.runtime.worker import MergeBackendSpec, resolve_device


def _data(pool, **workers):
    return {
        "models": {"base": str(pool["base"]), "sources": [str(pool["e0"]), str(pool["e1"])]},
        "evaluator": {"type": "digits"},
        "budget": {"candidates": 2},
        "workers": workers,
    }


def _task_arithmetic(pool, weights=(0.5, 0.3, 0.4)):
    experts = [str(pool[e]) for e in ("e0", "e1", "e2")]
    return recipe_from_dict({
        "merge_method": "task_arithmetic", "base_model": str(pool["base"]),
        "models": [{"model": e, "parameters": {"weight": w}} for e, w in zip(experts, weights)],
    }), [*experts, str(pool["base"])]  # fmt: skip


def test_auto_device_is_cpu_without_cuda_and_explicit_devices_are_kept():
    if not torch.cuda.is_available():
        assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("cuda:1") == "cuda:1"


def test_cuda_device_needs_a_gpu_reservation(pool):
    with pytest.raises(ConfigError, match="workers.num_gpus > 0"):
        parse_config({**_data(pool), "device": "cuda"}, "run.yaml")
    cfg = parse_config({**_data(pool, num_gpus=0.25, count=4), "device": "cuda"}, "run.yaml")
    assert cfg.workers.num_gpus == 0.25  # fractional: four workers share one GPU


def test_dtypes_reach_the_backend_spec_and_bad_ones_are_named(pool):
    cfg = parse_config(_data(pool, pool_dtype="bfloat16", model_dtype="float16"), "run.yaml")
    spec = backend_spec(cfg, cfg.models.base, list(cfg.models.sources))
    assert isinstance(spec, MergeBackendSpec)
    assert (spec.pool_dtype, spec.model_dtype, spec.device) == ("bfloat16", "float16", "auto")
    with pytest.raises(ConfigError, match="workers.pool_dtype"):
        parse_config(_data(pool, pool_dtype="int8"), "run.yaml")
    default = backend_spec(parse_config(_data(pool), "x"), cfg.models.base, list(cfg.models.sources))
    assert (default.pool_dtype, default.model_dtype) == ("float32", "float32")  # CPU behaviour unchanged


def test_bf16_pool_accumulates_in_fp32():
    """The sum runs in fp32 on bf16 inputs (exact coefficients, no bf16 rounding between terms), also
    across chunk boundaries; a bf16 target gets that fp32 sum rounded once."""
    gen = torch.Generator().manual_seed(0)
    n = FP32_CHUNK + 1000
    stacked = torch.randn(4, n, generator=gen).to(torch.bfloat16)
    coefficients = [0.3, -0.7, 0.11, 1.3]
    full = combine_into(coefficients, stacked, torch.empty(n, dtype=torch.float32))
    expected = sum(c * stacked[i].double() for i, c in enumerate(coefficients))
    torch.testing.assert_close(full.double(), expected, rtol=0, atol=1e-5)
    half = combine_into(coefficients, stacked, torch.empty(n, dtype=torch.bfloat16))
    assert torch.equal(half, full.to(torch.bfloat16))


def test_bf16_pool_in_place_is_the_fp32_merge_of_bf16_sources(pool):
    recipe, refs = _task_arithmetic(pool)
    fp32_pool = ResidentPool.from_refs(refs)
    bf16_pool = ResidentPool.from_refs(refs, dtype=torch.bfloat16)
    assert bf16_pool.dtype == torch.bfloat16 and all(
        s.dtype == torch.bfloat16 for s in bf16_pool.stacked.values()
    )
    exact, half = (AutoModelForCausalLM.from_pretrained(pool["base"]) for _ in range(2))
    apply_in_place(recipe, fp32_pool, exact)
    apply_in_place(recipe, bf16_pool, half)
    name = "model.layers.1.mlp.down_proj.weight"
    base = Checkpoint(pool["base"]).read(name).to(torch.bfloat16).float()
    xs = [Checkpoint(pool[e]).read(name).to(torch.bfloat16).float() for e in ("e0", "e1", "e2")]
    expected = base + sum(w * (x - base) for w, x in zip((0.5, 0.3, 0.4), xs))
    torch.testing.assert_close(half.state_dict()[name], expected, rtol=1e-5, atol=1e-6)
    for (n, a), b in zip(exact.state_dict().items(), half.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0.02, msg=n)  # within bf16 rounding of the sources


def test_backend_on_cpu_with_a_bf16_pool_and_model(tmp_path):
    """A digits worker built as a GPU worker would be (pool and target dtypes), on the CPU."""
    from evomerge.digits_mlp import DigitsMLP
    from evomerge.evaluate.digits import DigitsSpec, save_digits_checkpoint
    from evomerge.merge.mixture import Mixture

    paths = []
    for seed in range(3):
        torch.manual_seed(seed)
        paths.append(save_digits_checkpoint(DigitsMLP(), tmp_path / f"m{seed}"))
    spec = MergeBackendSpec(str(paths[0]), (str(paths[1]), str(paths[2])), DigitsSpec(),
                            pool_dtype="bfloat16", model_dtype="bfloat16")  # fmt: skip
    backend = spec.build()
    assert backend.device == "cpu" or torch.cuda.is_available()
    assert {p.dtype for p in backend.model.parameters()} == {torch.bfloat16}
    mix = Mixture(models=[str(paths[1]), str(paths[2])], starts=[0], coefficients=[[0.5, 0.5]],
                  size=backend.layout.size)  # fmt: skip
    ev = backend.evaluate(mix)
    assert 0.0 <= ev.scores["digits"] <= 1.0
