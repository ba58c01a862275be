"""The fused C kernels against their torch references in methods.py: same bits, same tie rules, and a clean
fallback to torch where no kernel can be built."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.merge import kernels, methods

needs_kernels = pytest.mark.skipif(
    kernels.load() is None, reason="no C compiler: the torch path is all there is"
)


def torch_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVOMERGE_NO_KERNELS", "1")
    kernels.load.cache_clear()


@pytest.fixture(autouse=True)
def _fresh_load():
    kernels.load.cache_clear()
    yield
    kernels.load.cache_clear()


def weighted_deltas(k: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(k, n, generator=gen)
    d[d.abs() < 0.4] = 0  # trimmed entries never agree
    d[:, :7] = 0  # all-zero columns: the divisor is 0 and counts as 1
    w = torch.rand(k, 1, generator=gen) - 0.2  # a negative weight flips a vote
    return d * w, w


@needs_kernels
@pytest.mark.parametrize("consensus", ["sum", "count"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_elected_sum_kernel_is_bit_identical_to_torch(k, consensus, normalize):
    d, w = weighted_deltas(k, 300_001, seed=k)  # two threads, a ragged last block
    fused = kernels.elected_sum(d, w, consensus, normalize)
    assert fused is not None
    assert torch.equal(fused, methods.elected_sum_blocks(d, w, consensus, normalize))


@needs_kernels
def test_elected_sum_kernel_with_many_sources_agrees_to_rounding():
    """torch's sum over more than 3 rows changes its order with the block length; the kernel sums in order."""
    d, w = weighted_deltas(6, 100_000, seed=6)
    torch.testing.assert_close(
        kernels.elected_sum(d, w, "sum", True), methods.elected_sum_blocks(d, w, "sum", True)
    )


@needs_kernels
def test_elected_sum_kernel_propagates_nan_like_torch():
    d, w = weighted_deltas(3, 1000, seed=0)
    d[1, 500] = float("nan")
    fused, reference = kernels.elected_sum(d, w, "sum", True), methods.elected_sum_blocks(d, w, "sum", True)
    assert fused[500].isnan() and reference[500].isnan()
    assert torch.equal(fused[:500], reference[:500])


def tie_heavy_cases() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [
        torch.randn(3_000_000, generator=gen),
        torch.randint(-3, 4, (700_000,), generator=gen).float(),  # 7 values: the k-th is tied with ~14% of n
        (
            torch.randn(500_000, generator=gen).bfloat16().float()
            - torch.randn(500_000, generator=gen).bfloat16()
        ),
        torch.zeros(5000),
        torch.randn(1000, generator=gen).round(),
        torch.randn(10, generator=gen),
        torch.tensor([-2.0, 2.0, -0.0, 0.0, 1.0]),
    ]


def keep_top_k_reference(x: torch.Tensor, k: int) -> torch.Tensor:
    return x * methods.top_k_mask(x.abs(), k)


@needs_kernels
@pytest.mark.parametrize("case", range(len(tie_heavy_cases())))
def test_keep_top_k_abs_keeps_what_top_k_mask_keeps(case):
    x = tie_heavy_cases()[case]
    n = x.numel()
    for k in sorted({1, 2, n // 3, n // 2, n - 1, n} - {0}):
        trimmed = x.clone()
        assert kernels.keep_top_k_abs(trimmed, k)
        expected = keep_top_k_reference(x, k)
        assert torch.equal(trimmed.view(torch.int32), expected.view(torch.int32)), (case, k)  # -0.0 included


@needs_kernels
@pytest.mark.parametrize("case", range(len(tie_heavy_cases())))
def test_keep_abs_band_keeps_what_breadcrumbs_masks_keep(case):
    x = tie_heavy_cases()[case]
    n = x.numel()
    for m1, m2 in [
        (0, n),
        (0, 1),
        (n // 3, n // 2),
        (n - 1, n),
        (1, n - 1),
        (n // 2, n // 2),
        (0, 0),
        (n, n),
    ]:
        band = x.clone()
        assert kernels.keep_abs_band(band, m1, m2)
        expected = x * (methods.lowest_m_mask(x.abs(), m2) & ~methods.lowest_m_mask(x.abs(), m1))
        assert torch.equal(band.view(torch.int32), expected.view(torch.int32)), (case, m1, m2)


@needs_kernels
@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.integers(-4, 4), min_size=1, max_size=300), frac=st.floats(0.0, 1.0))
def test_keep_top_k_abs_matches_the_torch_tie_rule(values, frac):
    x = torch.tensor(values, dtype=torch.float32) * 0.25
    k = max(1, int(frac * x.numel()))
    trimmed = x.clone()
    assert kernels.keep_top_k_abs(trimmed, k)
    assert torch.equal(trimmed, keep_top_k_reference(x, k))


@needs_kernels
def test_a_bracket_that_misses_falls_back_to_the_whole_tensor(monkeypatch):
    """A sample of one repeated entry brackets nothing; the selection must still be exact."""

    class SameIndex:
        def integers(self, low, high, size):
            return np.zeros(size, dtype=np.int64)

    bands = []
    band = kernels._band
    monkeypatch.setattr(kernels.np.random, "default_rng", lambda seed: SameIndex())
    monkeypatch.setattr(kernels, "_band", lambda *a: bands.append(a[2:]) or band(*a))
    x = torch.randn(400_000, generator=torch.Generator().manual_seed(3))
    k = x.numel() // 2
    assert kernels.kth_largest_abs(x, k)[0] == float(x.abs().kthvalue(x.numel() - k + 1).values)
    assert bands == [(abs(float(x[0])),) * 2, (0.0, float("inf"))]


def test_without_kernels_the_torch_path_gives_the_same_ties_merge(monkeypatch):
    d, w = weighted_deltas(3, 200_000, seed=4)
    fused = (methods.magnitude_prune(d[0], 0.3), methods.elected_sum(d, w, "sum", True))
    torch_only(monkeypatch)
    assert kernels.load() is None
    assert kernels.elected_sum(d, w, "sum", True) is None and not kernels.keep_top_k_abs(d[0].clone(), 5)
    assert torch.equal(methods.magnitude_prune(d[0], 0.3), fused[0])
    assert torch.equal(methods.elected_sum(d, w, "sum", True), fused[1])


def test_a_failed_build_means_torch_not_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")
    assert kernels.load() is None
    assert not list((tmp_path / "evomerge" / "kernels").glob("*.so"))  # nothing half-built is left to load


@needs_kernels
def test_kernels_do_not_take_what_they_cannot_handle():
    assert kernels.elected_sum(torch.ones(2, 4, dtype=torch.float64), torch.ones(2, 1), "sum", True) is None
    assert not kernels.keep_top_k_abs(torch.ones(8, 2)[:, 0], 3)  # not contiguous


@pytest.mark.parametrize("key", [0, 1, 2**62 + 12345, 2**63 - 2])
def test_counter_uniform_has_the_same_bits_with_and_without_kernels(monkeypatch, key):
    drawn = methods.counter_uniform((1000, 301), key)
    torch_only(monkeypatch)
    assert torch.equal(methods.counter_uniform((1000, 301), key), drawn)


def test_counter_uniform_is_uniform_on_24_bit_floats():
    u = methods.counter_uniform((1_000_000,), 7)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert torch.equal(u * 2**24, (u * 2**24).floor())
    counts = torch.histc(u, bins=20, min=0.0, max=1.0)
    assert float(((counts - 50_000) ** 2 / 50_000).sum()) < 45  # chi-square, 19 dof: p ~ 0.001
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.005  # neighbours independent


def test_counter_uniform_depends_on_the_key_only():
    a, b = methods.counter_uniform((50_000,), 3), methods.counter_uniform((50_000,), 4)
    assert torch.equal(a[:1000], methods.counter_uniform((1000,), 3))  # element j does not depend on n
    assert float((a == b).float().mean()) < 0.001


def argsort_ranks(rows: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    return torch.empty_like(rows).scatter_(
        1, order, torch.arange(rows.shape[1], dtype=rows.dtype).expand_as(rows)
    )


@needs_kernels
@pytest.mark.parametrize(
    "rows",
    [
        torch.randn(300, 1024, generator=torch.Generator().manual_seed(0)),
        torch.randint(
            -3, 4, (50, 999), generator=torch.Generator().manual_seed(1)
        ).float(),  # ties: index order
        torch.zeros(3, 10),
        torch.randn(1, 100_000, generator=torch.Generator().manual_seed(2)).bfloat16().float(),
        torch.tensor(
            [[float("nan"), 1.0, -0.0, 0.0, float("inf"), -1.0, 2.0**-140]]
        ),  # NaN last, a subnormal
        torch.randn(7, 1, generator=torch.Generator().manual_seed(3)),
    ],
)
def test_abs_ranks_are_the_stable_argsort_positions(rows):
    assert torch.equal(kernels.abs_ranks(rows), argsort_ranks(rows))


def test_della_prune_draws_the_same_with_and_without_kernels(monkeypatch):
    delta = torch.randn(64, 300, generator=torch.Generator().manual_seed(5))
    fused = methods.della_prune(delta, 0.5, 0.1, "l1", torch.Generator().manual_seed(9))
    torch_only(monkeypatch)
    assert torch.equal(methods.della_prune(delta, 0.5, 0.1, "l1", torch.Generator().manual_seed(9)), fused)


def test_bernoulli_prune_keeps_the_same_entries_with_and_without_kernels(monkeypatch):
    delta = torch.randn(3000, 101, generator=torch.Generator().manual_seed(8))
    fused = methods.bernoulli_prune(delta, 0.3, "l1", torch.Generator().manual_seed(2))
    torch_only(monkeypatch)
    assert torch.equal(methods.bernoulli_prune(delta, 0.3, "l1", torch.Generator().manual_seed(2)), fused)
