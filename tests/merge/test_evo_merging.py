"""Evo-Merging (our interpretation of ALGORITHMS.md 4.5): hand-computed cases on small tensors, and the
genome space that searches it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evomerge.errors import ConfigError
from evomerge.merge.methods import METHODS, asymmetric_magnitude_prune, evo_merging


def t(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float32)


def merge(base, taus, weight, density, density_neg=None):
    base = t(base)
    stacked = torch.stack([base + t(x) for x in taus])
    return evo_merging(base, stacked, weight=tuple(weight), density=tuple(density), density_neg=density_neg)


def test_prune_elect_and_sum_without_division_by_hand():
    # tau1 top-2 of |3,1,2,.5| -> [3,0,2,0]; tau2 top-2 of |2,4,1,.5| -> [-2,4,0,0]
    # c*tau: [3,0,2,0], [-1,2,0,0]; sum [2,2,2,0] -> elected + everywhere (0 elects +)
    # agree: m1 [T,F(zero),T,F(zero)], m2 [F,T,F(zero),F(zero)] -> delta [3,2,2,0]
    out = merge([1, 1, 1, 1], [[3, -1, 2, 0.5], [-2, 4, 1, -0.5]], (1.0, 0.5), (0.5, 0.5))
    torch.testing.assert_close(out, t([4, 3, 3, 1]))


def test_negative_scale_flips_a_models_vote_and_subtracts_it():
    # c*tau: [1,-2], [-1,-1]; sum [0,-3] -> elected [+,-]; m1 agrees on both, m2 only on the second
    out = merge([0, 0], [[1, -2], [1, 1]], (1.0, -1.0), (1.0, 1.0))
    torch.testing.assert_close(out, t([1, -3]))


def test_scales_carry_the_magnitude_no_normalization():
    taus, d = [[0.5, -1.0, 2.0], [0.25, -0.5, 1.5]], (1.0, 1.0)
    one = merge([0, 0, 0], taus, (0.4, 0.6), d)
    two = merge([0, 0, 0], taus, (0.8, 1.2), d)
    torch.testing.assert_close(two, 2 * one)
    torch.testing.assert_close(one, t([0.35, -0.7, 1.7]))  # all signs agree: plain weighted sum


def test_asymmetric_prune_keeps_top_k_per_sign_by_hand():
    # positives 5,3,2: k = floor(0.4*3) = 1 -> 5; negatives -1,-4,-3: k = floor(0.7*3) = 2 -> -4,-3
    out = asymmetric_magnitude_prune(t([5, -1, 3, -4, 2, -3]), 0.4, 0.7)
    torch.testing.assert_close(out, t([5, 0, 0, -4, 0, -3]))
    # at least one entry per non-empty side; density 0 drops a side; ties keep the lower index
    torch.testing.assert_close(asymmetric_magnitude_prune(t([1, 1, -2]), 0.1, 0.0), t([1, 0, 0]))


def test_asymmetric_option_goes_through_the_method():
    out = merge([0] * 6, [[5, -1, 3, -4, 2, -3]], (2.0,), (0.4,), density_neg=(0.7,))
    torch.testing.assert_close(out, t([10, 0, 0, -8, 0, -6]))


def test_registry_row_declares_signed_scales_and_densities():
    m = METHODS.get("evo_merging")
    assert m.base == "required" and not m.in_mergekit
    assert m.param("weight").search == (-1.5, 1.5) and m.param("weight").required
    assert m.param("density").default == 1.0 and m.param("density_neg").default is None


def test_engine_merge_matches_the_formula(pool, tmp_path):
    from evomerge.checkpoints import Checkpoint
    from evomerge.merge.engine import merge_to_dir
    from evomerge.merge.recipe import Recipe

    recipe = Recipe.model_validate({
        "merge_method": "evo_merging", "base_model": str(pool["base"]),
        "models": [{"model": str(pool["e0"]), "parameters": {"weight": 0.7, "density": 0.3}},
                   {"model": str(pool["e1"]), "parameters": {"weight": -0.4, "density": 0.6}}],
    })  # fmt: skip
    out = merge_to_dir(recipe, tmp_path / "m")
    name = "model.layers.1.mlp.up_proj.weight"
    b, e0, e1 = (Checkpoint(pool[k]).read(name).float() for k in ("base", "e0", "e1"))
    expected = evo_merging(b, torch.stack([e0, e1]), weight=(0.7, -0.4), density=(0.3, 0.6))
    torch.testing.assert_close(Checkpoint(out).read(name).float(), expected)


# ------------------------------------------------------------------------------------------- space


def test_space_genes_bounds_and_initial(pool):
    from evomerge.space.evo_merging import EvoMergingSpace

    s = EvoMergingSpace(base=str(pool["base"]), sources=[str(pool["e0"]), str(pool["e1"])], num_layers=4,
                        layer_groups=2, c_max=1.2, init_density=0.4)  # fmt: skip
    assert s.dim == 2 * 2 * 2
    w = [i for i, n in enumerate(s.names) if "/weight/" in n]
    assert np.all(s.lower[w] == -1.2) and np.all(s.upper[w] == 1.2)
    x0 = s.initial()
    assert np.allclose(x0[w], 0.5) and np.allclose(np.delete(x0, w), 0.4)
    recipe = s.decode(x0)
    assert recipe.merge_method == "evo_merging" and len(recipe.slices) == 2


def test_space_initial_scales_from_solo_scores(pool):
    from evomerge.space.evo_merging import EvoMergingSpace, initial_scales

    # c_i = total * (s_i - s_base) / sum_j |s_j - s_base|
    assert np.allclose(initial_scales([0.5, 0.1, 0.3], 0.2, 1.0), [0.6, -0.2, 0.2])
    s = EvoMergingSpace(base=str(pool["base"]), sources={"a": str(pool["e0"]), "b": str(pool["e1"])},
                        num_layers=4, init_scores={"base": 0.2, "a": 0.6, "b": 0.0}, init_total=1.5)  # fmt: skip
    w = [i for i, n in enumerate(s.names) if "/weight/" in n]
    assert np.allclose(s.initial()[w], [1.5 * 0.4 / 0.6, -1.5 * 0.2 / 0.6])


def test_space_asymmetric_adds_negative_densities_and_rejects_bad_options(pool):
    from evomerge.space.evo_merging import EvoMergingSpace

    kw = {"base": str(pool["base"]), "sources": [str(pool["e0"])], "num_layers": 4}
    s = EvoMergingSpace(**kw, asymmetric=True)
    assert [n.split("/")[1] for n in s.names] == ["weight", "density", "density_neg"]
    with pytest.raises(ConfigError, match="c_max"):
        EvoMergingSpace(**kw, c_max=0)
    with pytest.raises(ConfigError, match="init_scores"):
        EvoMergingSpace(**kw, init_scores={"e9": 0.1})
