import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import make_llama
from safetensors.torch import load_file, save_file

from evomerge.checkpoints import Checkpoint, LoraCheckpoint, open_source, read_safetensors_header
from evomerge.errors import CheckpointError, ShapeMismatchError


def test_lists_names_shapes_dtypes_from_headers(pool):
    ckpt = Checkpoint(pool["e0"])
    stored = load_file(pool["e0"] / "model.safetensors")
    assert set(ckpt.names) == set(stored)
    for name, t in stored.items():
        assert ckpt.tensors[name].shape == tuple(t.shape)
        assert ckpt.tensors[name].dtype == t.dtype
    assert ckpt.architecture == "LlamaForCausalLM"
    assert ckpt.num_layers == 4


def test_reads_one_tensor_equal_to_stored(pool):
    name = "model.layers.2.mlp.up_proj.weight"
    stored = load_file(pool["e1"] / "model.safetensors")[name]
    assert torch.equal(Checkpoint(pool["e1"]).read(name), stored)


def test_read_into_fills_a_slot_straight_from_the_file_or_casts_like_read(pool):
    ckpt = Checkpoint(pool["e1"])
    name = "model.layers.0.mlp.down_proj.weight"
    stored = load_file(pool["e1"] / "model.safetensors")[name]
    stack = torch.full((2, *stored.shape), float("nan"), dtype=stored.dtype)
    ckpt.read_into(name, stack[1])  # a contiguous slot of the stored dtype: read directly
    assert torch.equal(stack[1], stored) and stack[0].isnan().all()
    wide = torch.empty(stored.shape, dtype=torch.float64)
    ckpt.read_into(name, wide)  # another dtype: read, then cast
    assert torch.equal(wide, stored.double())
    with pytest.raises(RuntimeError):
        ckpt.read_into(name, torch.empty(3, dtype=stored.dtype))  # a wrong shape is not written into


def test_sharded_checkpoint_reads_every_shard(tmp_path, pool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(pool["e0"])
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ckpt = Checkpoint(tmp_path / "sharded")
    assert len({info.file for info in ckpt.tensors.values()}) > 1
    single = Checkpoint(pool["e0"])
    assert set(ckpt.names) == set(single.names)
    for name in single.names:
        assert torch.equal(ckpt.read(name), single.read(name))


def test_missing_shard_is_named(tmp_path, pool):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(pool["e0"]).save_pretrained(tmp_path / "m", max_shard_size="20KB")
    victim = sorted((tmp_path / "m").glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        Checkpoint(tmp_path / "m")


def test_truncated_safetensors_is_rejected(tmp_path, pool):
    bad = tmp_path / "bad"
    shutil.copytree(pool["e0"], bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint(bad)


def test_corrupt_header_is_rejected(tmp_path, pool):
    bad = tmp_path / "bad"
    shutil.copytree(pool["e0"], bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[8:20] = b"not json at!"
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        Checkpoint(bad)


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere"):
        Checkpoint(tmp_path / "nowhere")


def _pickle_model(tmp_path: Path, pool) -> Path:
    out = tmp_path / "pickled"
    out.mkdir()
    shutil.copy(pool["e0"] / "config.json", out)
    torch.save(load_file(pool["e0"] / "model.safetensors"), out / "pytorch_model.bin")
    return out


def test_pickle_refused_without_flag(tmp_path, pool):
    with pytest.raises(CheckpointError, match="allow-pickle"):
        Checkpoint(_pickle_model(tmp_path, pool))


def test_pickle_loaded_with_flag(tmp_path, pool):
    ckpt = Checkpoint(_pickle_model(tmp_path, pool), allow_pickle=True)
    name = "model.norm.weight"
    assert torch.equal(ckpt.read(name), Checkpoint(pool["e0"]).read(name))


class _Exploit:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/evomerge_pickle_exploit_ran"),))


def test_pickle_with_code_is_not_executed_even_with_flag(tmp_path):
    marker = Path("/tmp/evomerge_pickle_exploit_ran")
    marker.unlink(missing_ok=True)
    out = tmp_path / "evil"
    out.mkdir()
    torch.save({"w": _Exploit()}, out / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only"):
        Checkpoint(out, allow_pickle=True)
    assert not marker.exists()


def test_header_parser_matches_safetensors(tmp_path):
    tensors = {"a": torch.zeros(3, 4, dtype=torch.bfloat16), "b": torch.ones(5, dtype=torch.int64)}
    save_file(tensors, tmp_path / "x.safetensors")
    infos = read_safetensors_header(tmp_path / "x.safetensors")
    assert infos["a"].shape == (3, 4) and infos["a"].dtype == torch.bfloat16
    assert infos["b"].shape == (5,) and infos["b"].dtype == torch.int64


# ---------------------------------------------------------------------------------------------- LoRA


def _make_adapter(base: Path, out: Path, *, r: int = 4, alpha: int = 8, rslora: bool = False, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj", "down_proj"],
                     init_lora_weights=False, use_rslora=rslora)  # fmt: skip
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(out)
    merged = peft_model.merge_and_unload()
    return {n: p.detach().clone() for n, p in merged.state_dict().items()}


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_adapter_reads_as_base_plus_dense_delta(tmp_path, pool, rslora):
    expected = _make_adapter(pool["base"], tmp_path / "lora", rslora=rslora)
    src = LoraCheckpoint(Checkpoint(pool["base"]), tmp_path / "lora")
    changed = 0
    for name in src.names:
        got = src.read(name)
        torch.testing.assert_close(got, expected[name], rtol=1e-5, atol=1e-6)
        changed += not torch.equal(got, Checkpoint(pool["base"]).read(name))
    assert changed == 3 * 4  # q, v, down in each of 4 layers


def test_lora_reference_syntax_and_bare_adapter(tmp_path, pool):
    _make_adapter(pool["base"], tmp_path / "lora")
    plus = open_source(f"{pool['base']}+{tmp_path / 'lora'}")
    bare = open_source(str(tmp_path / "lora"), base=str(pool["base"]))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert isinstance(plus, LoraCheckpoint) and isinstance(bare, LoraCheckpoint)
    assert torch.equal(plus.read(name), bare.read(name))


def test_lora_for_another_base_is_rejected(tmp_path, pool):
    other = make_llama(tmp_path / "wide", 7, hidden=48)
    _make_adapter(other, tmp_path / "lora")
    with pytest.raises(ShapeMismatchError, match="another base"):
        LoraCheckpoint(Checkpoint(pool["base"]), tmp_path / "lora").read(
            "model.layers.0.self_attn.q_proj.weight"
        )


def test_bare_adapter_without_base_is_rejected(tmp_path, pool):
    _make_adapter(pool["base"], tmp_path / "lora")
    with pytest.raises(CheckpointError, match="base_model"):
        open_source(str(tmp_path / "lora"))


def test_dora_adapter_is_refused(tmp_path, pool):
    _make_adapter(pool["base"], tmp_path / "lora")
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="DoRA"):
        LoraCheckpoint(Checkpoint(pool["base"]), tmp_path / "lora")
