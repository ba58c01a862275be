"""A tensor some sources have and one lacks: refused whichever position the lacking model holds.

The output's tensor set is the union over the models a region reads (the base and every input; per slice,
through its layer ranges), never the first listed model's names: a tensor that one of them lacks is one
line naming that model and the tensor, exit 2, nothing written, in the CLI and in the search's in-place path.
A tied model (tie_word_embeddings, no lm_head.weight) is the exception mergekit 0.1.5 makes: its head is
its input embedding.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import run_mergekit
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.errors import ShapeMismatchError
from evomerge.merge.engine import ResidentPool, apply_in_place, merge_to_dir
from evomerge.merge.mergekit_io import recipe_from_dict

runner = CliRunner()
DOWN0 = "model.layers.0.mlp.down_proj.weight"
DOWN1 = "model.layers.1.mlp.down_proj.weight"
NORM = "model.norm.weight"
EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
POSITIONS = ["first", "later", "base"]


# ------------------------------------------------------------------------------------------- helpers


def _without(src: Path, dst: Path, name: str, tie: bool | None = None) -> Path:
    """A copy of model `src` whose safetensors lacks tensor `name` (config tie_word_embeddings set if given)."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    del tensors[name]
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    if tie is not None:
        cfg = json.loads((dst / "config.json").read_text())
        cfg["tie_word_embeddings"] = tie
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _models(tmp_path: Path, pool: dict[str, Path], position: str, name: str) -> dict[str, str]:
    """base, first and later source, with `name` deleted from the one at `position`."""
    refs = {"base": pool["base"], "first": pool["e0"], "later": pool["e1"]}
    refs[position] = _without(refs[position], tmp_path / f"no-{position}", name)
    return {k: str(v) for k, v in refs.items()}


def _task_arithmetic(m: dict[str, str]) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": m["base"], "parameters": {"lambda": 0.9},
            "models": [{"model": m["first"], "parameters": {"weight": 0.5}},
                       {"model": m["later"], "parameters": {"weight": 0.3}}]}  # fmt: skip


def _slices(m: dict[str, str], start: int = 1) -> dict:
    """Task arithmetic over layers [start, start + 2) of every model, written as output layers 0-1."""
    rng = [start, start + 2]
    return {"merge_method": "task_arithmetic", "base_model": m["base"], "slices": [{"sources": [
        {"model": m["first"], "layer_range": rng, "parameters": {"weight": 0.5}},
        {"model": m["later"], "layer_range": rng, "parameters": {"weight": 0.3}},
        {"model": m["base"], "layer_range": rng}]}]}  # fmt: skip


def _cli_refuses(tmp_path: Path, config: dict, *needles: str) -> None:
    """`evomerge merge` exits 2 with one line holding every needle, and leaves no output behind."""
    cfg, out = tmp_path / "merge.yaml", tmp_path / "out"
    cfg.write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["merge", str(cfg), str(out)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def _load_dir(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def _run_mergekit(config: dict, out: Path) -> dict[str, torch.Tensor]:
    """mergekit 0.1.5's own merge of the same mapping."""
    return _load_dir(run_mergekit(config, out))


# -------------------------------------------------------------------------------- refusals (CLI)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("name", [DOWN0, NORM, EMBED])
def test_models_recipe_refuses_a_missing_tensor_in_any_position(tmp_path, pool, position, name):
    m = _models(tmp_path, pool, position, name)
    _cli_refuses(tmp_path, _task_arithmetic(m), m[position], name, "missing")


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("name", [DOWN1, NORM])
def test_slices_recipe_refuses_a_missing_tensor_in_any_position(tmp_path, pool, position, name):
    """Layer 1 of every source becomes output layer 0: the message names the source's own tensor."""
    m = _models(tmp_path, pool, position, name)
    _cli_refuses(tmp_path, _slices(m), m[position], name, "missing")


@pytest.mark.parametrize("position", POSITIONS)
def test_slices_recipe_ignores_a_missing_tensor_outside_its_layer_ranges(tmp_path, pool, position):
    """Layer 0 of one source is not read by a slice over layers 1-2: the merge is complete without it."""
    m = _models(tmp_path, pool, position, DOWN0)
    out = merge_to_dir(recipe_from_dict(_slices(m)), tmp_path / "out")
    names = set(_load_dir(out))
    full = set(load_file(pool["base"] / "model.safetensors"))
    assert names == {n for n in full if ".layers." not in n or n.split(".")[2] in ("0", "1")}


def test_passthrough_stack_refuses_a_later_slice_missing_a_tensor(tmp_path, pool):
    """Per slice: the second slice's only source lacks a tensor the first slice's source has."""
    bad = _without(pool["e1"], tmp_path / "bad", DOWN1)
    config = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(pool["e0"]), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(bad), "layer_range": [1, 3]}]}]}  # fmt: skip
    _cli_refuses(tmp_path, config, str(bad), DOWN1)


def test_missing_tensor_refused_in_the_other_order_too(tmp_path, pool):
    """The first listed model has a tensor that a later one lacks, and the reverse: both refused alike."""
    bad = _without(pool["e1"], tmp_path / "bad", DOWN0)
    for order in ((pool["e0"], bad), (bad, pool["e0"])):
        config = {"merge_method": "linear",
                  "models": [{"model": str(r), "parameters": {"weight": 1.0}} for r in order]}  # fmt: skip
        _cli_refuses(tmp_path, config, str(bad), DOWN0)


# ---------------------------------------------------------------------------- refusals (in place)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("recipe_kind", ["models", "slices"])
def test_in_place_refuses_and_leaves_the_target_untouched(tmp_path, pool, position, recipe_kind):
    from transformers import AutoModelForCausalLM

    name = DOWN0 if recipe_kind == "models" else DOWN1
    m = _models(tmp_path, pool, position, name)
    recipe = recipe_from_dict(_task_arithmetic(m) if recipe_kind == "models" else _slices(m))
    rp = ResidentPool.from_refs(recipe.referenced_models())
    model = AutoModelForCausalLM.from_pretrained(pool["e2"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ShapeMismatchError, match="missing") as err:
        apply_in_place(recipe, rp, model)
    assert m[position] in str(err.value) and name in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------- tied embeddings


def _tied(tmp_path: Path, pool: dict[str, Path], which: tuple[str, ...]) -> dict[str, str]:
    """base/first/later, the ones in `which` saved tied (no lm_head.weight, tie_word_embeddings: true)."""
    refs = {"base": pool["base"], "first": pool["e0"], "later": pool["e1"]}
    for key in which:
        refs[key] = _without(refs[key], tmp_path / f"tied-{key}", HEAD, tie=True)
    return {k: str(v) for k, v in refs.items()}


def test_all_tied_merges_without_a_head_like_mergekit(tmp_path, pool):
    m = _tied(tmp_path, pool, ("base", "first", "later"))
    config = _task_arithmetic(m)
    ours = _load_dir(merge_to_dir(recipe_from_dict(config), tmp_path / "ours"))
    theirs = _run_mergekit(config, tmp_path / "theirs")
    assert HEAD not in ours and set(ours) == set(theirs)
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) <= 1e-5
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["tie_word_embeddings"] is True


@pytest.mark.parametrize("which", [("base",), ("first",), ("later",), ("base", "later")])
def test_mixed_tied_and_untied_merge_the_head_like_mergekit(tmp_path, pool, which):
    """A tied model's LM head is its input embedding (mergekit's `tied_names`), wherever it is listed; the
    output has its own head, so its config is untied (mergekit leaves the base's flag)."""
    m = _tied(tmp_path, pool, which)
    config = _task_arithmetic(m)
    ours = _load_dir(merge_to_dir(recipe_from_dict(config), tmp_path / "ours"))
    theirs = _run_mergekit(config, tmp_path / "theirs")
    assert HEAD in ours and set(ours) == set(theirs)
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) <= 1e-5
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["tie_word_embeddings"] is False


def test_a_head_missing_from_an_untied_model_is_refused(tmp_path, pool):
    """No lm_head.weight and tie_word_embeddings: false is a broken checkpoint, not a tied one."""
    m = _models(tmp_path, pool, "first", HEAD)
    _cli_refuses(tmp_path, _task_arithmetic(m), m["first"], HEAD, "missing")


def test_in_place_all_tied_equals_streamed(tmp_path, pool):
    from transformers import AutoModelForCausalLM

    m = _tied(tmp_path, pool, ("base", "first", "later"))
    recipe = recipe_from_dict(_task_arithmetic(m))
    streamed = _load_dir(merge_to_dir(recipe, tmp_path / "out"))
    model = AutoModelForCausalLM.from_pretrained(m["base"])
    apply_in_place(recipe, ResidentPool.from_refs(recipe.referenced_models()), model)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in streamed.items())
    assert torch.equal(state[HEAD], streamed[EMBED])


def test_in_place_refuses_a_separate_head_for_a_tied_target(tmp_path, pool):
    """A tied target cannot hold a head apart from its embedding: writing one would overwrite the embedding."""
    from transformers import AutoModelForCausalLM

    m = _tied(tmp_path, pool, ("base",))
    recipe = recipe_from_dict(_task_arithmetic(m))
    model = AutoModelForCausalLM.from_pretrained(m["base"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ShapeMismatchError, match="tie"):
        apply_in_place(recipe, ResidentPool.from_refs(recipe.referenced_models()), model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------ still complete


@pytest.mark.parametrize("order", [("e0", "e1"), ("e1", "e0")])
def test_complete_models_merge_every_tensor_in_either_order(tmp_path, pool, order):
    m = {"base": str(pool["base"]), "first": str(pool[order[0]]), "later": str(pool[order[1]])}
    out = _load_dir(merge_to_dir(recipe_from_dict(_task_arithmetic(m)), tmp_path / "out"))
    assert set(out) == set(load_file(pool["base"] / "model.safetensors"))
