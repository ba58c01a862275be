"""Exporting M2N2 members: a mixture is recomputed from the pool, an offspring read back from the member
store; both re-evaluate from disk to the journal's scores exactly (`--verify`), on the digits setting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import run_config

from evomerge.digits_mlp import NUM_PARAMS
from evomerge.errors import ConfigError
from evomerge.evaluate.digits import DigitsSpec, save_digits_checkpoint, train_digits_mlp
from evomerge.export import export, read_run
from evomerge.merge.target import load_target
from evomerge.runtime.run import create_run_dir, execute


def _run(tmp: Path, name: str, sources: list[str], options: dict) -> Path:
    config = run_config(name, tmp / name, sources[0], sources, space={"type": "model", "chunk": 1},
                        strategy={"name": "m2n2", "options": {"pop_size": 4, **options}}, candidates=16, seed=3)  # fmt: skip
    run_dir = create_run_dir(config, None, tmp / name)
    execute(run_dir, config)
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, local_ray):
    tmp = tmp_path_factory.mktemp("m2n2_export")
    halves = [
        str(save_digits_checkpoint(train_digits_mlp(d, steps=3), tmp / n))
        for n, d in (("low", {0, 1, 2, 3, 4}), ("high", {5, 6, 7, 8, 9}))
    ]
    gen = torch.Generator().manual_seed(0)
    inits = [
        str(save_digits_checkpoint(torch.randn(NUM_PARAMS, generator=gen) * 0.01, tmp / f"r{i}"))
        for i in range(2)
    ]
    return tmp, {
        "mixture": _run(tmp, "mixture", halves, {}),
        "store": _run(tmp, "store", inits, {"mutation_std": 0.01}),
    }


@pytest.mark.parametrize("mode", ["mixture", "store"])
def test_best_member_exports_and_verifies_from_disk(runs, mode):
    tmp, run_dirs = runs
    result = export(run_dirs[mode], tmp / f"out-{mode}", verify=True)
    model, tokenizer = load_target(result.out)
    assert tokenizer is None
    got = DigitsSpec().build().evaluate(model).scores["digits"]
    assert got == read_run(run_dirs[mode]).results[result.candidate]["scores"]["digits"]
    assert (result.out / "evomerge_recipe.yaml").exists() and not (
        result.out / "mergekit_config.yml"
    ).exists()
    assert "no mergekit equivalent" in (result.out / "README.md").read_text()


def test_an_offspring_no_longer_stored_is_refused_and_nothing_is_written(runs):
    tmp, run_dirs = runs
    view = read_run(run_dirs["store"])
    gone = [
        c
        for c in view.results
        if not (run_dirs["store"] / "members" / c).exists() and view.results[c]["status"] == "ok"
    ]
    assert gone, "every candidate is still stored: the store is not collected"
    with pytest.raises(ConfigError, match="no longer in the run's member store"):
        export(run_dirs["store"], tmp / "out-gone", pick=gone[0])
    assert not (tmp / "out-gone").exists()
