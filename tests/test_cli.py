"""`evomerge merge` on bad input: one clear line, exit 2, no output directory left behind."""

import json
import shutil
import subprocess
import sys

import pytest
import yaml
from helpers import make_llama
from typer.testing import CliRunner

from evomerge.cli import app

runner = CliRunner()


def _write(tmp_path, data, name="merge.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _linear(*models, **params):
    return {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": 1.0, **params}} for m in models],
    }


def _run_fails(tmp_path, config, needle, *flags):
    out = tmp_path / "out"
    result = runner.invoke(app, ["merge", str(config), str(out), *flags])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert needle in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_merge_ok_writes_model(tmp_path, pool):
    cfg = _write(tmp_path, {**_linear(pool["e0"], pool["e1"]), "dtype": "float32"})
    result = runner.invoke(app, ["merge", str(cfg), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_missing_model_dir(tmp_path, pool):
    _run_fails(tmp_path, _write(tmp_path, _linear(pool["e0"], tmp_path / "ghost")), "ghost")


def test_shape_mismatch(tmp_path, pool):
    wide = make_llama(tmp_path / "wide", 1, hidden=48)
    _run_fails(tmp_path, _write(tmp_path, _linear(pool["e0"], wide)), "shapes differ")


def test_different_architectures(tmp_path, pool):
    other = tmp_path / "mistral"
    shutil.copytree(pool["e1"], other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (other / "config.json").write_text(json.dumps(cfg))
    _run_fails(tmp_path, _write(tmp_path, _linear(pool["e0"], other)), "different architectures")


def test_truncated_safetensors(tmp_path, pool):
    bad = tmp_path / "bad"
    shutil.copytree(pool["e1"], bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:-64])
    _run_fails(tmp_path, _write(tmp_path, _linear(pool["e0"], bad)), "truncated")


def test_corrupt_safetensors(tmp_path, pool):
    bad = tmp_path / "bad"
    shutil.copytree(pool["e1"], bad)
    (bad / "model.safetensors").write_bytes(b"\xff" * 64)
    _run_fails(tmp_path, _write(tmp_path, _linear(pool["e0"], bad)), "corrupt")


def test_unknown_method(tmp_path, pool):
    cfg = {**_linear(pool["e0"], pool["e1"]), "merge_method": "tiez"}
    _run_fails(tmp_path, _write(tmp_path, cfg), "Did you mean 'ties'")


def test_unknown_key(tmp_path, pool):
    cfg = {**_linear(pool["e0"], pool["e1"]), "merge_methd": "linear"}
    _run_fails(tmp_path, _write(tmp_path, cfg), "unknown key 'merge_methd'")


def test_bad_yaml(tmp_path):
    _run_fails(tmp_path, _write(tmp_path, "merge_method: ties\nmodels: [\n  - model: a\n"), "invalid YAML")


def test_negative_density(tmp_path, pool):
    cfg = {"merge_method": "ties", "base_model": str(pool["base"]),
           "models": [{"model": str(pool["e0"]), "parameters": {"weight": 1, "density": -0.2}}]}  # fmt: skip
    _run_fails(tmp_path, _write(tmp_path, cfg), "'density' must be >= 0.0")


def test_missing_required_parameter(tmp_path, pool):
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(pool["base"]),
        "models": [{"model": str(pool["e0"])}],
    }
    _run_fails(tmp_path, _write(tmp_path, cfg), "missing required parameter 'weight'")


def test_method_without_its_base(tmp_path, pool):
    cfg = {"merge_method": "ties", "models": [{"model": str(pool["e0"]), "parameters": {"weight": 1}}]}
    _run_fails(tmp_path, _write(tmp_path, cfg), "needs a base_model")


def test_pickle_without_flag(tmp_path, pool):
    import torch
    from safetensors.torch import load_file

    pk = tmp_path / "pk"
    pk.mkdir()
    shutil.copy(pool["e1"] / "config.json", pk)
    torch.save(load_file(pool["e1"] / "model.safetensors"), pk / "pytorch_model.bin")
    cfg = _write(tmp_path, _linear(pool["e0"], pk))
    _run_fails(tmp_path, cfg, "--allow-pickle")
    result = runner.invoke(app, ["merge", str(cfg), str(tmp_path / "out"), "--allow-pickle"])
    assert result.exit_code == 0, result.output


def test_missing_config_file(tmp_path):
    _run_fails(tmp_path, tmp_path / "nope.yaml", "cannot read")


def test_console_script_exit_code(tmp_path, pool):
    """The installed entry point, in a real process."""
    cfg = _write(tmp_path, {**_linear(pool["e0"], pool["e1"]), "merge_method": "nonsense"})
    proc = subprocess.run([sys.executable, "-m", "evomerge", "merge", str(cfg), str(tmp_path / "out")],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2
    assert "unknown merge method 'nonsense'" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [["--help"], ["merge", "--help"]])
def test_help(argv):
    assert runner.invoke(app, argv).exit_code == 0
