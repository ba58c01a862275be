import json
import shutil

import pytest
import torch
from helpers import make_llama
from safetensors.torch import load_file

from evomerge.checkpoints import Checkpoint
from evomerge.errors import ConfigError, MergeError, ShapeMismatchError
from evomerge.merge.engine import ResidentPool, apply_in_place, merge_to_dir, plan
from evomerge.merge.mergekit_io import recipe_from_dict


def _ties(pool, method="ties", seed=None, **extra):
    data = {
        "merge_method": method,
        "base_model": str(pool["base"]),
        "models": [
            {"model": str(pool["e0"]), "parameters": {"weight": [1.0, 0.4], "density": 0.5}},
            {"model": str(pool["e1"]), "parameters": {"weight": 0.7, "density": 0.6}},
        ],
        "parameters": {"lambda": 0.9},
        **extra,
    }
    if seed is not None:
        data["random_seed"] = seed
    return recipe_from_dict(data)


def _load_dir(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_in_place_equals_streamed(tmp_path, pool, method):
    from transformers import AutoModelForCausalLM

    recipe = _ties(pool, method, seed=3)
    streamed = _load_dir(merge_to_dir(recipe, tmp_path / "out"))
    model = AutoModelForCausalLM.from_pretrained(pool["base"])
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    rp = ResidentPool.from_refs(recipe.referenced_models())
    apply_in_place(recipe, rp, model)
    state = model.state_dict()
    for name, t in streamed.items():
        assert torch.equal(state[name], t), name
    assert pointers == {n: p.data_ptr() for n, p in model.named_parameters()}  # no new tensors


def test_in_place_candidates_switch_without_residue(pool):
    """Applying recipe B after A gives exactly B (a worker reuses one target model)."""
    from transformers import AutoModelForCausalLM

    a, b = _ties(pool), _ties(pool, "task_arithmetic")
    rp = ResidentPool.from_refs(a.referenced_models())
    m1, m2 = (
        AutoModelForCausalLM.from_pretrained(pool["base"]),
        AutoModelForCausalLM.from_pretrained(pool["e2"]),
    )
    apply_in_place(a, rp, m1)
    apply_in_place(b, rp, m1)
    apply_in_place(b, rp, m2)
    for (n, p), q in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(p, q), n


def test_merged_dir_loads_and_logits_match_in_place(tmp_path, pool):
    from transformers import AutoModelForCausalLM

    recipe = _ties(pool)
    out = merge_to_dir(recipe, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    resident = AutoModelForCausalLM.from_pretrained(pool["base"]).eval()
    apply_in_place(recipe, ResidentPool.from_refs(recipe.referenced_models()), resident)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, resident(ids).logits)
    assert (out / "evomerge_recipe.yaml").exists()


def test_sharded_output_equals_single_file(tmp_path, pool):
    recipe = _ties(pool)
    single = _load_dir(merge_to_dir(recipe, tmp_path / "one"))
    sharded_dir = merge_to_dir(recipe, tmp_path / "many", max_shard_bytes=30_000)
    index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert set(index["weight_map"]) == set(single)
    sharded = _load_dir(sharded_dir)
    assert all(torch.equal(sharded[k], v) for k, v in single.items())
    assert Checkpoint(sharded_dir).names  # our own reader takes the index


def test_output_dtype_is_applied_after_fp32_math(tmp_path, pool):
    recipe = _ties(pool)
    fp32 = _load_dir(merge_to_dir(recipe, tmp_path / "a"))
    bf16 = _load_dir(merge_to_dir(recipe, tmp_path / "b", dtype="bfloat16"))
    for k, v in fp32.items():
        assert bf16[k].dtype == torch.bfloat16
        assert torch.equal(bf16[k], v.to(torch.bfloat16))
    assert json.loads((tmp_path / "b" / "config.json").read_text()).get("dtype") == "bfloat16"


def test_random_methods_reproducible_and_seeded(tmp_path, pool):
    a = _load_dir(merge_to_dir(_ties(pool, "dare_ties", seed=1), tmp_path / "a"))
    b = _load_dir(merge_to_dir(_ties(pool, "dare_ties", seed=1), tmp_path / "b"))
    c = _load_dir(merge_to_dir(_ties(pool, "dare_ties", seed=2), tmp_path / "c"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_gradient_interpolates_over_layers(pool):
    recipe = _ties(pool, "task_arithmetic")
    jobs = {j.name: j for j in plan(recipe, {r: Checkpoint(r) for r in recipe.referenced_models()}).jobs}
    weights = [jobs[f"model.layers.{i}.mlp.up_proj.weight"].per_source["weight"][0] for i in range(4)]
    assert weights == pytest.approx([1.0, 0.8, 0.6, 0.4])
    assert jobs["model.embed_tokens.weight"].per_source["weight"][0] == pytest.approx(
        1.0
    )  # u = 0 outside layers


def test_existing_output_refused(tmp_path, pool):
    (tmp_path / "out").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        merge_to_dir(_ties(pool), tmp_path / "out")


def test_nan_source_fails_and_leaves_nothing(tmp_path, pool):
    bad = tmp_path / "nan"
    shutil.copytree(pool["e1"], bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.3.mlp.down_proj.weight"][0, 0] = float("nan")
    from safetensors.torch import save_file

    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    recipe = recipe_from_dict({"merge_method": "linear", "models": [
        {"model": str(pool["e0"]), "parameters": {"weight": 1}}, {"model": str(bad), "parameters": {"weight": 1}}]})  # fmt: skip
    with pytest.raises(MergeError, match="down_proj"):
        merge_to_dir(recipe, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan"]


def test_shape_mismatch_is_named(tmp_path, pool):
    wide = make_llama(tmp_path / "wide", 5, hidden=48)
    recipe = recipe_from_dict({"merge_method": "linear", "models": [
        {"model": str(pool["e0"]), "parameters": {"weight": 1}}, {"model": str(wide), "parameters": {"weight": 1}}]})  # fmt: skip
    with pytest.raises(ShapeMismatchError, match="shapes differ"):
        merge_to_dir(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_vocab_mismatch_rejected_then_truncated_on_request(tmp_path, pool):
    big = make_llama(tmp_path / "big", 0, vocab=80)
    recipe = recipe_from_dict({"merge_method": "linear", "models": [
        {"model": str(pool["base"]), "parameters": {"weight": 1}}, {"model": str(big), "parameters": {"weight": 1}}]})  # fmt: skip
    with pytest.raises(ShapeMismatchError, match="vocabulary sizes differ"):
        merge_to_dir(recipe, tmp_path / "out")
    out = _load_dir(merge_to_dir(recipe, tmp_path / "out", truncate_vocab=True))
    assert out["model.embed_tokens.weight"].shape == (64, 32)
    expected = (
        Checkpoint(pool["base"]).read("lm_head.weight") + Checkpoint(big).read("lm_head.weight")[:64]
    ) / 2
    torch.testing.assert_close(out["lm_head.weight"], expected)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 64


def test_passthrough_stacks_layers_and_renumbers(tmp_path, pool):
    recipe = recipe_from_dict({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(pool["e0"]), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(pool["e1"]), "layer_range": [1, 4]}]}]})  # fmt: skip
    out = _load_dir(merge_to_dir(recipe, tmp_path / "out"))
    e1 = Checkpoint(pool["e1"])
    assert torch.equal(out["model.layers.5.mlp.up_proj.weight"], e1.read("model.layers.3.mlp.up_proj.weight"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 6


def test_lora_source_merges_like_its_dense_model(tmp_path, pool):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(pool["base"]),
                                LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))  # fmt: skip
    peft_model.save_pretrained(tmp_path / "lora")
    peft_model.merge_and_unload().save_pretrained(tmp_path / "dense")

    def recipe(ref):
        return recipe_from_dict({"merge_method": "task_arithmetic", "base_model": str(pool["base"]), "models": [
            {"model": ref, "parameters": {"weight": 0.5}}, {"model": str(pool["e0"]), "parameters": {"weight": 0.5}}]})  # fmt: skip

    via_lora = _load_dir(merge_to_dir(recipe(str(tmp_path / "lora")), tmp_path / "a"))
    via_dense = _load_dir(merge_to_dir(recipe(str(tmp_path / "dense")), tmp_path / "b"))
    for k in via_dense:
        torch.testing.assert_close(via_lora[k], via_dense[k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["task_arithmetic", "linear"])
def test_linear_form_in_place_matches_streamed_and_the_formula(tmp_path, pool, method):
    """Task arithmetic and linear run as one matrix-vector product over the stacked pool, in place."""
    from transformers import AutoModelForCausalLM

    experts = [str(pool[e]) for e in ("e0", "e1", "e2")]
    recipe = recipe_from_dict({"merge_method": method, "base_model": str(pool["base"]),
                               "parameters": {"lambda": 0.8} if method == "task_arithmetic" else {},
                               "models": [{"model": e, "parameters": {"weight": w}} for e, w in zip(experts, (0.5, 0.3, 0.4))]
                               + ([{"model": str(pool["base"]), "parameters": {"weight": 0.2}}] if method == "linear" else [])})  # fmt: skip
    rp = ResidentPool.from_refs([*experts, str(pool["base"])])
    model = AutoModelForCausalLM.from_pretrained(pool["base"])
    apply_in_place(recipe, rp, model)
    streamed = _load_dir(merge_to_dir(recipe, tmp_path / "out"))
    state = model.state_dict()
    name = "model.layers.1.mlp.down_proj.weight"
    base, xs = Checkpoint(pool["base"]).read(name), [Checkpoint(e).read(name) for e in experts]
    if method == "task_arithmetic":
        expected = base + 0.8 * sum(w * (x - base) for w, x in zip((0.5, 0.3, 0.4), xs))
    else:
        expected = (0.5 * xs[0] + 0.3 * xs[1] + 0.4 * xs[2] + 0.2 * base) / 1.4
    torch.testing.assert_close(state[name], expected, rtol=1e-5, atol=1e-6)
    for k, v in streamed.items():
        assert torch.equal(state[k], v), k


def test_stack_buffer_reuses_its_buffer_for_stacks_of_at_least_half_its_size():
    from evomerge.merge.engine import SMALL_STACK, StackBuffer

    cpu, n = torch.device("cpu"), SMALL_STACK
    scratch = StackBuffer()
    first = scratch((3, n), cpu)
    same = scratch((2, 3 * n // 2), cpu)  # the same number of elements, another shape
    smaller = scratch((2, n), cpu)  # two thirds of the buffer
    assert first.data_ptr() == same.data_ptr() == smaller.data_ptr()
    assert smaller.shape == (2, n) and smaller.dtype == torch.float32
    scratch((1, n), cpu)  # a third: a buffer of its own size replaces the big one
    assert scratch.buffer.numel() == n
    scratch((4, n), cpu)  # larger: replaced too
    assert scratch.buffer.numel() == 4 * n
    tiny = scratch((2, 7), cpu)  # small stacks come from the heap and leave the buffer alone
    assert tiny.shape == (2, 7) and scratch.buffer.numel() == 4 * n
