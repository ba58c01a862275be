"""Data-flow space (Sakana DFS, ALGORITHMS.md 4.2): genome -> path -> passthrough recipe on hand-computed
cases; the stacked model the engine materializes; the worker's stacked target equals it; an engine run on
the zoo (CMA over the data-flow space) resumed from its journal."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import journal_records, run_config

from evomerge.errors import ConfigError
from evomerge.space import SPACES
from evomerge.space.dataflow import DataFlowSpace, hop_scales, path_slots, scale_setting

torch.set_num_threads(1)


def test_path_keeps_positive_slots_in_order_or_the_largest_one():
    assert path_slots(np.array([0.2, -0.1, 0.0, 0.7, 0.3])) == [0, 3, 4]  # 0 is not > 0
    assert path_slots(np.array([-0.5, -0.1, -0.3])) == [1]


def test_hop_scales_by_hand():
    scales = np.array([0.5, 0.6, 0.7, 0.8])
    assert hop_scales([1, 3], 4, "slot", scales) == [0.6, 0.8]
    assert hop_scales([1, 3], 4, "none", scales) == [1.0, 1.0]
    w = np.arange(16.0)  # W[i, j] = 4 i + j; slots 5 and 6 are layers 1 and 2 of the second repetition
    assert hop_scales([2, 5, 6], 4, "pair", w) == [1.0, 4 * 2 + 1, 4 * 1 + 2]


def test_scale_setting_scales_the_residual_writers_only():
    assert scale_setting(1.0) is None
    conds = scale_setting(0.8)
    assert [(c.filter, c.value) for c in conds] == [("o_proj", 0.8), ("down_proj", 0.8), (None, 1.0)]


@pytest.fixture(scope="module")
def space(pool) -> DataFlowSpace:
    return DataFlowSpace(
        base=pool["base"], sources={"a": pool["e0"], "b": pool["e1"]}, num_layers=4, repeats=2
    )


def test_genes_and_bounds(space, pool):
    assert space.n_layers == 8 and space.n_slots == 16 and space.dim == 32
    assert space.names[0] == "slot/0/a/L0" and space.names[12] == "slot/1/b/L0"
    assert space.names[16] == "scale/0/a/L0" and space.lower[16] == 0.5 and space.upper[16] == 1.5
    pair = DataFlowSpace(base=pool["base"], sources=[pool["e0"]], num_layers=4, repeats=3, scaling="pair")
    assert pair.dim == 12 + 16 and pair.names[12] == "scale/e0.L0->e0.L0"
    assert DataFlowSpace(base=pool["base"], sources=[pool["e0"]], num_layers=4, scaling="none").dim == 12
    with_base = DataFlowSpace(base=pool["base"], sources=[pool["e0"]], num_layers=4, include_base=True)
    assert with_base.models[-1] == str(pool["base"]) and with_base.n_layers == 8
    assert SPACES.get("dataflow") is DataFlowSpace


def test_initial_genome_is_the_init_model_unchanged(space, pool):
    recipe = space.decode(space.initial())
    assert recipe.merge_method == "passthrough"
    assert [(s.sources[0].model, tuple(s.sources[0].layer_range)) for s in recipe.slices] == [
        (str(pool["e0"]), (i, i + 1)) for i in range(4)
    ]
    assert all(s.sources[0].parameters is None for s in recipe.slices)
    b = DataFlowSpace(
        base=pool["base"], sources={"a": pool["e0"], "b": pool["e1"]}, num_layers=4, init_model="b"
    )
    assert {s.sources[0].model for s in b.decode(b.initial()).slices} == {str(pool["e1"])}


def test_decode_by_hand(space, pool):
    x = space.initial()
    x[:16] = -1
    x[[1, 6, 9, 13]] = 0.4  # a.L1, b.L2, then in repetition 1: a.L1, b.L1
    x[16 + 6] = 0.7
    assert space.path(x) == [(str(pool["e0"]), 1, 1.0), (str(pool["e1"]), 2, 0.7),
                             (str(pool["e0"]), 1, 1.0), (str(pool["e1"]), 1, 1.0)]  # fmt: skip
    recipe = space.decode(x)
    assert [tuple(s.sources[0].layer_range) for s in recipe.slices] == [(1, 2), (2, 3), (1, 2), (1, 2)]
    assert recipe.slices[1].sources[0].parameters["scale"][0].value == 0.7


def test_invalid_options(pool):
    kw = {"base": pool["base"], "sources": [pool["e0"]], "num_layers": 4}
    for bad, match in (({"repeats": 0}, "repeats"), ({"scaling": "x"}, "scaling"),
                       ({"scale_range": (1.0, 2.0)}, "scale_range"), ({"init_model": "zz"}, "init_model")):  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            DataFlowSpace(**kw, **bad)


def _path_genome(space: DataFlowSpace) -> np.ndarray:
    x = space.initial()
    x[:16] = -1
    x[[0, 1, 6, 9, 13, 14]] = 0.5  # 6 hops; the last hop (b.L2, rep 1) gives norm and head
    x[16 + 6] = 0.7
    return x


def test_engine_materializes_the_stacked_model(space, pool, tmp_path):
    from evomerge.checkpoints import Checkpoint
    from evomerge.merge.engine import merge_to_dir

    out = Checkpoint(merge_to_dir(space.decode(_path_genome(space)), tmp_path / "stacked"))
    assert out.num_layers == 6
    a, b = Checkpoint(pool["e0"]), Checkpoint(pool["e1"])
    name = "model.layers.{}.mlp.down_proj.weight"
    torch.testing.assert_close(out.read(name.format(2)), 0.7 * b.read(name.format(2)))  # hop 2 = b.L2, x0.7
    torch.testing.assert_close(out.read(name.format(3)), a.read(name.format(1)))  # hop 3 = a.L1
    up = "model.layers.{}.mlp.up_proj.weight"
    torch.testing.assert_close(out.read(up.format(2)), b.read(up.format(2)))  # not a residual writer
    torch.testing.assert_close(out.read("model.embed_tokens.weight"), a.read("model.embed_tokens.weight"))
    torch.testing.assert_close(out.read("lm_head.weight"), b.read("lm_head.weight"))


def test_worker_stacked_target_equals_the_materialized_model(space, pool, tmp_path):
    from transformers import AutoModelForCausalLM

    from evomerge.merge.engine import ResidentPool, apply_in_place, merge_to_dir
    from evomerge.runtime.worker import MergeBackend

    backend = MergeBackend.__new__(MergeBackend)  # the resident parts only (the pool has no tokenizer)
    backend.device = "cpu"
    backend.model = AutoModelForCausalLM.from_pretrained(pool["base"], dtype=torch.float32).eval()
    backend._stacked = {}
    resident = ResidentPool.from_refs(
        [str(pool["e0"]), str(pool["e1"]), str(pool["base"])], base=str(pool["base"])
    )
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    for genome in (_path_genome(space), space.initial()):
        recipe = space.decode(genome)
        model = backend.stacked_target(recipe)
        apply_in_place(recipe, resident, model)
        expected = AutoModelForCausalLM.from_pretrained(
            merge_to_dir(recipe, tmp_path / f"m{len(recipe.slices)}"), dtype=torch.float32
        ).eval()
        assert model.config.num_hidden_layers == len(recipe.slices)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, expected(ids).logits)
    assert backend.stacked_target(space.decode(space.initial())) is backend.model  # same depth: resident
    assert list(backend._stacked) == [6]


# --------------------------------------------------------------------------------- engine run (Ray)


def _config(zoo, run_dir: Path):
    return run_config("dataflow", run_dir, zoo["base"], [zoo["expert_rev"], zoo["expert_up"]],
                      space={"type": "dataflow", "repeats": 2, "scaling": "slot"},
                      strategy={"name": "cma", "options": {"popsize": 4, "sigma": 0.3}},
                      evaluator={"type": "lmeval", "tasks": ["zoo_rev_search", "zoo_up_search"], "limit": 8},
                      candidates=12, seed=1)  # fmt: skip


def _journal(run_dir: Path):
    _, asked, results = journal_records(run_dir)
    return asked, {cid: (e["status"], e["scores"]) for cid, e in results.items()}


@pytest.fixture(scope="module")
def zoo_models(request) -> dict[str, Path]:
    """The repo's cached zoo (`./zoo`, what `make demo` builds) when present, else the session `zoo` fixture
    (which trains one, minutes)."""
    from evomerge.zoo import build_zoo

    cached = Path(__file__).resolve().parents[2] / "zoo"
    if (cached / "zoo.json").exists():
        return build_zoo(cached, seed=0)
    return request.getfixturevalue("zoo")


@pytest.mark.slow  # end to end: a run and its resume on the zoo (~10 s)
def test_engine_run_on_the_zoo_resumes_exactly(local_ray, zoo_models, tmp_path):
    zoo = zoo_models
    from evomerge.runtime.run import create_run_dir, execute, resume

    config = _config(zoo, tmp_path / "full")
    full_dir = create_run_dir(config, None, None)
    execute(full_dir, config)
    asked, results = _journal(full_dir)
    assert len(asked) == 12 and all(status == "ok" for status, _ in results.values())
    depths = {len(c["recipe"]["slices"]) for c in asked}
    assert len(depths) > 1  # stacked models of several depths were evaluated in place

    cut_dir = tmp_path / "cut"
    shutil.copytree(full_dir, cut_dir)
    lines = (cut_dir / "journal.jsonl").read_text().splitlines(keepends=True)
    cut = [i for i, line in enumerate(lines) if '"event":"result"' in line][5]
    (cut_dir / "journal.jsonl").write_text("".join(lines[: cut + 1]))
    resume(cut_dir)
    assert _journal(cut_dir) == (asked, results)
