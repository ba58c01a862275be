"""Hub ids as model references, offline, against a hand-built Hugging Face cache (`models--org--name/{refs,
snapshots}` in a temp dir, HF_HUB_OFFLINE=1): the same merges as the directories, revisions, pinning, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.errors import CheckpointError
from evomerge.references import display_name, hub_id, parse_hub, pin

runner = CliRunner()
MAIN, V1, OTHER = "a" * 40, "b" * 40, "c" * 40


def add_snapshot(cache: Path, repo_id: str, commit: str, model: Path, refs: tuple[str, ...] = ()) -> Path:
    """Put `model`'s files in the cache as snapshot `commit` of `repo_id`, and point `refs` (branches, tags) at it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(model, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch, pool) -> Path:
    """org/base (main) and org/e0 (main) and org/e1 (main; tag v1 = e2's weights) in an offline cache."""
    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    add_snapshot(cache, "org/base", MAIN, pool["base"], ("main",))
    add_snapshot(cache, "org/e0", MAIN, pool["e0"], ("main",))
    add_snapshot(cache, "org/e1", MAIN, pool["e1"], ("main",))
    add_snapshot(cache, "org/e1", V1, pool["e2"], ("v1",))
    return cache


def _ties(base: str, *models: str) -> dict:
    return {
        "merge_method": "ties",
        "base_model": base,
        "parameters": {"normalize": True},
        "models": [{"model": m, "parameters": {"weight": 0.7, "density": 0.5}} for m in models],
        "dtype": "float32",
    }


def _merge(tmp_path: Path, config: dict, name: str, *flags: str):
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    return runner.invoke(app, ["merge", str(cfg), str(tmp_path / name), *flags])


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def test_a_hub_id_is_org_slash_name_at_an_optional_revision_and_a_local_directory_wins(tmp_path, monkeypatch):
    assert parse_hub("Qwen/Qwen2.5-7B-Instruct") is not None
    assert str(parse_hub("org/name@v1.0")) == "org/name@v1.0"
    assert parse_hub("org/name@v1").revision == "v1"
    for not_hub in ("name", "a/b/c", "./org/name", "/abs/name", "org/name@", "org/name@a@b"):
        assert parse_hub(not_hub) is None, not_hub
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert parse_hub("org/name") is None  # the directory of that name wins
    assert display_name(f"org/name-7b@{MAIN}") == "name-7b@aaaaaaa" and hub_id(f"org/x@{MAIN}") == "org/x"


def test_a_yaml_naming_hub_ids_merges_bit_identically_to_the_same_yaml_naming_directories(
    hub, pool, tmp_path
):
    by_dir = _merge(tmp_path, _ties(str(pool["base"]), str(pool["e0"]), str(pool["e1"])), "by_dir")
    by_id = _merge(tmp_path, _ties("org/base", "org/e0", "org/e1"), "by_id")
    assert by_dir.exit_code == 0 and by_id.exit_code == 0, by_dir.output + by_id.output
    a, b = _tensors(tmp_path / "by_dir"), _tensors(tmp_path / "by_id")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    recorded = yaml.safe_load(
        (tmp_path / "by_id" / "evomerge_recipe.yaml").read_text()
    )  # pinned: rebuilds later
    assert recorded["base_model"] == f"org/base@{MAIN}" and recorded["models"][1]["model"] == f"org/e1@{MAIN}"
    assert (tmp_path / "by_id" / "config.json").read_text() == (
        tmp_path / "by_dir" / "config.json"
    ).read_text()


def test_a_revision_picks_that_snapshot(hub, pool, tmp_path):
    expected = _merge(tmp_path, _ties(str(pool["base"]), str(pool["e2"])), "dir")
    tag = _merge(tmp_path, _ties("org/base", "org/e1@v1"), "tag")
    commit = _merge(tmp_path, _ties("org/base", f"org/e1@{V1}"), "commit")
    main = _merge(tmp_path, _ties("org/base", "org/e1"), "main")
    assert {r.exit_code for r in (expected, tag, commit, main)} == {0}
    want = _tensors(tmp_path / "dir")
    for name in ("tag", "commit"):
        got = _tensors(tmp_path / name)
        assert all(torch.equal(want[k], got[k]) for k in want), name
    assert not all(torch.equal(want[k], v) for k, v in _tensors(tmp_path / "main").items())


def test_pin_names_the_commit_of_a_hub_model_and_the_absolute_path_of_a_local_one(
    hub, pool, tmp_path, monkeypatch
):
    assert pin("org/e1") == f"org/e1@{MAIN}" and pin("org/e1@v1") == f"org/e1@{V1}"
    assert pin(f"org/e1@{V1}") == f"org/e1@{V1}"
    monkeypatch.chdir(pool["base"].parent)
    assert pin("e0") == str(pool["e0"].absolute())
    with pytest.raises(CheckpointError, match="no such model directory"):
        pin("ghost")


def _fails(tmp_path: Path, config: dict, *needles: str, flags: tuple[str, ...] = ()) -> None:
    result = _merge(tmp_path, config, "out", *flags)
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert all(n in lines[0] for n in needles), lines[0]
    assert not (tmp_path / "out").exists()


def test_bad_hub_references_are_one_line_naming_the_reference_and_what_to_do(hub, pool, tmp_path):
    _fails(tmp_path, _ties("org/base", "org/missing"), "org/missing", "not in the hub cache", "hf download")
    _fails(tmp_path, _ties("org/base", "org/e1@v2"), "org/e1@v2", "'v2'", "cached: main, v1")
    bin_only = tmp_path / "bin_only"
    bin_only.mkdir()
    shutil.copy(pool["e0"] / "config.json", bin_only)
    torch.save(load_file(pool["e0"] / "model.safetensors"), bin_only / "pytorch_model.bin")
    add_snapshot(hub, "org/pickled", MAIN, bin_only, ("main",))
    _fails(tmp_path, _ties("org/base", "org/pickled"), "org/pickled", "no safetensors", "--allow-pickle")
    ok = _merge(tmp_path, _ties("org/base", "org/pickled"), "pickled", "--allow-pickle")
    assert ok.exit_code == 0, ok.output


def test_a_lora_adapter_on_the_hub_applies_to_a_hub_base(hub, pool, tmp_path):
    from evomerge.checkpoints import LoraCheckpoint, open_source

    adapter = tmp_path / "adapter"
    _write_lora(adapter, pool["base"])
    add_snapshot(hub, "org/lora", MAIN, adapter, ("main",))
    src = open_source("org/base+org/lora")
    local = open_source(f"{pool['base']}+{adapter}")
    assert isinstance(src, LoraCheckpoint)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(src.read(name), local.read(name)) and not torch.equal(
        src.read(name), src.base.read(name)
    )
    assert pin("org/base+org/lora") == f"org/base@{MAIN}+org/lora@{MAIN}"


def _write_lora(out: Path, base: Path) -> None:
    """A rank-2 PEFT adapter on layer 0's q_proj."""
    import json

    from safetensors.torch import save_file

    q = load_file(base / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    g = torch.Generator().manual_seed(0)
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4, "peft_type": "LORA"}))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file(
        {f"{prefix}.lora_A.weight": torch.randn(2, q.shape[1], generator=g),
         f"{prefix}.lora_B.weight": torch.randn(q.shape[0], 2, generator=g)},
        str(out / "adapter_model.safetensors"),
    )  # fmt: skip


def test_workers_get_the_drivers_cache_as_an_absolute_path_and_offline_mode_but_never_the_token(
    tmp_path, monkeypatch
):
    from evomerge.references import hub_cache, hub_env

    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert hub_env() == {} and hub_cache() == Path("~/.cache/huggingface/hub").expanduser()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", "hf-home")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_env() == {"HF_HUB_CACHE": str(tmp_path / "hf-home" / "hub"), "HF_HUB_OFFLINE": "1"}


def test_a_run_uses_the_models_its_journal_recorded_and_an_older_journal_keeps_its_references_as_given(
    pool, monkeypatch
):
    from evomerge.config import parse_config
    from evomerge.runtime.run import run_models

    monkeypatch.chdir(pool["base"].parent)
    cfg = parse_config(
        {"models": {"base": "base", "sources": ["e0", "e1"]}, "budget": {"candidates": 1}}, "t"
    )
    fresh = run_models(cfg, [])
    assert fresh == (str(pool["base"].absolute()), [str(pool["e0"].absolute()), str(pool["e1"].absolute())])
    recorded = {"base": f"org/base@{MAIN}", "sources": [f"org/e0@{MAIN}"]}
    assert run_models(cfg, [{"event": "start", "models": recorded}]) == (
        recorded["base"],
        recorded["sources"],
    )
    assert run_models(cfg, [{"event": "start"}, {"event": "ask"}]) == ("base", ["e0", "e1"])  # before pinning


def test_a_function_evaluators_run_reads_no_model_so_its_names_need_no_directory():
    """tools/bench_engine.py names models `unused`: its function evaluator holds none (this once refused it)."""
    from evomerge.config import parse_config
    from evomerge.runtime.run import resolve_models

    cfg = parse_config({"models": {"base": "unused", "sources": ["a", "b"]}, "budget": {"candidates": 1},
                        "evaluator": {"type": "function", "function": "math:fsum"},
                        "objectives": [{"name": "f"}]}, "t")  # fmt: skip
    assert resolve_models(cfg) == ("unused", ["a", "b"])
