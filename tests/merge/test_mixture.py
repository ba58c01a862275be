"""Model-space recipes against direct arithmetic: a member rebuilt from its recipe (Mixture or Offspring) is
the member computed in numpy from the materialized pool / parents (ALGORITHMS.md 4.3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from evomerge.digits_mlp import DigitsMLP
from evomerge.merge.members import (
    apply_mixture,
    apply_mixture_stacked,
    build_offspring,
    model_layout,
    pool_gram,
    slerp_scales,
)
from evomerge.merge.mixture import Mixture, Offspring, candidate_recipe, chunk_boundaries, snap_split
from evomerge.strategies.m2n2 import Member, inner, slerp_child

torch.set_num_threads(1)


class Tiny(nn.Module):
    """Three tensors of 12 + 5 + 6 = 23 flat elements, plus one the pool lacks (outside the layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(3, 4))
        self.b = nn.Parameter(torch.zeros(5))
        self.extra = nn.Parameter(torch.full((2,), 7.0))
        self.c = nn.Parameter(torch.zeros(2, 3))


SHAPES = {"a": (3, 4), "b": (5,), "c": (2, 3)}


def _pool(
    module: nn.Module, k: int, seed: int, shapes: dict | None = None
) -> dict[str, dict[str, torch.Tensor]]:
    """k random models (fp32) with the module's layout tensors, as {ref: {name: tensor}}."""
    gen = torch.Generator().manual_seed(seed)
    shapes = shapes or {n: tuple(p.shape) for n, p in module.named_parameters()}
    return {f"m{i}": {n: torch.randn(s, generator=gen) for n, s in shapes.items()} for i in range(k)}


def _reader(pool):
    return lambda ref, name: pool[ref][name]


def _flat(pool, ref, layout) -> np.ndarray:
    return np.concatenate([pool[ref][n].double().reshape(-1).numpy() for n in layout.names])


def _model_flat(model, layout) -> np.ndarray:
    named = dict(model.named_parameters())
    return np.concatenate([named[n].detach().double().reshape(-1).numpy() for n in layout.names])


def _random_mixture(rng, refs, size, n_segments, boundaries=None) -> Mixture:
    candidates = np.arange(1, size) if boundaries is None else boundaries[1:-1]
    starts = [0, *sorted(rng.choice(candidates, size=n_segments - 1, replace=False).tolist())]
    coeffs = rng.normal(size=(len(starts), len(refs))).tolist()
    return Mixture(models=list(refs), size=size, starts=[int(s) for s in starts], coefficients=coeffs)


def _mixture_reference(mix: Mixture, thetas: dict[str, np.ndarray]) -> np.ndarray:
    """sum_k c_{seg,k} theta_k per segment, in float64 numpy."""
    out = np.zeros(mix.size)
    for (lo, hi), row in zip(mix.segment_bounds(), mix.coefficients):
        for ref, c in zip(mix.models, row):
            out[lo:hi] += c * thetas[ref][lo:hi]
    return out


# ------------------------------------------------------------------------------------------- layout


def test_layout_keeps_module_order_and_skips_tensors_the_pool_lacks():
    model = Tiny()
    layout = model_layout(model, [SHAPES, SHAPES])
    assert layout.names == ("a", "b", "c") and layout.offsets == (0, 12, 17) and layout.size == 23
    np.testing.assert_array_equal(chunk_boundaries(layout, "tensor"), [0, 12, 17, 23])
    np.testing.assert_array_equal(chunk_boundaries(layout, 5), [0, 5, 10, 15, 20, 23])
    np.testing.assert_array_equal(chunk_boundaries(layout, 1), np.arange(24))
    bounds = chunk_boundaries(layout, "tensor")
    assert [snap_split(s, bounds) for s in (0, 11, 12, 16, 17, 22)] == [0, 0, 12, 12, 17, 17]


def test_digits_layout_is_the_reference_flat_vector():
    model = DigitsMLP()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    layout = model_layout(model, [shapes])
    assert layout.names == ("w1", "b1", "w2", "b2")
    assert layout.offsets == (0, 16384, 16640, 19200) and layout.size == 19210


# ------------------------------------------------------------------------------------------- mixtures


@pytest.mark.parametrize("module", ["tiny", "digits"])
def test_mixture_applied_equals_sum_of_coefficients_times_pool_per_segment(module):
    model = Tiny() if module == "tiny" else DigitsMLP()
    shapes = SHAPES if module == "tiny" else None
    pool = _pool(model, 3, seed=1, shapes=shapes)
    layout = model_layout(model, [{n: t.shape for n, t in p.items()} for p in pool.values()])
    thetas = {r: _flat(pool, r, layout) for r in pool}
    rng = np.random.default_rng(0)
    for n_segments in (1, 2, 7):
        mix = _random_mixture(rng, list(pool), layout.size, n_segments)
        assert candidate_recipe(mix.to_dict()) == mix  # what the journal stores
        expected = _mixture_reference(mix, thetas)

        apply_mixture(mix, _reader(pool), model, layout)
        np.testing.assert_allclose(_model_flat(model, layout), expected, rtol=1e-5, atol=1e-5)

        # stacked pool in another order, with an extra model the mixture does not use (the worker's base)
        refs = ["m2", "base", "m0", "m1"]
        extra = {n: torch.randn(t.shape) for n, t in pool["m0"].items()}
        stacks = {
            n: torch.stack([extra[n] if r == "base" else pool[r][n] for r in refs]) for n in layout.names
        }
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(123.0)
        apply_mixture_stacked(mix, stacks, refs, model, layout)
        np.testing.assert_allclose(_model_flat(model, layout), expected, rtol=1e-5, atol=1e-5)
    if module == "tiny":  # outside the layout: untouched
        assert torch.equal(model.extra.data, torch.full((2,), 123.0))


def test_mixture_with_a_model_twice_adds_its_coefficients():
    model = Tiny()
    pool = _pool(model, 2, seed=2, shapes=SHAPES)
    layout = model_layout(model, [SHAPES])
    mix = Mixture(
        models=["m0", "m1", "m0"], size=23, starts=[0, 12], coefficients=[[0.5, 1.0, 0.25], [1, 0, -1]]
    )
    stacks = {n: torch.stack([pool["m0"][n], pool["m1"][n]]) for n in layout.names}
    apply_mixture_stacked(mix, stacks, ["m0", "m1"], model, layout)
    t0, t1 = _flat(pool, "m0", layout), _flat(pool, "m1", layout)
    expected = np.concatenate([0.75 * t0[:12] + t1[:12], 0 * t0[12:]])
    np.testing.assert_allclose(_model_flat(model, layout), expected, atol=1e-6)


def test_mixture_rejects_bad_segments():
    with pytest.raises(ValueError):
        Mixture(models=["m0"], size=10, starts=[1], coefficients=[[1.0]])
    with pytest.raises(ValueError):
        Mixture(models=["m0"], size=10, starts=[0, 5, 5], coefficients=[[1.0]] * 3)
    with pytest.raises(ValueError):
        Mixture(models=["m0"], size=10, starts=[0, 10], coefficients=[[1.0]] * 2)
    with pytest.raises(ValueError):
        Mixture(models=["m0", "m1"], size=10, starts=[0], coefficients=[[1.0, float("nan")]])


# ----------------------------------------------------------------------------------- Gram and angles


def _random_member(rng, k, boundaries, n_segments, mid) -> Member:
    inner_bounds = boundaries[1:-1]
    n = min(n_segments - 1, len(inner_bounds))
    starts = np.array([0, *sorted(rng.choice(inner_bounds, size=n, replace=False).tolist())], dtype=np.int64)
    return Member(mid, starts, rng.normal(size=(len(starts), k)))


def _dense(m: Member, thetas: np.ndarray) -> np.ndarray:
    """The materialized member: thetas [K, D]."""
    size = thetas.shape[1]
    mix = Mixture(models=[str(i) for i in range(len(thetas))], size=size,
                  starts=[int(s) for s in m.starts], coefficients=m.coeffs.tolist())  # fmt: skip
    return np.einsum("dk,kd->d", mix.dense(), thetas)


@pytest.mark.parametrize("chunk", [1, 1000, "tensor"])
def test_inner_from_pool_gram_equals_dot_products_of_materialized_members(chunk):
    model = DigitsMLP()
    pool = _pool(model, 3, seed=3)
    layout = model_layout(model, [{n: t.shape for n, t in p.items()} for p in pool.values()])
    bounds = chunk_boundaries(layout, chunk)
    gram = pool_gram(_reader(pool), list(pool), layout, bounds)
    assert gram.shape == (len(bounds), 3, 3)
    thetas = np.stack([_flat(pool, r, layout) for r in pool])
    np.testing.assert_allclose(gram[-1], thetas @ thetas.T, rtol=1e-12)
    rng = np.random.default_rng(4)
    for _ in range(4):
        x = _random_member(rng, 3, bounds, 6, "x")
        y = _random_member(rng, 3, bounds, 5, "y")
        dx, dy = _dense(x, thetas), _dense(y, thetas)
        assert inner(gram, bounds, layout.size, x, y) == pytest.approx(dx @ dy, rel=1e-10)
        assert inner(gram, bounds, layout.size, x, x) == pytest.approx(dx @ dx, rel=1e-10)


def test_pool_gram_of_a_block_spanning_tensors_by_hand():
    """chunk 10 over [a (12) | b (5) | c (6)]: blocks [0,10) [10,20) [20,23) cut across tensors."""
    model = Tiny()
    pool = {"m0": {n: torch.ones(s) for n, s in SHAPES.items()},
            "m1": {n: torch.full(s, 2.0) for n, s in SHAPES.items()}}  # fmt: skip
    pool["m1"]["b"] = torch.arange(5.0)  # flat 12..16
    layout = model_layout(model, [SHAPES])
    bounds = chunk_boundaries(layout, 10)
    gram = pool_gram(_reader(pool), ["m0", "m1"], layout, bounds)
    # m0.m0 = count; m0.m1 = 2 per element except b (0..4); m1.m1 = 4 except b (0,1,4,9,16)
    expected_blocks = [
        [[10, 20], [20, 40]],  # [0, 10): all in a
        # [10, 20): a[10:12], b (flat 12..16), c[0:3]
        [[10, 2 * 2 + (0 + 1 + 2 + 3 + 4) + 3 * 2], [20, 2 * 4 + (0 + 1 + 4 + 9 + 16) + 3 * 4]],
        [[3, 6], [6, 12]],  # [20, 23): c[3:6]
    ]
    np.testing.assert_allclose(np.diff(gram, axis=0), np.array(expected_blocks, dtype=float))


def test_slerp_child_coefficients_materialize_to_the_reference_slerp_child():
    """Global angle over the whole vector, t = w before the split, 1 - w from it on (ALGORITHMS.md 4.3)."""
    model = DigitsMLP()
    pool = _pool(model, 3, seed=5)
    layout = model_layout(model, [{n: t.shape for n, t in p.items()} for p in pool.values()])
    thetas = np.stack([_flat(pool, r, layout) for r in pool])
    rng = np.random.default_rng(6)
    for chunk in (1, 1000, "tensor"):
        bounds = chunk_boundaries(layout, chunk)
        gram = pool_gram(_reader(pool), list(pool), layout, bounds)
        for split_raw, w in ((int(rng.integers(0, layout.size)), 0.3), (None, 0.8), (0, 0.6)):
            a = _random_member(rng, 3, bounds, 4, "a")
            b = _random_member(rng, 3, bounds, 3, "b")
            split = None if split_raw is None else snap_split(split_raw, bounds)
            nab = inner(gram, bounds, layout.size, a, b)
            naa, nbb = inner(gram, bounds, layout.size, a, a), inner(gram, bounds, layout.size, b, b)
            child = slerp_child(a, b, split, w, nab / math.sqrt(naa * nbb), "c")
            assert np.all(np.diff(child.starts) > 0) and child.starts[0] == 0
            assert np.all(np.isin(child.starts, bounds))  # every segment start is an allowed split point

            pa, pb = _dense(a, thetas), _dense(b, thetas)
            omega = np.arccos(np.clip(pa @ pb / np.linalg.norm(pa) / np.linalg.norm(pb), -1, 1))
            idx = np.arange(layout.size)
            t = np.full(layout.size, w) if split is None else np.where(idx < split, w, 1 - w)
            ref = (np.sin((1 - t) * omega) * pa + np.sin(t * omega) * pb) / np.sin(omega)
            np.testing.assert_allclose(_dense(child, thetas), ref, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------- offspring


def _digits_parents(seed: int):
    model = DigitsMLP()
    pool = _pool(model, 2, seed=seed)
    pool["zero"] = {n: torch.zeros_like(t) for n, t in pool["m0"].items()}
    layout = model_layout(model, [{n: t.shape for n, t in p.items()} for p in pool.values()])
    return model, pool, layout


def _offspring_reference(pa, pb, split, w, slerp=True):
    cos = pa @ pb / (np.linalg.norm(pa) * np.linalg.norm(pb)) if pa.any() and pb.any() else 1.0
    omega = np.arccos(np.clip(cos, -1, 1)) if slerp else 0.0
    idx = np.arange(len(pa))
    t = np.where(idx < (len(pa) if split is None else split), w, 1 - w)
    if np.sin(omega) > 1e-6:
        return (np.sin((1 - t) * omega) * pa + np.sin(t * omega) * pb) / np.sin(omega)
    return (1 - t) * pa + t * pb


@pytest.mark.parametrize(
    ("split", "weight", "slerp"), [(5000, 0.3, True), (None, 0.7, True), (16384, 0.25, False), (0, 0.9, True)]
)
def test_offspring_of_two_stored_parents_is_the_reference_formula(split, weight, slerp):
    model, pool, layout = _digits_parents(7)
    off = Offspring(parents=["m0", "m1"], size=layout.size, weight=weight, split=split, slerp=slerp, save="x")
    build_offspring(off, _reader(pool), model, layout)
    ref = _offspring_reference(_flat(pool, "m0", layout), _flat(pool, "m1", layout), split, weight, slerp)
    np.testing.assert_allclose(_model_flat(model, layout), ref, rtol=1e-5, atol=1e-6)


def test_offspring_of_one_parent_is_a_copy():
    model, pool, layout = _digits_parents(8)
    build_offspring(Offspring(parents=["m1"], size=layout.size, save="x"), _reader(pool), model, layout)
    np.testing.assert_array_equal(_model_flat(model, layout), _flat(pool, "m1", layout))


def test_offspring_with_a_zero_parent_falls_back_to_linear():
    model, pool, layout = _digits_parents(9)
    off = Offspring(parents=["zero", "m1"], size=layout.size, weight=0.4, split=100, save="x")
    build_offspring(off, _reader(pool), model, layout)
    got = _model_flat(model, layout)
    assert np.all(np.isfinite(got))
    t = np.where(np.arange(layout.size) < 100, 0.4, 0.6)
    np.testing.assert_allclose(got, t * _flat(pool, "m1", layout), rtol=1e-6, atol=1e-7)


def test_offspring_noise_is_seeded_and_has_the_configured_std():
    model, pool, layout = _digits_parents(10)

    def noisy(seed, parents=("m0",), std=0.01):
        off = Offspring(parents=list(parents), size=layout.size, weight=0.5, split=3000,
                        noise_seed=seed, noise_std=std, save="x")  # fmt: skip
        build_offspring(off, _reader(pool), model, layout)
        return _model_flat(model, layout)

    clean = _flat(pool, "m0", layout)
    a, again, other = noisy(1), noisy(1), noisy(2)
    np.testing.assert_array_equal(a, again)
    assert not np.allclose(a, other)
    noise = a - clean
    assert noise.std() == pytest.approx(0.01, rel=0.05) and abs(noise.mean()) < 1e-3
    assert np.corrcoef(noise, other - clean)[0, 1] < 0.05  # independent draws
    # two parents: the same noise on top of the crossover
    crossed = noisy(1, ("m0", "m1"))
    ref = _offspring_reference(clean, _flat(pool, "m1", layout), 3000, 0.5)
    np.testing.assert_allclose(crossed - ref, noise, atol=1e-5)
    with pytest.raises(ValueError):
        Offspring(parents=["m0"], size=layout.size, noise_std=0.01, save="x")  # noise without a seed


# --------------------------------------------------------------------------------- slerp scales by hand


def test_slerp_scales_by_hand():
    s = math.sin
    # cos 0: omega = pi/2, sin omega = 1
    assert slerp_scales(0.25, 0.0) == pytest.approx((s(0.75 * math.pi / 2), s(0.25 * math.pi / 2)))
    assert slerp_scales(0.25, 0.0) == pytest.approx((0.9238795325, 0.3826834324))
    # cos 0.5: omega = pi/3, t = 0.5 -> sin(pi/6) / sin(pi/3) = 1/sqrt(3) each
    assert slerp_scales(0.5, 0.5) == pytest.approx((1 / math.sqrt(3), 1 / math.sqrt(3)))
    assert slerp_scales(0.0, 0.3) == pytest.approx((1.0, 0.0), abs=1e-12)
    assert slerp_scales(1.0, 0.3) == pytest.approx((0.0, 1.0), abs=1e-12)
    # sin omega <= 1e-6: linear (parallel, antiparallel, clipped, and just inside the threshold)
    for cos in (1.0, 1.5, -1.0, -1.5, 1.0 - 1e-13, math.cos(9e-7)):
        assert slerp_scales(0.3, cos) == (0.7, 0.3)
    # just above the threshold: the SLERP formula (close to linear there)
    a, b = slerp_scales(0.3, math.cos(2e-6))
    assert (a, b) != (0.7, 0.3) and a == pytest.approx(0.7, abs=1e-9) and b == pytest.approx(0.3, abs=1e-9)
