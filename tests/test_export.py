"""`evomerge export` / `evomerge verify` on a real short search over the zoo (Ray, lm-eval, MLflow sqlite)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from evomerge import export as export_mod
from evomerge.cli import app

runner = CliRunner()
SHARD = "300KB"  # the zoo model is ~0.8 MB: three shards and an index


def _sources(zoo: dict[str, Path]) -> list[str]:
    return [str(p) for name, p in sorted(zoo.items()) if name != "base"]


def _search(zoo: dict[str, Path], out: Path) -> Path:
    """A finished 6-candidate search with MLflow tracking in `out`; its config names the models relative to the
    directory it runs from (as `models: {base: zoo/base}` does), the recipes must not."""
    from evomerge.config import parse_config
    from evomerge.runtime.run import create_run_dir, execute

    cwd = zoo["base"].parent.parent
    data = {
        "name": "export-test",
        "models": {
            "base": str(zoo["base"].relative_to(cwd)),
            "sources": [str(Path(s).relative_to(cwd)) for s in _sources(zoo)],
        },  # fmt: skip
        "space": {"type": "task_vector", "low": 0.0, "high": 1.2},
        "strategy": {"name": "random"},
        "evaluator": {"type": "lmeval", "tasks": ["zoo_search"], "subsample": 20},
        "budget": {"candidates": 6},
        "workers": {"count": 2},
        "output": str(out),
    }
    cfg = parse_config(data, "test")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        execute(create_run_dir(cfg, None, None), cfg)
    return out


def _export(run_dir: Path) -> Path:
    """`evomerge export RUN OUT --verify --register`: the best candidate, sharded."""
    out = run_dir.parent / "best"
    argv = [
        "export",
        str(run_dir),
        str(out),
        "--verify",
        "--register",
        "evomerge-test",
        "--max-shard-size",
        SHARD,
    ]
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert "verified: 4 task scores" in result.output
    return out


@pytest.fixture(scope="module")
def run_dir(quick_zoo, local_ray, tmp_path_factory) -> Path:
    """The search on the quick zoo: real models and recipes for export's plumbing."""
    return _search(quick_zoo, tmp_path_factory.mktemp("export") / "run")


@pytest.fixture(scope="module")
def exported(run_dir) -> Path:
    return _export(run_dir)


@pytest.fixture(scope="module")
def skilled_run_dir(zoo, local_ray, tmp_path_factory) -> Path:
    """The search on the trained zoo: its best scores above 0 on the search items, so a tampered export's scores
    differ from the journal's (the quick zoo's merges score 0 everywhere, tampered or not)."""
    return _search(zoo, tmp_path_factory.mktemp("export_skilled") / "run")


def _load_dir(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def _front_matter(path: Path) -> dict:
    return yaml.safe_load((path / "README.md").read_text().split("---\n")[1])


def _one_line_exit_2(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


def _no_leftovers(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


# ------------------------------------------------------------------------------------------ contents


def test_export_writes_sharded_model_card_recipe_and_mergekit_yaml(exported, run_dir):
    front = json.loads((run_dir / "front.json").read_text())
    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json", "README.md",
            "evomerge_recipe.yaml", "mergekit_config.yml"} <= names  # fmt: skip
    assert len(list(exported.glob("model-*-of-*.safetensors"))) >= 2
    meta = _front_matter(exported)
    ev = meta["evomerge"]
    assert ev["candidate"] == front["best"]["id"]
    assert ev["scores"] == front["best"]["scores"]
    assert ev["run_dir"] == str(run_dir.resolve())
    assert ev["evaluator"] == {"type": "lmeval", "tasks": ["zoo_search"], "apply_chat_template": False,
                               "chat_template": None, "fewshot_as_multiturn": False,
                               "system_instruction": None, "gen_kwargs": None, "max_length": None}  # fmt: skip
    assert meta["tags"] == ["merge", "evomerge", "mergekit"]
    assert meta["merge_method"] == "task_arithmetic"
    assert set(meta["base_model"]) == set(_sources_of(meta)) | {meta["merge_base"]}
    card = (exported / "README.md").read_text()
    assert f"evomerge export {run_dir} " in card and "mergekit-yaml mergekit_config.yml" in card
    assert "Pareto front" in card and "Lineage" in card
    assert "Prompts: plain text (no chat template)." in card


def _sources_of(meta: dict) -> list[str]:
    return meta["merged_models"]


def test_export_is_recorded_on_the_parent_mlflow_run(exported, run_dir):
    from mlflow import MlflowClient

    from evomerge.tracking import default_uri

    client = MlflowClient(tracking_uri=default_uri(run_dir))
    parent = _parent_run(client, run_dir)
    cid = _front_matter(exported)["evomerge"]["candidate"]
    assert parent.data.tags["evomerge.export"] == str(exported.resolve())
    assert parent.data.tags[f"evomerge.export.{cid}"] == str(exported.resolve())
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, f"exports/{cid}")}
    assert f"exports/{cid}/README.md" in artifacts and f"exports/{cid}/mergekit_config.yml" in artifacts
    versions = client.search_model_versions("name = 'evomerge-test'")
    assert [v.source for v in versions] == [exported.resolve().as_uri()]
    assert versions[0].run_id == parent.info.run_id


def _parent_run(client, run_dir: Path):
    exp = client.get_experiment_by_name("export-test")
    runs = client.search_runs([exp.experiment_id], f"tags.`evomerge.run_dir` = '{run_dir.resolve()}'")
    return next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)


# ------------------------------------------------------------------------------------------ same tensors


class _NoEvaluator:
    def build(self) -> None:
        return None


def test_exported_model_gives_the_in_place_candidate_logits(exported, quick_zoo):
    from transformers import AutoModelForCausalLM

    from evomerge.merge.engine import apply_in_place
    from evomerge.merge.mergekit_io import load_recipe
    from evomerge.runtime.worker import MergeBackendSpec

    spec = MergeBackendSpec(str(quick_zoo["base"]), tuple(_sources(quick_zoo)), _NoEvaluator(), device="cpu")
    backend = spec.build()
    apply_in_place(load_recipe(exported / "evomerge_recipe.yaml"), backend.pool, backend.model)
    model = AutoModelForCausalLM.from_pretrained(exported).eval()
    ids = torch.tensor([[1, 5, 9, 17, 33, 40, 41, 60, 2], [1, 3, 4, 6, 8, 10, 12, 14, 2]])
    with torch.no_grad():
        want, got = backend.model(ids).logits, model(ids).logits
    assert torch.equal(want, got)


def test_recipe_file_rebuilds_the_same_tensors(exported, tmp_path):
    out = tmp_path / "rebuilt"
    result = runner.invoke(app, ["merge", str(exported / "evomerge_recipe.yaml"), str(out)])
    assert result.exit_code == 0, result.output
    a, b = _load_dir(exported), _load_dir(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mergekit_yaml_rebuilds_the_exported_tensors_from_another_directory_offline(exported, tmp_path):
    """`mergekit-yaml` (mergekit 0.1.5's CLI) on the exported config, run elsewhere with the hub offline: the
    recipe names the models by absolute path, so mergekit finds them (a cwd-relative `zoo/base` would be taken
    for a hub id and fail)."""
    config = yaml.safe_load((exported / "mergekit_config.yml").read_text())
    models = [config["base_model"], *(m["model"] for m in config["models"])]
    assert all(Path(m).is_absolute() for m in models), models
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cli = Path(sys.executable).parent / "mergekit-yaml"
    argv = [str(cli), str(exported / "mergekit_config.yml"), str(tmp_path / "mk"), "--no-copy-tokenizer"]
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = _load_dir(exported), _load_dir(tmp_path / "mk")
    assert a.keys() == b.keys()
    assert max(float((a[k].double() - b[k].double()).abs().max()) for k in a) <= 1e-5


# ------------------------------------------------------------------------------------------ verify


def _tamper(model_dir: Path) -> None:
    """Negate lm_head.weight in whichever shard holds it."""
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    shard = model_dir / index["weight_map"]["lm_head.weight"]
    tensors = load_file(shard)
    tensors["lm_head.weight"] = -tensors["lm_head.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})


@pytest.mark.slow  # the trained zoo (~3.5 min to build)
def test_verify_passes_on_the_export_and_fails_on_a_tampered_copy(skilled_run_dir, tmp_path):
    exported = _export(skilled_run_dir)
    result = runner.invoke(app, ["verify", str(exported)])
    assert result.exit_code == 0, result.output
    assert "verified" in result.output
    bad = tmp_path / "tampered"
    shutil.copytree(exported, bad)
    _tamper(bad)
    result = runner.invoke(app, ["verify", str(bad)])
    assert result.exit_code == 1, result.output
    assert "verify failed for candidate" in result.output and "in the journal" in result.output


@pytest.mark.slow  # the trained zoo (~3.5 min to build)
def test_export_whose_verify_fails_writes_nothing(skilled_run_dir, tmp_path, monkeypatch):
    real = export_mod.materialize

    def tampered(*args, **kwargs):
        out = real(*args, **kwargs)
        _tamper(out)
        return out

    monkeypatch.setattr(export_mod, "materialize", tampered)
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["export", str(skilled_run_dir), str(out), "--verify", "--max-shard-size", SHARD]
    )
    assert result.exit_code == 1, result.output
    assert "verify failed" in result.output and "nothing written" in result.output
    _no_leftovers(tmp_path, "out")


# ------------------------------------------------------------------------------------------ atomicity, errors


def test_interrupted_export_leaves_no_out_dir(run_dir, tmp_path, monkeypatch):
    import evomerge.merge.shards as shards

    real, calls = shards.write_shard, []

    def dies_midway(file, jobs, produce):
        calls.append(file)
        if len(calls) == 2:
            file.write_bytes(b"partial")
            raise KeyboardInterrupt
        return real(file, jobs, produce)

    monkeypatch.setattr(shards, "write_shard", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        export_mod.export(run_dir, tmp_path / "out", max_shard_bytes=300_000)
    assert len(calls) == 2
    _no_leftovers(tmp_path, "out")


def test_existing_out_dir_is_refused_without_force(run_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = _one_line_exit_2(runner.invoke(app, ["export", str(run_dir), str(out)]))
    assert "already exists" in line and "--force" in line
    assert (out / "keep.txt").read_text() == "mine"
    result = runner.invoke(app, ["export", str(run_dir), str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    _no_leftovers(tmp_path, "nothing-else")


def test_unknown_candidate_is_one_line_exit_2_and_writes_nothing(run_dir, tmp_path):
    line = _one_line_exit_2(
        runner.invoke(app, ["export", str(run_dir), str(tmp_path / "out"), "--pick", "c99999"])
    )
    assert "unknown candidate 'c99999'" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--weights", "zoo_nope_search=1"], "unknown objective 'zoo_nope_search'"),
        (["--weights", "zoo_rev_search=x"], "is not a number"),
        (["--weights", "zoo_rev_search=1", "--pick", "knee"], "cannot go with --pick knee"),
        (["--max-shard-size", "lots"], "--max-shard-size"),
        (["--dtype", "float8"], "unknown dtype 'float8'"),
        (["--tolerance", "-1"], "--tolerance: must be >= 0"),
    ],
)
def test_bad_flags_are_one_line_exit_2(run_dir, tmp_path, flags, needle):
    line = _one_line_exit_2(runner.invoke(app, ["export", str(run_dir), str(tmp_path / "out"), *flags]))
    assert needle in line
    assert list(tmp_path.iterdir()) == []


def test_not_a_run_and_run_id_without_store(tmp_path):
    line = _one_line_exit_2(runner.invoke(app, ["export", str(tmp_path / "ghost"), str(tmp_path / "out")]))
    assert "not a run directory" in line
    line = _one_line_exit_2(runner.invoke(app, ["export", "0" * 32, str(tmp_path / "out")]))
    assert "--tracking-uri" in line


# ------------------------------------------------------------------------------------------ picking


def test_knee_and_weights_pick_from_the_journal(run_dir):
    from evomerge.pareto import knee_point

    view = export_mod.read_run(run_dir)
    points = view.points()
    assert export_mod.select(view, "knee")[0] == view.ok[knee_point(points)]
    w = export_mod.parse_weights("zoo_up_search=1, zoo_sort_search=0.5", view.names)
    assert export_mod.select(view, "best", w)[0] == view.ok[int(np.argmax(points @ w))]
    assert (
        export_mod.select(view, "best")[0] == json.loads((run_dir / "front.json").read_text())["best"]["id"]
    )


def test_export_by_mlflow_run_id(run_dir, exported, tmp_path):
    """A parent run id exports the run's best; a child (candidate) run id exports that candidate."""
    from mlflow import MlflowClient

    from evomerge.tracking import default_uri

    uri = default_uri(run_dir)
    client = MlflowClient(tracking_uri=uri)
    parent = _parent_run(client, run_dir)
    result = runner.invoke(app, ["export", parent.info.run_id, str(tmp_path / "a"), "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    assert (
        _front_matter(tmp_path / "a")["evomerge"]["candidate"]
        == _front_matter(exported)["evomerge"]["candidate"]
    )
    view = export_mod.read_run(run_dir)
    other = next(c for c in view.ok if c != _front_matter(exported)["evomerge"]["candidate"])
    exp = client.get_experiment_by_name("export-test")
    child = client.search_runs([exp.experiment_id], f"tags.`evomerge.candidate` = '{other}'")[0]
    result = runner.invoke(app, ["export", child.info.run_id, str(tmp_path / "b"), "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    meta = _front_matter(tmp_path / "b")["evomerge"]
    assert meta["candidate"] == other and meta["chosen_by"] == "candidate id given"


# ------------------------------------------------------------------------------------------ recipe types, card


def test_recipe_types_dispatch_in_one_place(exported):
    from evomerge.merge.recipe import Recipe

    recipe = export_mod.recipe_from_json(yaml.safe_load((exported / "evomerge_recipe.yaml").read_text()))
    assert isinstance(recipe, Recipe)
    text, why = export_mod.mergekit_yaml(recipe)
    assert text is not None and why == ""
    text, why = export_mod.mergekit_yaml(recipe.model_copy(update={"merge_method": "tsv_m"}))
    assert text is None and "'tsv_m' is evomerge's own" in why
    assert export_mod.mergekit_yaml(object())[0] is None
    with pytest.raises(TypeError):
        export_mod.materialize(object(), Path("unused"))


def test_source_licenses_pass_through(tmp_path):
    from evomerge.model_card import _license_fields, source_licenses

    a, b, c = (tmp_path / n for n in "abc")
    for d in (a, b, c):
        d.mkdir()
    (a / "README.md").write_text("---\nlicense: apache-2.0\ntags: [x]\n---\n# a\n")
    (b / "config.json").write_text(json.dumps({"license": "apache-2.0"}))
    found = source_licenses([str(a), str(b), str(c)])
    assert found == {str(a): {"license": "apache-2.0"}, str(b): {"license": "apache-2.0"}}
    assert _license_fields(found) == {"license": "apache-2.0"}
    (b / "config.json").write_text(json.dumps({"license": "mit"}))
    assert _license_fields(source_licenses([str(a), str(b)]))["license"] == "other"
    assert _license_fields({}) == {}
