"""Merge methods: one pure function per method over fp32 tensors, plus the registry.

Every function has the shape ``f(base, tensors, *, gen, **params) -> Tensor`` where ``base`` is the base
model's tensor (or None) and ``tensors`` is ``[k, *shape]``: the k inputs stacked. Which inputs are in
``tensors`` depends on the method's ``base`` policy (see ``Method``). Per-source parameters arrive as
tuples of k floats, global ones as scalars. No I/O, no logging, no globals: the engine owns all that.

Formulas follow ALGORITHMS.md section 2 and, for every method mergekit 0.1.5 also has, mergekit's
behaviour (tests compare the two). Tie rules are stated where they matter.

| method            | base     | per source                    | global                                   |
|-------------------|----------|-------------------------------|------------------------------------------|
| linear            | input    | weight                        | normalize=True                           |
| task_arithmetic   | required | weight                        | lambda=1, normalize=False                |
| ties              | required | weight, density=1             | lambda=1, normalize=True                 |
| dare_ties         | required | weight, density=1             | lambda=1, normalize=False, rescale=True  |
| dare_linear       | required | weight, density=1             | lambda=1, normalize=False, rescale=True  |
| breadcrumbs(_ties)| required | weight, density=1, gamma=0.01 | lambda=1, normalize=False, rescale=False |
| della(_linear)    | required | weight, density=1, eps=0.15   | lambda=1, normalize=True(False), rescale |
| sce               | required | -                             | select_topk=1                            |
| model_stock       | required | -                             | filter_wise=False                        |
| slerp             | required | -                             | t                                        |
| nuslerp           | optional | weight                        | nuslerp_flatten=True, nuslerp_row_wise   |
| multislerp        | optional | weight                        | normalize_weights=True, eps=1e-8         |
| karcher           | input    | -                             | max_iter=10, tol=1e-5                    |
| passthrough       | input    | scale=None                    | -                                        |
| tsv_m, iso_c      | required | -                             | alpha=1  (not in mergekit)               |
| evo_merging       | required | weight (signed), density=1, density_neg=None | - (ours; not in mergekit) |

Search ranges (`Param.search`, read by `evomerge.space`; other parameters are not searched): weight
[0, 1], density [0.1, 1] (where a sparsifier uses it), lambda [0.5, 1.5], gamma [0, 0.1], epsilon [0, 0.1], select_topk [0.1, 1],
t [0, 1], alpha [0.5, 1.5]; evo_merging: weight (signed scale) [-1.5, 1.5], density and density_neg
[0.05, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from evomerge.errors import ConfigError, MergeError
from evomerge.merge import kernels
from evomerge.registry import Registry

_RESCALE_ALIASES = {True: "l1", False: "none", "true": "l1", "false": "none"}
"""mergekit writes `rescale: true|false`; evomerge also accepts l1 | inverse_density | none."""

REQUIRED: Any = object()
"""Sentinel default of a parameter that the recipe must give."""


@dataclass(frozen=True)
class Param:
    """A parameter a method declares, so a recipe can be checked before any tensor is read."""

    name: str
    kind: type = float
    per_source: bool = False
    default: Any = REQUIRED
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] | None = None
    search: tuple[float, float] | None = None
    """The range a search tunes this parameter over (inside low/high); None: not searched."""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def validate(self, value: Any, where: str) -> Any:
        """Coerce a resolved scalar to the declared kind and check its range; errors name `where`."""
        if value is None and not self.required and self.default is None:
            return None
        try:
            if self.kind is bool:
                if isinstance(value, str):
                    value = {"true": True, "false": False}[value.lower()]
                value = bool(value)
            elif self.kind is str:
                value = _RESCALE_ALIASES.get(value, value) if self.name == "rescale" else value
                value = str(value)
            else:
                if isinstance(value, bool):
                    raise TypeError
                value = self.kind(float(value)) if self.kind is int else float(value)
        except (TypeError, ValueError, KeyError):
            raise ConfigError(
                f"{where}: parameter {self.name!r} must be {self.kind.__name__} (got {value!r})"
            ) from None
        if self.choices is not None and value not in self.choices:
            raise ConfigError(
                f"{where}: parameter {self.name!r} must be one of {', '.join(self.choices)} (got {value!r})"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}: parameter {self.name!r} must be finite (got {value})")
        if self.low is not None and value < self.low:
            raise ConfigError(f"{where}: parameter {self.name!r} must be >= {self.low} (got {value})")
        if self.high is not None and value > self.high:
            raise ConfigError(f"{where}: parameter {self.name!r} must be <= {self.high} (got {value})")
        return value


BasePolicy = Literal["required", "optional", "input"]


@dataclass(frozen=True)
class Method:
    """A registry row. `base`: required = base passed apart, `tensors` = the other inputs;
    optional = the same when a base is given; input = the base is one of `tensors` like any model."""

    name: str
    fn: Callable[..., Tensor]
    params: tuple[Param, ...]
    base: BasePolicy
    min_sources: int = 1
    max_sources: int | None = None
    random: bool = False
    in_mergekit: bool = True
    url: str = ""
    coefficients: Callable[..., list[float] | None] | None = None
    """For methods that are a fixed linear combination of their inputs (given the parameters): the
    coefficient of every input, base included, in input order. The engine then merges with one
    matrix-vector product, which is what makes an in-place candidate switch run at memory bandwidth."""

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)


METHODS: Registry[Method] = Registry("merge method")


def _per_source(values: tuple[float, ...], like: Tensor) -> Tensor:
    """Per-source scalars as a [k, 1, 1, ...] tensor that broadcasts over a stacked [k, *shape]."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, *([1] * (like.dim() - 1)))


# --------------------------------------------------------------------------------------- sparsification


def _kth_largest(values: Tensor, k: int) -> float:
    """The k-th largest entry of a flat tensor. On the CPU numpy's introselect is ~10x faster than kthvalue."""
    n = values.numel()
    if values.device.type == "cpu":
        return float(np.partition(values.detach().numpy(), n - k)[n - k])
    return float(values.kthvalue(n - k + 1).values)


def top_k_mask(magnitude: Tensor, k: int) -> Tensor:
    """Boolean mask of the k largest entries of a flat tensor; equal values keep the lower index.

    O(n) selection of the threshold instead of a full sort; the tie rule matches a stable descending argsort.
    """
    n = magnitude.numel()
    if k >= n:
        return torch.ones_like(magnitude, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    threshold = _kth_largest(magnitude, k)
    return _drop_surplus_ties(magnitude >= threshold, magnitude, threshold, k)


def _drop_surplus_ties(mask: Tensor, values: Tensor, threshold: float, k: int) -> Tensor:
    """`mask` holds every entry on the kept side of `threshold`, ties included; when that is more than k, the
    ties at the highest indices drop out (equal values keep the lower index)."""
    extra = int(torch.count_nonzero(mask)) - k
    if extra > 0:
        ties = (values == threshold).nonzero().flatten()
        mask[ties[len(ties) - extra :]] = False
    return mask


def rescale_to_norm(original: Tensor, masked: Tensor, rescale: bool | str, density: float | Tensor) -> Tensor:
    """Rescale a sparsified delta: l1 (mergekit; matches the L1 norm, skipped when a norm is < 1e-7),
    inverse_density (DARE/DELLA papers: divide by the keep probability) or none."""
    mode = {True: "l1", False: "none"}.get(rescale, rescale) if isinstance(rescale, bool) else rescale
    if mode == "none":
        return masked
    if mode == "inverse_density":  # density 0 keeps nothing: return the zeros, not 0/0 = NaN
        return masked / density if isinstance(density, Tensor) or density > 0 else masked
    before, after = original.abs().sum(), masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def magnitude_prune(delta: Tensor, density: float, *, inplace: bool = False) -> Tensor:
    """TIES trim: keep the max(1, floor(d*n)) largest |delta| entries (d <= 0 drops the delta, d >= 1 keeps all).
    `inplace` zeroes the others in `delta` itself (no new tensor of its size)."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return delta.zero_() if inplace else torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    if delta.is_contiguous():
        target = delta if inplace else delta.clone()
        if kernels.keep_top_k_abs(target.view(-1), k):  # one fused pass; the same entries as top_k_mask
            return target
    mask = top_k_mask(delta.abs().flatten(), k).view_as(delta)
    return delta.mul_(mask) if inplace else delta * mask


_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
"""SplitMix64's counter step and output multipliers."""


def _signed64(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


def _shift_right(z: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 bits (torch's >> sign-extends)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def counter_uniform(shape: torch.Size | tuple[int, ...], key: int) -> Tensor:
    """Uniforms in [0, 1) for the keep draws of DARE and DELLA: element j is SplitMix64's output function of the
    counter key + j * golden, as a 24-bit float. Stateless, so the C kernel (`kernels.uniform`) splits it over
    threads and this torch reference, used without the kernels, gives the same bits. int64 products wrap as
    uint64's do. The kernel draws 2.9M in 1.6 ms, where torch.bernoulli took 37 ms."""
    n = math.prod(shape)
    fused = kernels.uniform(n, key)
    if fused is not None:
        return fused.view(shape)
    step, m1, m2 = (_signed64(c) for c in _MIX)
    z = torch.arange(n, dtype=torch.int64) * step + _signed64(key)
    z = (z ^ _shift_right(z, 30)) * m1
    z = (z ^ _shift_right(z, 27)) * m2
    z ^= _shift_right(z, 31)
    return (_shift_right(z, 40).to(torch.float32) * 2.0**-24).view(shape)


def draw_key(gen: torch.Generator | None) -> int:
    """A 63-bit counter key from the merge's generator: each tensor and source draws its own, per seed."""
    return int(torch.randint(0, 2**63 - 1, (1,), generator=gen))


def bernoulli_prune(
    delta: Tensor, density: float, rescale: bool | str, gen: torch.Generator | None
) -> Tensor:
    """DARE: keep each entry with probability d, then rescale."""
    if density >= 1:
        return delta
    key = draw_key(gen)
    masked = kernels.dare_mask(delta, key, density)
    if masked is None:
        masked = delta * (counter_uniform(delta.shape, key) < density)
    return rescale_to_norm(delta, masked, rescale, density)


def breadcrumbs_prune(
    delta: Tensor, density: float, gamma: float, rescale: bool | str, *, inplace: bool = False
) -> Tensor:
    """Model Breadcrumbs: drop the top gamma fraction and the smallest entries, keep floor(d*n) in between.

    n_top = floor(gamma*n), n_keep = floor(d*n), n_bot = max(0, n - n_keep - n_top); the kept band is
    [n_bot, n_bot + n_keep) of a stable ascending sort of |delta| (explicit end, not mergekit's old -0 slice).
    `inplace` zeroes the others in `delta` itself where it can (no rescale, the kernels); check the result.
    """
    if density >= 1:
        return delta
    n = delta.numel()
    n_keep, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - n_keep - n_top)
    if delta.is_contiguous():
        band = delta if inplace and rescale in (False, "none") else delta.clone()
        if kernels.keep_abs_band(band.view(-1), n_bot, n_bot + n_keep):  # the same entries as the masks below
            return rescale_to_norm(delta, band, rescale, density)
    magnitude = delta.abs().flatten()
    mask = lowest_m_mask(magnitude, n_bot + n_keep) & ~lowest_m_mask(magnitude, n_bot)
    return rescale_to_norm(delta, delta * mask.view_as(delta), rescale, density)


def lowest_m_mask(values: Tensor, m: int) -> Tensor:
    """Boolean mask of the first m entries of a stable ascending sort of a flat tensor (equal values: the lower
    index first), by one O(n) selection instead of the sort."""
    n = values.numel()
    if m >= n:
        return torch.ones_like(values, dtype=torch.bool)
    if m <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    threshold = _kth_largest(values, n - m + 1)  # the m-th smallest
    return _drop_surplus_ties(values <= threshold, values, threshold, m)


def della_prune(
    delta: Tensor, density: float, epsilon: float, rescale: bool | str, gen: torch.Generator | None
) -> Tensor:
    """DELLA MagPrune: per row, keep probability rises linearly with the magnitude rank from d-eps to d+eps.

    1-D tensors are one row; >2-D tensors are ranked over rows of the flattened trailing dims. A row of
    one element gets rank 0.5 (keep probability d).
    """
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    if density - epsilon <= 0 or density + epsilon >= 1:
        raise MergeError(
            f"della: density +/- epsilon must lie in (0, 1) (density {density}, epsilon {epsilon})"
        )
    rows = delta.reshape(delta.shape[0], -1) if delta.dim() > 1 else delta.view(1, -1)
    ranks = kernels.abs_ranks(rows)
    if ranks is None:
        order = torch.argsort(rows.abs(), dim=1, stable=True)
        positions = torch.arange(rows.shape[1], dtype=rows.dtype, device=rows.device).expand_as(rows)
        ranks = torch.empty_like(rows).scatter_(1, order, positions)  # the inverse permutation: one sort
    width = rows.shape[1] - 1
    rank_norm = ranks / width if width > 0 else torch.full_like(rows, 0.5)
    keep_prob = (density - epsilon) + 2 * epsilon * rank_norm
    keep = counter_uniform(keep_prob.shape, draw_key(gen)) < keep_prob
    scale = keep_prob.view_as(delta) if rescale == "inverse_density" else density
    return rescale_to_norm(delta, (rows * keep).view_as(delta), rescale, scale)


def sign_agreement(deltas: Tensor, consensus: str = "sum") -> Tensor:
    """TIES election: majority sign per element (`sum` of values or `count` of signs; 0 elects +1),
    then a mask of the entries that agree with it (zeros never agree)."""
    signs = deltas.sign()
    votes = deltas.sum(0) if consensus == "sum" else signs.sum(0)
    elected = (votes >= 0).to(deltas.dtype) * 2 - 1
    return signs == elected


# ----------------------------------------------------------------------------------------- methods


def linear(
    base: Tensor | None, tensors: Tensor, *, weight: tuple[float, ...], normalize: bool = True, **_: Any
) -> Tensor:
    """Model soup (Wortsman et al. 2022): sum_i w_i theta_i, divided by sum_i w_i when normalize."""
    total = sum(weight)
    if normalize and abs(total) < 1e-8:
        raise MergeError(
            f"linear: weights sum to {total}; cannot normalize (set normalize: false or change weights)"
        )
    w = torch.tensor(weight, dtype=tensors.dtype, device=tensors.device)
    merged = (w @ tensors.reshape(len(weight), -1)).view(tensors.shape[1:])  # one BLAS pass over the inputs
    return merged / total if normalize else merged


def task_arithmetic_family(
    base: Tensor,
    tensors: Tensor,
    *,
    weight: tuple[float, ...],
    lambda_: float = 1.0,
    normalize: bool = False,
    density: tuple[float, ...] | None = None,
    gamma: tuple[float, ...] | None = None,
    epsilon: tuple[float, ...] | None = None,
    rescale: bool | str = False,
    sparsify: str | None = None,
    consensus: str | None = None,
    gen: torch.Generator | None = None,
    **_: Any,
) -> Tensor:
    """Task arithmetic with optional sparsification (TIES/DARE/breadcrumbs/DELLA) and sign election.

    theta = theta0 + lambda * sum_i a_i w_i tau~_i / (sum_i a_i w_i if normalize), where tau~ is the sparsified
    task vector and a_i the agreement mask (all ones without election). The election uses the weighted
    deltas, so a negative weight flips a model's vote. A zero divisor is replaced by 1.
    """
    if tensors.shape[0] == 0:
        return base
    deltas = tensors - base
    if sparsify is not None:
        for i in range(deltas.shape[0]):
            d = density[i]
            if sparsify == "magnitude":
                magnitude_prune(deltas[i], d, inplace=True)
            elif sparsify == "random":
                deltas[i] = bernoulli_prune(deltas[i], d, rescale, gen)
            elif sparsify == "magnitude_outliers":
                kept = breadcrumbs_prune(deltas[i], d, gamma[i], rescale, inplace=True)
                if kept.data_ptr() != deltas[i].data_ptr():
                    deltas[i] = kept
            else:
                deltas[i] = della_prune(deltas[i], d, epsilon[i], rescale, gen)
    w = _per_source(weight, deltas)
    deltas.mul_(w)
    if consensus is not None:
        return base + lambda_ * elected_sum(deltas, w, consensus, normalize)
    merged = deltas.sum(0)
    if normalize:
        merged = merged / (sum(weight) if abs(sum(weight)) >= 1e-8 else 1.0)
    return base + lambda_ * merged


CACHE_CHUNK = 1 << 16  # elements per source and block: the K-row temporaries of a block stay in L2


def elected_sum(deltas: Tensor, w: Tensor, consensus: str, normalize: bool) -> Tensor:
    """sum_i a_i d_i (divided by sum_i a_i w_i when normalize; a zero divisor counts as 1), with a_i the
    agreement of d_i (the weighted deltas) with the elected sign (`sign_agreement`). One pass of the fused C
    kernel where it is available (`kernels`), else `elected_sum_blocks`: bit-identical up to 3 sources, equal to
    rounding beyond (torch's sum over more rows changes its order with the block length)."""
    fused = kernels.elected_sum(deltas, w, consensus, normalize)
    return fused if fused is not None else elected_sum_blocks(deltas, w, consensus, normalize)


def elected_sum_blocks(deltas: Tensor, w: Tensor, consensus: str, normalize: bool) -> Tensor:
    """`elected_sum` in torch. Block by block over the elements: each block's election, mask and sums run on
    K x CACHE_CHUNK values that stay in cache, where the whole-tensor form streams K-sized temporaries through
    memory several times (~2.4x slower on 2 cores). Each output element is the same expression over the same operands: bit-identical."""
    flat = deltas.reshape(deltas.shape[0], -1)
    wf = w.reshape(-1, 1)
    out = torch.empty(flat.shape[1], dtype=deltas.dtype, device=deltas.device)
    for lo in range(0, flat.shape[1], CACHE_CHUNK):
        block = flat[:, lo : lo + CACHE_CHUNK]
        mask = sign_agreement(block, consensus).to(block.dtype)
        merged = (block * mask).sum(0)
        if normalize:
            divisor = (wf * mask).sum(0)
            divisor += divisor == 0
            merged /= divisor
        out[lo : lo + CACHE_CHUNK] = merged
    return out.view(deltas.shape[1:])


def asymmetric_magnitude_prune(delta: Tensor, density_pos: float, density_neg: float) -> Tensor:
    """Evo-Merging's asymmetric sparsification [ours]: the max(1, floor(d+ * n+)) largest positive entries
    and the max(1, floor(d- * n-)) most negative ones (n+/n-: how many entries have that sign). Each side
    is a magnitude top-k over its own entries, so d+ = d- is *not* the symmetric top-k over all entries.
    Ties keep the lower flat index (`top_k_mask`)."""
    flat = delta.flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    for side, d in ((flat > 0, density_pos), (flat < 0, density_neg)):
        n = int(torch.count_nonzero(side))
        if n == 0 or d <= 0:
            continue
        k = n if d >= 1 else max(1, int(d * n))
        idx = side.nonzero().flatten()
        keep[idx[top_k_mask(flat[idx].abs(), k)]] = True
    return (flat * keep).view_as(delta)


def evo_merging(
    base: Tensor,
    tensors: Tensor,
    *,
    weight: tuple[float, ...],
    density: tuple[float, ...],
    density_neg: tuple[float | None, ...] | None = None,
    **_: Any,
) -> Tensor:
    """Evo-Merging, **our interpretation** of the abstract of "Black-box Model Merging for
    Language-Model-as-a-Service with Massive Model Repositories" (ALGORITHMS.md 4.5; no code was released).

    tau^_i = magnitude top-k(tau_i, d_i) (denoising; no rescale), or the asymmetric prune with d+ = density,
    d- = density_neg when density_neg is given; s = sign(sum_i c_i tau^_i) per element (0 elects +1);
    theta = theta0 + sum_i c_i a_i tau^_i with a_i = [sign(c_i tau^_i) == s]. There is no division by the
    kept weights (unlike TIES), so the signed scales c_i (`weight`, searched in [-1.5, 1.5]) carry the
    magnitude, and a harmful model can be subtracted (negative c_i)."""
    if tensors.shape[0] == 0:
        return base
    deltas = tensors - base
    for i in range(deltas.shape[0]):
        neg = None if density_neg is None else density_neg[i]
        if neg is None:
            deltas[i] = magnitude_prune(deltas[i], density[i])
        else:
            deltas[i] = asymmetric_magnitude_prune(deltas[i], density[i], neg)
    deltas.mul_(_per_source(weight, deltas))
    agree = sign_agreement(deltas, "sum").to(deltas.dtype)
    return base + (deltas * agree).sum(0)


def slerp(base: Tensor, tensors: Tensor, *, t: float, **_: Any) -> Tensor:
    """Spherical interpolation from the base (t = 0) to the other model (t = 1), one angle per tensor.

    Nearly parallel or anti-parallel pairs (|cos| > 0.9995) fall back to linear interpolation; norms below
    1e-8 are treated as 1 so zero tensors do not produce NaN.
    """
    v0, v1 = base.flatten(), tensors[0].flatten()
    n0, n1 = v0.norm(), v1.norm()
    n0 = torch.where(n0 > 1e-8, n0, torch.ones_like(n0))
    n1 = torch.where(n1 > 1e-8, n1, torch.ones_like(n1))
    dot = ((v0 / n0) * (v1 / n1)).sum().clamp(-1, 1)
    if dot.abs() > 0.9995:
        return ((1 - t) * v0 + t * v1).view_as(base)
    theta = torch.acos(dot)
    s0, s1 = torch.sin((1 - t) * theta) / torch.sin(theta), torch.sin(t * theta) / torch.sin(theta)
    return (s0 * v0 + s1 * v1).view_as(base)


def _slerp_along(t: float, v0: Tensor, v1: Tensor, dim: int, flatten: bool) -> Tensor:
    """SLERP of two tensors with one angle per vector along `dim` (or per tensor when `flatten`)."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(-1, keepdim=True).clamp(-1, 1)
    # mergekit tests 1 - cos^2 <= 1e-16, which fp32 meets only for exactly colinear vectors: a nearly
    # anti-parallel pair then divides by a tiny sin and blows up. Use SLERP's |cos| > 0.9995 instead.
    colinear = cos.abs() > 0.9995
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


def nuslerp(
    base: Tensor | None,
    tensors: Tensor,
    *,
    weight: tuple[float, float],
    nuslerp_flatten: bool = True,
    nuslerp_row_wise: bool = False,
    **_: Any,
) -> Tensor:
    """NuSLERP: t = w_b/(w_a + w_b) (0.5 if the sum is ~0); with a base, SLERP the two task vectors."""
    total = weight[0] + weight[1]
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    dim = 0 if nuslerp_row_wise else -1
    if base is None:
        return _slerp_along(t, tensors[0], tensors[1], dim, nuslerp_flatten)
    return base + _slerp_along(t, tensors[0] - base, tensors[1] - base, dim, nuslerp_flatten)


def multislerp(
    base: Tensor | None,
    tensors: Tensor,
    *,
    weight: tuple[float, ...],
    normalize_weights: bool = True,
    eps: float = 1e-8,
    **_: Any,
) -> Tensor:
    """Barycentric interpolation on the hypersphere: map the unit vectors to the tangent space at their
    weighted mean, average there, map back with the exponential map, rescale to the weighted mean norm.
    With a base, works on task vectors. Exactly antipodal inputs with balancing weights are an error
    (two inputs fall back to linear interpolation)."""
    if tensors.shape[0] == 1:
        return tensors[0]
    vecs = tensors - base if base is not None else tensors
    flat = vecs.reshape(vecs.shape[0], -1)
    w = torch.tensor(weight, dtype=flat.dtype, device=flat.device)
    if normalize_weights:
        w = w / w.sum()
    norms = flat.norm(dim=-1, keepdim=True)
    if bool(
        (norms <= eps).all()
    ):  # every input equals the base (e.g. a frozen layer): nothing to interpolate
        return base.clone() if base is not None else torch.zeros_like(vecs[0])
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    if mean.norm() < eps:
        if flat.shape[0] != 2:
            raise MergeError(
                "multislerp: the weighted mean of the inputs is zero (antipodal inputs); change weights"
            )
        out = (flat[0] * w[0] + flat[1] * w[1]).view(vecs.shape[1:])
        return out + base if base is not None else out
    mean = mean / mean.norm()
    tangent = ((units - (units * mean).sum(-1, keepdim=True) * mean) * w[:, None]).sum(0)
    tnorm = tangent.norm() + eps
    out = (mean * torch.cos(tnorm) + tangent * (torch.sin(tnorm) / tnorm)) * (norms.squeeze(-1) * w).sum()
    out = out.view(vecs.shape[1:])
    return out + base if base is not None else out


def karcher(
    base: Tensor | None, tensors: Tensor, *, max_iter: int = 10, tol: float = 1e-5, **_: Any
) -> Tensor:
    """Karcher (Riemannian) mean on the unit sphere with equal weights, rescaled by the mean norm.

    Models with norm <= tol are left out of the direction but count (as 0) in the output norm.
    """
    k = tensors.shape[0]
    if k == 1:
        return tensors[0]
    flat = tensors.reshape(k, -1)
    norms = flat.norm(dim=1)
    valid = [i for i in range(k) if norms[i] > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    units = flat[valid] / norms[valid, None]
    alphas = torch.full((len(valid),), 1.0 / len(valid), dtype=flat.dtype, device=flat.device)
    mean = (alphas[:, None] * units).sum(0)
    mean = units[0].clone() if mean.norm() < tol else mean / mean.norm()
    for _ in range(max_iter):
        cos = (units @ mean).clamp(-1, 1)
        phi = torch.acos(cos)
        moving = phi >= tol
        if not bool(moving.any()):
            break
        factor = torch.where(
            moving, alphas * phi / torch.sin(torch.where(moving, phi, torch.ones_like(phi))), 0
        )
        tangent = (factor[:, None] * (units - cos[:, None] * mean[None, :])).sum(0)
        tnorm = tangent.norm()
        if tnorm < tol:
            break
        mean = torch.cos(tnorm) * mean + torch.sin(tnorm) * tangent / tnorm
        if mean.norm() > tol:
            mean = mean / mean.norm()
    return (norms.sum() / k * mean).view_as(tensors[0])


def sce(base: Tensor, tensors: Tensor, *, select_topk: float = 1.0, **_: Any) -> Tensor:
    """SCE (FuseChat 2.0): select high-variance positions, per-model weights from mean squared delta,
    erase entries that disagree with the elected sign."""
    if tensors.shape[0] == 0:
        return base
    deltas = tensors - base
    if select_topk < 1:
        if select_topk <= 0:
            deltas = deltas * 0
        else:
            var = deltas.var(0, unbiased=False).flatten()
            k = int(int(torch.count_nonzero(var)) * select_topk)
            deltas = deltas * top_k_mask(var.abs(), k).view(deltas.shape[1:]).to(deltas.dtype)
    mask = sign_agreement(deltas, "sum").to(deltas.dtype)
    energy = deltas.square().reshape(deltas.shape[0], -1).mean(1)
    total = float(energy.sum())
    c = torch.full_like(energy, 1 / len(energy)) if abs(total) < 1e-6 else energy / total
    c = c.view(-1, *([1] * (deltas.dim() - 1))) * mask
    return base + (deltas * c).sum(0) / c.sum(0).clamp(min=1e-6)


def model_stock(
    base: Tensor, tensors: Tensor, *, filter_wise: bool = False, clamp_t: bool = False, **_: Any
) -> Tensor:
    """Model Stock (Jang et al. 2024): t = K cos / (1 + (K-1) cos) from the mean pairwise cosine of the
    offsets; theta = t * mean_i theta_i + (1 - t) * theta0. A singular denominator keeps the base.
    `clamp_t` (evomerge extension) clamps t to [0, 1] for anti-correlated offsets."""
    k = tensors.shape[0]
    if k < 2:
        raise MergeError(f"model_stock needs a base and at least 2 other models (got {k})")
    shape = base.shape
    if filter_wise:
        w0 = base if base.dim() > 1 else base.unsqueeze(0)
        ws = tensors if base.dim() > 1 else tensors.unsqueeze(1)
    else:
        w0, ws = base.reshape(-1), tensors.reshape(k, -1)
    offsets = ws - w0
    norms = offsets.norm(dim=-1)
    cosines = [
        ((offsets[i] * offsets[j]).sum(-1) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
        for i in range(k)
        for j in range(i + 1, k)
    ]
    cos = torch.stack(cosines).mean(0).unsqueeze(-1)
    denom = 1 + (k - 1) * cos
    singular = denom.abs() < 1e-6
    t = torch.where(
        singular, torch.zeros_like(cos), k * cos / torch.where(singular, torch.ones_like(denom), denom)
    )
    if clamp_t:
        t = t.clamp(0, 1)
    return (t * ws.mean(0) + (1 - t) * w0).reshape(shape)


def passthrough(
    base: Tensor | None, tensors: Tensor, *, scale: tuple[float | None, ...] = (None,), **_: Any
) -> Tensor:
    """Copy the single input tensor, optionally multiplied by `scale`."""
    return tensors[0] if scale[0] is None else tensors[0] * scale[0]


def _polar(m: Tensor) -> Tensor:
    """Orthogonal polar factor P Q^T of M = P S Q^T (the nearest matrix with orthonormal columns/rows)."""
    p, _, qt = torch.linalg.svd(m, full_matrices=False)
    return p @ qt


def tsv_m(base: Tensor, tensors: Tensor, *, alpha: float = 1.0, **_: Any) -> Tensor:
    """TSV-Merge (Gargiulo et al. 2025): keep each task's top r = floor(min(out,in)/T) singular triplets,
    stack them, replace the stacked U and V^T by their polar factors (decorrelating tasks), recombine.
    Non-2-D tensors (and T > min(out, in)) use the mean task vector."""
    deltas = tensors - base
    n_tasks = deltas.shape[0]
    if base.dim() != 2 or min(base.shape) // n_tasks == 0:
        return base + alpha * deltas.mean(0)
    k = min(base.shape)
    r = k // n_tasks
    u_bar = deltas.new_zeros(base.shape[0], k)
    s_bar = deltas.new_zeros(k)
    vt_bar = deltas.new_zeros(k, base.shape[1])
    for i in range(n_tasks):
        u, s, vt = torch.linalg.svd(deltas[i], full_matrices=False)
        u_bar[:, i * r : (i + 1) * r] = u[:, :r]
        s_bar[i * r : (i + 1) * r] = s[:r]
        vt_bar[i * r : (i + 1) * r, :] = vt[:r, :]
    return base + alpha * (_polar(u_bar) * s_bar) @ _polar(vt_bar)


def iso_c(base: Tensor, tensors: Tensor, *, alpha: float = 1.0, **_: Any) -> Tensor:
    """Iso-C (Marczak et al. 2025): SVD of the summed task vectors with every singular value replaced by
    their mean (an isotropic spectrum). Non-2-D tensors use the mean task vector."""
    deltas = tensors - base
    if base.dim() != 2:
        return base + alpha * deltas.mean(0)
    u, s, vt = torch.linalg.svd(deltas.sum(0), full_matrices=False)
    return base + alpha * s.mean() * (u @ vt)


# ------------------------------------------------------------------------ linear-combination forms


def linear_coefficients(n: int, base_index: int | None, *, weight: tuple[float, ...], normalize: bool = True,
                        **_: Any) -> list[float] | None:  # fmt: skip
    """linear = sum_i (w_i / sum w) theta_i (the base, if listed, is an input like any other)."""
    total = sum(weight)
    if normalize and abs(total) < 1e-8:
        return None  # let the method raise its error
    return [w / total for w in weight] if normalize else list(weight)


def task_arithmetic_coefficients(n: int, base_index: int | None, *, weight: tuple[float, ...],
                                 lambda_: float = 1.0, normalize: bool = False, **_: Any) -> list[float]:  # fmt: skip
    """theta0 + lambda * sum_i w_i (theta_i - theta0) / D  =  (1 - sum_i c_i) theta0 + sum_i c_i theta_i,
    with c_i = lambda w_i / D and D = sum w (normalize, unless ~0) or 1."""
    total = sum(weight)
    divisor = total if normalize and abs(total) >= 1e-8 else 1.0
    experts = iter(lambda_ * w / divisor for w in weight)
    coeffs = [0.0 if i == base_index else next(experts) for i in range(n)]
    coeffs[base_index] = 1.0 - sum(coeffs)
    return coeffs


# ---------------------------------------------------------------------------------------- registry

_WEIGHT = Param("weight", per_source=True, search=(0.0, 1.0))
_DENSITY = Param("density", per_source=True, default=1.0, low=0.0, high=1.0, search=(0.1, 1.0))  # 0 drops all
_LAMBDA = Param("lambda", default=1.0, search=(0.5, 1.5))
_INT8_MASK = Param("int8_mask", bool, default=False)  # mergekit memory option; results are identical


def _gta(
    name: str, url: str, *, sparsify: str | None, consensus: str | None, normalize: bool, rescale: bool
) -> Method:
    """A row of the task-arithmetic family: variants are data (sparsifier, election, defaults), not code."""
    density = _DENSITY if sparsify else replace(_DENSITY, search=None)  # unused without a sparsifier
    params = [_WEIGHT, density, _LAMBDA, _INT8_MASK, Param("normalize", bool, default=normalize)]
    params.append(Param("rescale", str, default=rescale, choices=("l1", "inverse_density", "none")))
    if sparsify == "magnitude_outliers":
        params.append(Param("gamma", per_source=True, default=0.01, low=0.0, high=1.0, search=(0.0, 0.1)))
    if sparsify == "della_magprune":
        params.append(Param("epsilon", per_source=True, default=0.15, low=0.0, high=1.0, search=(0.0, 0.1)))

    def fn(base: Tensor, tensors: Tensor, **kw: Any) -> Tensor:
        return task_arithmetic_family(base, tensors, sparsify=sparsify, consensus=consensus, **kw)

    fn.__name__ = name
    fn.__doc__ = task_arithmetic_family.__doc__
    coefficients = task_arithmetic_coefficients if sparsify is None and consensus is None else None
    return Method(
        name, fn, tuple(params), "required", random=sparsify in ("random", "della_magprune"), url=url,
        coefficients=coefficients,
    )  # fmt: skip


for _row in (
    Method(
        "linear",
        linear,
        (_WEIGHT, Param("normalize", bool, default=True)),
        "input",
        url="https://arxiv.org/abs/2203.05482",
        coefficients=linear_coefficients,
    ),
    _gta(
        "task_arithmetic",
        "https://arxiv.org/abs/2212.04089",
        sparsify=None,
        consensus=None,
        normalize=False,
        rescale=False,
    ),
    _gta(
        "ties",
        "https://arxiv.org/abs/2306.01708",
        sparsify="magnitude",
        consensus="sum",
        normalize=True,
        rescale=False,
    ),
    _gta(
        "dare_ties",
        "https://arxiv.org/abs/2311.03099",
        sparsify="random",
        consensus="sum",
        normalize=False,
        rescale=True,
    ),
    _gta(
        "dare_linear",
        "https://arxiv.org/abs/2311.03099",
        sparsify="random",
        consensus=None,
        normalize=False,
        rescale=True,
    ),
    _gta(
        "breadcrumbs",
        "https://arxiv.org/abs/2312.06795",
        sparsify="magnitude_outliers",
        consensus=None,
        normalize=False,
        rescale=False,
    ),
    _gta(
        "breadcrumbs_ties",
        "https://arxiv.org/abs/2312.06795",
        sparsify="magnitude_outliers",
        consensus="sum",
        normalize=False,
        rescale=False,
    ),
    _gta(
        "della",
        "https://arxiv.org/abs/2406.11617",
        sparsify="della_magprune",
        consensus="sum",
        normalize=True,
        rescale=True,
    ),
    _gta(
        "della_linear",
        "https://arxiv.org/abs/2406.11617",
        sparsify="della_magprune",
        consensus=None,
        normalize=False,
        rescale=True,
    ),
    Method(
        "sce",
        sce,
        (Param("select_topk", default=1.0, low=0.0, high=1.0, search=(0.1, 1.0)), _INT8_MASK),
        "required",
        url="https://arxiv.org/abs/2408.07990",
    ),
    Method(
        "model_stock",
        model_stock,
        (Param("filter_wise", bool, default=False), Param("clamp_t", bool, default=False)),
        "required",
        min_sources=2,
        url="https://arxiv.org/abs/2403.19522",
    ),
    Method(
        "slerp",
        slerp,
        (Param("t", low=0.0, high=1.0, search=(0.0, 1.0)),),
        "required",
        min_sources=1,
        max_sources=1,
        url="https://en.wikipedia.org/wiki/Slerp",
    ),
    Method(
        "nuslerp",
        nuslerp,
        (
            _WEIGHT,
            Param("nuslerp_flatten", bool, default=True),
            Param("nuslerp_row_wise", bool, default=False),
        ),
        "optional",
        min_sources=2,
        max_sources=2,
    ),
    Method(
        "multislerp",
        multislerp,
        (_WEIGHT, Param("normalize_weights", bool, default=True), Param("eps", default=1e-8, low=0.0)),
        "optional",
        url="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    ),
    Method(
        "karcher",
        karcher,
        (Param("max_iter", int, default=10, low=1), Param("tol", default=1e-5, low=0.0)),
        "input",
        url="https://arxiv.org/abs/2603.04972",
    ),
    Method(
        "passthrough", passthrough, (Param("scale", per_source=True, default=None),), "input", max_sources=1
    ),
    Method(
        "tsv_m",
        tsv_m,
        (Param("alpha", default=1.0, search=(0.5, 1.5)),),
        "required",
        in_mergekit=False,
        url="https://arxiv.org/abs/2412.00081",
    ),
    Method(
        "iso_c",
        iso_c,
        (Param("alpha", default=1.0, search=(0.5, 1.5)),),
        "required",
        in_mergekit=False,
        url="https://arxiv.org/abs/2502.04959",
    ),
    Method(
        "evo_merging",
        evo_merging,
        (
            Param("weight", per_source=True, search=(-1.5, 1.5)),  # the signed scale c_i
            Param("density", per_source=True, default=1.0, low=0.0, high=1.0, search=(0.05, 1.0)),
            Param("density_neg", per_source=True, default=None, low=0.0, high=1.0, search=(0.05, 1.0)),
            _INT8_MASK,
        ),
        "required",
        in_mergekit=False,  # paper: "Black-box Model Merging for LMaaS..." (code not released)
    ),
):
    METHODS.add(_row.name, _row)
