"""evomerge vs mergekit 0.1.5 on tiny random Llamas: the same YAML mapping through both tools.

Deterministic methods must give the same tensor names and values (fp32, max abs diff <= 1e-5). Random
methods (DARE, DELLA) draw different masks by design, so their statistics are compared instead: the
fraction of entries changed from the base tracks the density, the L1 rescale keeps the delta's L1 norm,
and evomerge is reproducible from `random_seed`.

mergekit runs in-process (`run_merge`); its global RNG seeding is undone after each run.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import make_pool, run_mergekit
from safetensors.torch import load_file

from evomerge.merge.engine import merge_to_dir
from evomerge.merge.mergekit_io import load_recipe, recipe_from_dict
from evomerge.merge.methods import METHODS

TOL = 1e-5
MLP_FILTER = [{"filter": "mlp", "value": 0.2}, {"value": 1.0}]
ATTN_FILTER = [{"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]}, {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]}, {"value": 0.5}]  # fmt: skip


# ------------------------------------------------------------------------------------------- helpers


def run_evomerge(config: dict[str, Any], out: Path) -> Path:
    return merge_to_dir(recipe_from_dict(config), out)


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(f))
    assert tensors, f"no safetensors in {path}"
    return tensors


def num_layers(path: Path) -> int:
    return json.loads((path / "config.json").read_text())["num_hidden_layers"]


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# ---------------------------------------------------------------------------------- deterministic


Case = Callable[[dict[str, str]], dict[str, Any]]


def _models(p: dict[str, str], *entries: tuple[str, dict[str, Any] | None]) -> list[dict[str, Any]]:
    return [{"model": p[name], **({"parameters": params} if params else {})} for name, params in entries]


def _gta(method: str, **global_params: Any) -> Case:
    """A task-arithmetic-family merge: base + 3 experts with scalar, gradient and filter-list settings."""

    def build(p: dict[str, str]) -> dict[str, Any]:
        return {
            "merge_method": method,
            "base_model": p["base"],
            "models": _models(
                p,
                ("e0", {"weight": 0.5, "density": 0.6, "gamma": 0.02}),
                ("e1", {"weight": [1.0, 0.3], "density": [0.3, 0.8], "gamma": 0.05}),
                ("e2", {"weight": MLP_FILTER, "density": [{"filter": "self_attn", "value": 0.4}, {"value": 0.7}]}),
            ),
            **({"parameters": global_params} if global_params else {}),
            "dtype": "float32",
        }  # fmt: skip

    return build


def _strip_unused(method: str, config: dict[str, Any]) -> dict[str, Any]:
    """Drop the per-model parameters the method does not declare (gamma for TIES, density for TA)."""
    keep = {p.name for p in METHODS.get(method).params}
    for m in config.get("models", []):
        if "parameters" in m:
            m["parameters"] = {k: v for k, v in m["parameters"].items() if k in keep}
    return config


DETERMINISTIC: dict[str, Case] = {
    "linear": lambda p: {
        "merge_method": "linear",
        "models": _models(p, ("e0", {"weight": 0.5}), ("e1", {"weight": [1.0, 0.3]}), ("e2", {"weight": MLP_FILTER})),
        "dtype": "float32",
    },
    "linear-base-unnormalized": lambda p: {
        "merge_method": "linear",
        "base_model": p["base"],
        "models": _models(p, ("base", {"weight": 0.4}), ("e0", {"weight": [0.2, 0.9]}), ("e1", {"weight": 0.3})),
        "parameters": {"normalize": False},
        "dtype": "float32",
    },
    "linear-slices-gradient-restarts": lambda p: {
        "merge_method": "linear",
        "slices": [
            {"sources": [{"model": p["e0"], "layer_range": [0, 2], "parameters": {"weight": [0.1, 0.9]}},
                         {"model": p["e1"], "layer_range": [0, 2], "parameters": {"weight": 0.5}}]},
            # e0 gets the slice's gradient on mlp tensors and falls through to the recipe's weight elsewhere
            {"sources": [{"model": p["e0"], "layer_range": [2, 4]},
                         {"model": p["e1"], "layer_range": [2, 4], "parameters": {"weight": 0.3}}],
             "parameters": {"weight": [{"filter": "mlp", "value": [1.0, 0.2, 0.6]}]}},
        ],
        "parameters": {"weight": 2.0},
        "dtype": "float32",
    },
    "task_arithmetic": lambda p: _strip_unused("task_arithmetic", _gta("task_arithmetic", **{"lambda": 0.8})(p)),
    "task_arithmetic-normalize": lambda p: _strip_unused(
        "task_arithmetic", _gta("task_arithmetic", normalize=True, **{"lambda": [0.5, 1.5]})(p)
    ),
    "ties": lambda p: _strip_unused("ties", _gta("ties")(p)),
    "ties-unnormalized-lambda": lambda p: _strip_unused("ties", _gta("ties", normalize=False, **{"lambda": 1.2})(p)),
    "breadcrumbs": lambda p: _gta("breadcrumbs")(p),
    "breadcrumbs_ties": lambda p: _gta("breadcrumbs_ties", rescale=True, normalize=True)(p),
    "sce": lambda p: {
        "merge_method": "sce",
        "base_model": p["base"],
        "models": _models(p, ("e0", None), ("e1", None), ("e2", None)),
        "parameters": {"select_topk": 0.4},
        "dtype": "float32",
    },
    "sce-topk-filter": lambda p: {
        "merge_method": "sce",
        "base_model": p["base"],
        "models": _models(p, ("e0", None), ("e1", None)),
        "parameters": {"select_topk": [{"filter": "mlp", "value": [0.2, 0.9]}, {"value": 1.0}]},
        "dtype": "float32",
    },
    "model_stock": lambda p: {
        "merge_method": "model_stock",
        "base_model": p["base"],
        "models": _models(p, ("e0", None), ("e1", None), ("e2", None)),
        "dtype": "float32",
    },
    "model_stock-filter_wise": lambda p: {
        "merge_method": "model_stock",
        "base_model": p["base"],
        "models": _models(p, ("e0", None), ("e1", None), ("e2", None)),
        "parameters": {"filter_wise": True},
        "dtype": "float32",
    },
    "slerp-models-gradient": lambda p: {
        "merge_method": "slerp",
        "base_model": p["base"],
        "models": _models(p, ("base", None), ("e0", None)),
        "parameters": {"t": [0.0, 0.3, 1.0]},
        "dtype": "float32",
    },
    "slerp-slices": lambda p: {
        "merge_method": "slerp",
        "slices": [{"sources": [{"model": p["e1"], "layer_range": [0, 4]}, {"model": p["e0"], "layer_range": [0, 4]}]}],
        "base_model": p["e1"],
        "parameters": {"t": ATTN_FILTER},
        "dtype": "float32",
    },
    "slerp-slices-slice-base": lambda p: {
        "merge_method": "slerp",
        "slices": [
            {"sources": [{"model": p["base"], "layer_range": [0, 2]}, {"model": p["e2"], "layer_range": [2, 4]}],
             "base_model": p["base"], "parameters": {"t": 0.25}},
            {"sources": [{"model": p["base"], "layer_range": [2, 4]}, {"model": p["e2"], "layer_range": [0, 2]}],
             "base_model": p["e2"], "parameters": {"t": [0.9, 0.1]}},
        ],
        "base_model": p["base"],
        "dtype": "float32",
    },
    "nuslerp-base": lambda p: {
        "merge_method": "nuslerp",
        "base_model": p["base"],
        "models": _models(p, ("e0", {"weight": 0.3}), ("e1", {"weight": [0.7, 0.2]})),
        "dtype": "float32",
    },
    "nuslerp-no-base": lambda p: {
        "merge_method": "nuslerp",
        "models": _models(p, ("e0", {"weight": 1.0}), ("e2", {"weight": MLP_FILTER})),
        "dtype": "float32",
    },
    "nuslerp-row-wise": lambda p: {
        "merge_method": "nuslerp",
        "models": _models(p, ("e0", {"weight": 0.6}), ("e1", {"weight": 0.4})),
        "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
        "dtype": "float32",
    },
    "nuslerp-per-row": lambda p: {
        "merge_method": "nuslerp",
        "base_model": p["base"],
        "models": _models(p, ("e0", {"weight": 0.6}), ("e1", {"weight": 0.4})),
        "parameters": {"nuslerp_flatten": False},
        "dtype": "float32",
    },
    "multislerp-base": lambda p: {
        "merge_method": "multislerp",
        "base_model": p["base"],
        "models": _models(p, ("e0", {"weight": 0.5}), ("e1", {"weight": [1.0, 0.3]}), ("e2", {"weight": 0.2})),
        "dtype": "float32",
    },
    "multislerp-no-base": lambda p: {
        "merge_method": "multislerp",
        "models": _models(p, ("e0", {"weight": 1.0}), ("e1", {"weight": 2.0}), ("e2", {"weight": MLP_FILTER})),
        "parameters": {"normalize_weights": False},
        "dtype": "float32",
    },
    "karcher": lambda p: {
        "merge_method": "karcher",
        "models": _models(p, ("e0", None), ("e1", None), ("e2", None)),
        "parameters": {"max_iter": 2, "tol": 1e-6},
        "dtype": "float32",
    },
    "karcher-base-appended": lambda p: {
        "merge_method": "karcher",
        "base_model": p["base"],
        "models": _models(p, ("e0", None), ("e1", None)),
        "dtype": "float32",
    },
    "passthrough-scale": lambda p: {
        "merge_method": "passthrough",
        "models": _models(p, ("e1", {"scale": [{"filter": "o_proj", "value": 0.5}, {"filter": "down_proj", "value": [0.0, 1.0]}]})),
        "dtype": "float32",
    },
}  # fmt: skip

COVERED = {case.split("-")[0] for case in DETERMINISTIC} | {"passthrough"}
RANDOM_METHODS = ("dare_ties", "dare_linear", "della", "della_linear")


def test_every_shared_method_is_covered():
    shared = {name for name in METHODS.names() if METHODS.get(name).in_mergekit}
    assert shared == COVERED | set(RANDOM_METHODS)
    assert {name for name in shared if METHODS.get(name).random} == set(RANDOM_METHODS)


def _compare(config: dict[str, Any], tmp_path: Path, case: str) -> tuple[Path, Path]:
    mk = run_mergekit(config, tmp_path / "mk")
    evo = run_evomerge(config, tmp_path / "evo")
    a, b = load_dir(mk), load_dir(evo)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].shape == b[name].shape, name
        assert a[name].dtype == b[name].dtype == torch.float32, name
    diff = max_abs_diff(a, b)
    worst = max(a, key=lambda k: float((a[k] - b[k]).abs().max()))
    assert diff <= TOL, f"{case}: max abs diff {diff:.3g} at {worst}"
    assert json.loads((mk / "config.json").read_text()) == json.loads((evo / "config.json").read_text())
    return mk, evo


@pytest.mark.parametrize("case", list(DETERMINISTIC))
def test_deterministic_matches_mergekit(case, pool, tmp_path):
    config = DETERMINISTIC[case]({k: str(v) for k, v in pool.items()})
    _compare(config, tmp_path, case)


@pytest.fixture(scope="module")
def pool_bf16(tmp_path_factory) -> dict[str, str]:
    """The same shapes stored in bf16, as real checkpoints are: many |delta| values tie exactly."""
    pool = make_pool(tmp_path_factory.mktemp("pool_bf16"), dtype=torch.bfloat16)
    return {k: str(v) for k, v in pool.items()}


TIE_BREAK = pytest.mark.xfail(
    strict=True,
    reason="methods.py breaks ties in |delta| (top_k_mask, breadcrumbs_prune) by lowest index (stable sort); "
    "mergekit keeps whichever tied entries torch.argsort(descending=True) / torch.sort / torch.topk return "
    "(unstable), so bf16 sources select different entries at the density threshold",
)
BF16_XFAIL = {"ties", "ties-unnormalized-lambda", "breadcrumbs", "breadcrumbs_ties", "sce-topk-filter"}


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=TIE_BREAK) if c in BF16_XFAIL else c for c in DETERMINISTIC]
)
def test_bf16_sources_match_mergekit(case, pool_bf16, tmp_path):
    """bf16 checkpoints with `dtype: float32`: both tools upcast and compute in fp32."""
    _compare(DETERMINISTIC[case](pool_bf16), tmp_path, f"bf16:{case}")


def test_passthrough_frankenmerge(pool, tmp_path):
    """Stack e0's layers 0-2 under e1's layers 1-3: 6 output layers, each a verbatim copy."""
    p = {k: str(v) for k, v in pool.items()}
    config = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": p["e0"], "layer_range": [0, 3]}]},
            {"sources": [{"model": p["e1"], "layer_range": [1, 4]}]},
        ],
        "dtype": "float32",
    }
    mk, evo = _compare(config, tmp_path, "passthrough-frankenmerge")
    assert num_layers(evo) == num_layers(mk) == 6
    out, e0, e1 = load_dir(evo), load_dir(pool["e0"]), load_dir(pool["e1"])
    torch.testing.assert_close(
        out["model.layers.2.mlp.up_proj.weight"], e0["model.layers.2.mlp.up_proj.weight"]
    )
    torch.testing.assert_close(
        out["model.layers.3.mlp.up_proj.weight"], e1["model.layers.1.mlp.up_proj.weight"]
    )
    torch.testing.assert_close(out["model.embed_tokens.weight"], e0["model.embed_tokens.weight"])
    torch.testing.assert_close(out["lm_head.weight"], e1["lm_head.weight"])


@pytest.mark.parametrize("out_dtype", ["bfloat16", "float16"])
def test_out_dtype_matches_mergekit(out_dtype, pool, tmp_path):
    """fp32 math, cast once at the end: the same rounding in both tools."""
    config = DETERMINISTIC["ties"]({k: str(v) for k, v in pool.items()}) | {"out_dtype": out_dtype}
    a = load_dir(run_mergekit(config, tmp_path / "mk"))
    b = load_dir(run_evomerge(config, tmp_path / "evo"))
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype == getattr(torch, out_dtype), name
        assert torch.equal(a[name], b[name]), name
    cfg_a = json.loads((tmp_path / "mk" / "config.json").read_text())
    cfg_b = json.loads((tmp_path / "evo" / "config.json").read_text())
    assert (
        cfg_a.get("torch_dtype", cfg_a.get("dtype"))
        == cfg_b.get("torch_dtype", cfg_b.get("dtype"))
        == out_dtype
    )


@pytest.fixture(scope="module")
def pool_tok(pool, tmp_path_factory) -> dict[str, str]:
    """base and e0 with a tiny word-level tokenizer (64 tokens, the models' vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("pool_tok")
    out = {}
    for name in ("base", "e0"):
        shutil.copytree(pool[name], root / name)
        vocab = {"<unk>": 0, "<s>": 1, **{f"w{i}": i + 2 for i in range(62)}}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>").save_pretrained(
            root / name
        )
        out[name] = str(root / name)
    return out


def _tok_config(p: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {
        "merge_method": "task_arithmetic",
        "base_model": p["base"],
        "models": [{"model": p["e0"], "parameters": {"weight": 0.7}}],
        "dtype": "float32",
        **extra,
    }


@pytest.mark.parametrize("source", ["base", "e0"])
def test_tokenizer_source_matches_mergekit(source, pool_tok, tmp_path):
    """`tokenizer_source: base` (the literal) and a model path: same tokenizer, config and tensors."""
    from transformers import AutoTokenizer

    config = _tok_config(pool_tok, tokenizer_source="base" if source == "base" else pool_tok[source])
    mk, evo = _compare(config, tmp_path, f"tokenizer_source:{source}")
    assert (evo / "tokenizer.json").read_bytes() == (Path(pool_tok[source]) / "tokenizer.json").read_bytes()
    assert AutoTokenizer.from_pretrained(mk).get_vocab() == AutoTokenizer.from_pretrained(evo).get_vocab()


def test_chat_template_matches_mergekit(pool_tok, tmp_path):
    from transformers import AutoTokenizer

    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    mk, evo = _compare(
        _tok_config(pool_tok, tokenizer_source="base", chat_template=template), tmp_path, "chat"
    )
    assert AutoTokenizer.from_pretrained(mk).chat_template == template
    assert AutoTokenizer.from_pretrained(evo).chat_template == template


# --------------------------------------------------------------------------------------- random


DENSITY = 0.3


def _single_expert(method: str, p: dict[str, str], *, rescale: bool, seed: int | None = 11) -> dict[str, Any]:
    params: dict[str, Any] = {"weight": 1.0, "density": DENSITY}
    if method.startswith("della"):
        params["epsilon"] = 0.1
    config = {
        "merge_method": method,
        "base_model": p["base"],
        "models": [{"model": p["e0"], "parameters": params}],
        "parameters": {"rescale": rescale},
        "dtype": "float32",
    }
    if seed is not None:
        config["random_seed"] = seed
    return config


def _without_seed(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != "random_seed"}


def _changed_fraction(merged: torch.Tensor, base: torch.Tensor) -> float:
    return float((merged != base).double().mean())


def _della_half_rates(out: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                      expert: dict[str, torch.Tensor]) -> tuple[float, float]:  # fmt: skip
    """Keep rate of the smaller and of the larger half (by |delta| rank within a row) over 2-D tensors."""
    kept = {False: [0, 0], True: [0, 0]}
    for name, b in base.items():
        if b.dim() != 2:
            continue
        ranks = (expert[name] - b).abs().argsort(dim=1).argsort(dim=1)
        changed = out[name] != b
        for large in (False, True):
            half = ranks >= b.shape[1] // 2 if large else ranks < b.shape[1] // 2
            kept[large][0] += int((changed & half).sum())
            kept[large][1] += int(half.sum())
    return kept[False][0] / kept[False][1], kept[True][0] / kept[True][1]


@pytest.mark.parametrize("method", RANDOM_METHODS)
@pytest.mark.parametrize("rescale", [False, True], ids=["plain", "rescale"])
def test_random_method_statistics(method, rescale, pool, tmp_path):
    """One expert with weight 1: merged = base + mask * delta (* L1 factor); the mask's keep rate is the
    density (DELLA: on average over a row), per tensor and over the whole model, in both tools."""
    p = {k: str(v) for k, v in pool.items()}
    config = _single_expert(method, p, rescale=rescale)
    evo = load_dir(run_evomerge(config, tmp_path / "evo"))
    mk = load_dir(run_mergekit(_without_seed(config), tmp_path / "mk", seed=11))
    base, expert = load_dir(pool["base"]), load_dir(pool["e0"])
    assert sorted(evo) == sorted(mk) == sorted(base)
    changed = {"evo": [0, 0], "mk": [0, 0]}
    for name, b in base.items():
        n = b.numel()
        # binomial spread of the kept count; 5 sigma plus one entry of slack
        tol = 5 * math.sqrt(DENSITY * (1 - DENSITY) / n) + 1 / n
        delta = expert[name] - b
        for tool, out in (("evo", evo), ("mk", mk)):
            merged = out[name]
            frac = _changed_fraction(merged, b)
            assert abs(frac - DENSITY) <= tol, f"{tool} {name}: changed {frac:.3f}, density {DENSITY}"
            changed[tool][0] += int((merged != b).sum())
            changed[tool][1] += n
            kept = merged != b
            if rescale:
                # the L1 rescale restores the delta's L1 norm exactly (up to rounding of base + delta)
                torch.testing.assert_close((merged - b).abs().sum(), delta.abs().sum(), rtol=1e-4, atol=1e-6)
            else:
                # kept entries are the expert's own values
                torch.testing.assert_close(merged[kept], expert[name][kept], rtol=0, atol=1e-6)
        if rescale:
            l1_evo, l1_mk = (evo[name] - b).abs().sum(), (mk[name] - b).abs().sum()
            torch.testing.assert_close(l1_evo, l1_mk, rtol=1e-4, atol=1e-6)
    if method.startswith("della"):
        # MagPrune: keep probability rises with the magnitude rank within a row, d - eps .. d + eps, so the
        # larger half of each row is kept at about d + eps/2 and the smaller half at about d - eps/2
        for tool, out in (("evo", evo), ("mk", mk)):
            small, large = _della_half_rates(out, base, expert)
            assert small == pytest.approx(DENSITY - 0.05, abs=0.02), (tool, small)
            assert large == pytest.approx(DENSITY + 0.05, abs=0.02), (tool, large)
    totals = {tool: c / n for tool, (c, n) in changed.items()}
    total_n = changed["evo"][1]
    for tool, frac in totals.items():
        assert abs(frac - DENSITY) <= 5 * math.sqrt(DENSITY * (1 - DENSITY) / total_n), (tool, frac)
    assert abs(totals["evo"] - totals["mk"]) <= 0.02


@pytest.mark.parametrize("method", RANDOM_METHODS)
def test_random_method_multi_expert_statistics(method, pool, tmp_path):
    """Three experts with per-model densities: the L1 norm of (merged - base) per tensor, summed over the
    model, agrees with mergekit's within a few percent (different masks, same distribution)."""
    p = {k: str(v) for k, v in pool.items()}
    extra = {"epsilon": 0.1} if method.startswith("della") else {}
    config = {
        "merge_method": method,
        "base_model": p["base"],
        "models": _models(
            p,
            ("e0", {"weight": 0.5, "density": 0.3, **extra}),
            ("e1", {"weight": 0.8, "density": [0.5, 0.7], **extra}),
            ("e2", {"weight": MLP_FILTER, "density": 0.4, **extra}),
        ),
        "dtype": "float32",
    }
    evo = load_dir(run_evomerge({**config, "random_seed": 3}, tmp_path / "evo"))
    mk = load_dir(run_mergekit(config, tmp_path / "mk", seed=3))
    base = load_dir(pool["base"])
    assert sorted(evo) == sorted(mk)
    l1_evo = sum(float((evo[n] - b).abs().sum()) for n, b in base.items())
    l1_mk = sum(float((mk[n] - b).abs().sum()) for n, b in base.items())
    assert l1_evo == pytest.approx(l1_mk, rel=0.05)
    frac_evo = sum(int((evo[n] != b).sum()) for n, b in base.items())
    frac_mk = sum(int((mk[n] != b).sum()) for n, b in base.items())
    assert frac_evo == pytest.approx(frac_mk, rel=0.05)


@pytest.mark.parametrize("method", RANDOM_METHODS)
def test_random_method_reproducible(method, pool, tmp_path):
    p = {k: str(v) for k, v in pool.items()}
    config = _single_expert(method, p, rescale=True, seed=5)
    a = load_dir(run_evomerge(config, tmp_path / "a"))
    b = load_dir(run_evomerge(config, tmp_path / "b"))
    c = load_dir(run_evomerge({**config, "random_seed": 6}, tmp_path / "c"))
    assert sorted(a) == sorted(b) == sorted(c)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # every tensor with more than a handful of entries gets a different mask under another seed
    for name in a:
        if a[name].numel() >= 64:
            assert not torch.equal(a[name], c[name]), name
    # the recipe written beside the output carries the seed: merging it again reproduces the output
    again = load_dir(merge_to_dir(load_recipe(tmp_path / "a" / "evomerge_recipe.yaml"), tmp_path / "d"))
    assert all(torch.equal(a[n], again[n]) for n in a)
