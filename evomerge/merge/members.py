"""Tensor side of model-space recipes (see `mixture.py`): apply a `Mixture` in place, build and store an
`Offspring`, and the pool Gram matrices the driver needs for exact SLERP angles of mixtures.

Everything runs one tensor at a time over the flat order of a `FlatLayout`, in fp32 on the worker's device
(float64 for the Gram, which feeds angles).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evomerge.errors import ConfigError, ShapeMismatchError
from evomerge.fsutil import atomic_dir
from evomerge.merge.mixture import FlatLayout, Mixture, Offspring
from evomerge.merge.shards import ONE_SHARD, TOKENIZER_FILES, TensorSpec, copy_files, write_weights
from evomerge.references import locate

Read = Callable[[str, str], torch.Tensor]  # (model ref, tensor name) -> tensor


def model_layout(model: torch.nn.Module, pool_shapes: Sequence[Mapping[str, Any]]) -> FlatLayout:
    return FlatLayout.build(((n, p.shape) for n, p in model.named_parameters()), pool_shapes)


def _params(model: torch.nn.Module, layout: FlatLayout) -> list[torch.Tensor]:
    named = dict(model.named_parameters())
    return [named[n].data for n in layout.names]


def _check_size(layout: FlatLayout, size: int) -> None:
    if layout.size != size:
        raise ShapeMismatchError(f"recipe is for {size} flat parameters; this model has {layout.size}")


@torch.no_grad()
def apply_mixture(mix: Mixture, read: Read, model: torch.nn.Module, layout: FlatLayout) -> None:
    """Overwrite the layout's parameters of `model` with the mixture (the rest stays as it is)."""
    _check_size(layout, mix.size)
    params = _params(model, layout)
    for t, seg, lo, hi in layout.pieces(mix.starts):
        target = params[t].view(-1)
        name = layout.names[t]
        coeffs = mix.coefficients[seg]
        out = target[lo:hi]
        out.zero_()
        for ref, c in zip(mix.models, coeffs):
            if c != 0.0:
                out.add_(read(ref, name).reshape(-1)[lo:hi].to(out.dtype), alpha=c)


@torch.no_grad()
def apply_mixture_stacked(mix: Mixture, stacks: Mapping[str, torch.Tensor], pool_refs: Sequence[str],
                          model: torch.nn.Module, layout: FlatLayout) -> None:  # fmt: skip
    """As `apply_mixture`, with the pool stacked `[K, *shape]` per tensor: one `mv` per (tensor, segment)."""
    _check_size(layout, mix.size)
    index = {r: i for i, r in enumerate(pool_refs)}
    missing = [r for r in mix.models if r not in index]
    if missing:
        raise ConfigError(f"mixture uses {missing[0]}, which is not in the resident pool")
    params = _params(model, layout)
    rows = np.zeros((len(mix.starts), len(pool_refs)))
    for k, ref in enumerate(mix.models):
        rows[:, index[ref]] += np.asarray(mix.coefficients)[:, k]
    for t, seg, lo, hi in layout.pieces(mix.starts):
        stack = stacks[layout.names[t]]
        flat = stack.view(stack.shape[0], -1)
        coeffs = torch.as_tensor(rows[seg], dtype=flat.dtype, device=flat.device)
        torch.mv(flat[:, lo:hi].T, coeffs, out=params[t].view(-1)[lo:hi])


def _noise_generator(seed: int, tensor_index: int, device: torch.device) -> torch.Generator:
    """One independent stream per (noise seed, tensor): noise of a tensor never depends on the others."""
    state = np.random.SeedSequence([seed, tensor_index]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))


def slerp_scales(t: float, cos_omega: float) -> tuple[float, float]:
    """(scale of a, scale of b) of SLERP at weight t of b with angle arccos(cos_omega): the M2N2 reference
    formula, linear when sin(omega) <= 1e-6."""
    omega = math.acos(min(1.0, max(-1.0, cos_omega)))
    sin = math.sin(omega)
    if sin <= 1e-6:
        return 1.0 - t, t
    return math.sin((1.0 - t) * omega) / sin, math.sin(t * omega) / sin


@torch.no_grad()
def build_offspring(off: Offspring, read: Read, model: torch.nn.Module, layout: FlatLayout) -> None:
    """Write the offspring into the layout's parameters of `model` (exactly the M2N2 reference child)."""
    _check_size(layout, off.size)
    params = _params(model, layout)
    a = off.parents[0]
    if len(off.parents) == 1:
        for name, p in zip(layout.names, params):
            p.copy_(read(a, name))
    else:
        b = off.parents[1]
        dot = na = nb = 0.0
        for name in layout.names:
            x, y = read(a, name).double(), read(b, name).double()
            dot += float((x * y).sum())
            na += float((x * x).sum())
            nb += float((y * y).sum())
        cos = dot / math.sqrt(na * nb) if na > 0 and nb > 0 else 1.0  # zero member: linear formula
        if not off.slerp:
            cos = 1.0
        split = off.size if off.split is None else off.split
        segments = [
            (lo, w) for lo, hi, w in ((0, split, off.weight), (split, off.size, 1.0 - off.weight)) if hi > lo
        ]
        starts, weights = [lo for lo, _ in segments], [w for _, w in segments]
        for t, seg, lo, hi in layout.pieces(starts):
            sa, sb = slerp_scales(weights[seg], cos)
            name = layout.names[t]
            out = params[t].view(-1)[lo:hi]
            out.copy_(read(a, name).reshape(-1)[lo:hi]).mul_(sa)
            out.add_(read(b, name).reshape(-1)[lo:hi].to(out.dtype), alpha=sb)
    if off.noise_std > 0:
        for t, p in enumerate(params):
            gen = _noise_generator(off.noise_seed, t, p.device)
            p.add_(
                torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32).to(p.dtype),
                alpha=off.noise_std,
            )


def save_member(
    model: torch.nn.Module, layout: FlatLayout, out: str | Path, config: Mapping[str, Any]
) -> Path:
    """Store a member as a model directory (config.json + one model.safetensors), atomically (temp + rename)."""
    named = dict(model.named_parameters())
    specs = [TensorSpec(n, tuple(named[n].shape), named[n].dtype) for n in layout.names]
    with atomic_dir(out) as tmp:
        write_weights(tmp, specs, lambda spec: named[spec.name].detach(), max_shard_bytes=ONE_SHARD)
        (tmp / "config.json").write_text(json.dumps(dict(config), indent=2))
    return Path(out)


def pool_gram(read: Read, refs: Sequence[str], layout: FlatLayout, boundaries: np.ndarray) -> np.ndarray:
    """Cumulative Gram matrices at the chunk boundaries, `[B, K, K]` float64:
    `G[b, k, l] = sum over flat j < boundaries[b] of theta_k[j] * theta_l[j]`. The inner product of two
    mixtures is then `sum_seg a_seg^T (G[hi] - G[lo]) b_seg`, exact without touching tensors again.
    Reads one tensor of every pool model at a time."""
    k = len(refs)
    pieces = np.zeros((len(boundaries) - 1, k, k))
    for name, off, shape in zip(layout.names, layout.offsets, layout.shapes):
        n = math.prod(shape)
        x = torch.stack([read(r, name).reshape(-1).double() for r in refs])
        first = int(np.searchsorted(boundaries, off, side="right")) - 1
        last = int(np.searchsorted(boundaries, off + n, side="left"))
        cuts = np.clip(boundaries[first : last + 1], off, off + n) - off
        idx = torch.as_tensor(np.repeat(np.arange(len(cuts) - 1), np.diff(cuts)))
        for i in range(k):
            for j in range(i, k):
                sums = torch.zeros(len(cuts) - 1, dtype=torch.float64).index_add_(0, idx, x[i] * x[j])
                pieces[first : first + len(cuts) - 1, i, j] += sums.numpy()
                if i != j:
                    pieces[first : first + len(cuts) - 1, j, i] += sums.numpy()
    return np.concatenate([np.zeros((1, k, k)), np.cumsum(pieces, axis=0)])


def write_model_dir(recipe: Mixture | Offspring, base: str, out: str | Path, *,
                    dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 1024**3) -> Path:  # fmt: skip
    """Materialize a model-space recipe as a model directory beside the base's config and tokenizer, one tensor
    at a time: the base's tensors in the base's order, those of the flat layout replaced by the recipe's.

    A `Mixture` is recomputed from the pool (any candidate); an `Offspring` is read back from the member store,
    which keeps the archive (and whatever a pending child still needs): its parents may be gone, and rebuilding
    it would take its whole lineage."""
    import yaml

    from evomerge.checkpoints import Checkpoint
    from evomerge.merge.target import meta_target

    out = Path(out)
    base_ckpt = Checkpoint(base)
    if isinstance(recipe, Offspring):
        if not (Path(recipe.save) / "model.safetensors").exists():
            raise ConfigError(f"{recipe.save}: this member is no longer in the run's member store (only archive "
                              "members of a mutation run are kept); export an archive member")  # fmt: skip
        stored = Checkpoint(recipe.save)
        members = [stored]
    else:
        members = [Checkpoint(r) for r in recipe.models]
    shapes = [{n: i.shape for n, i in m.tensors.items()} for m in members]
    layout = FlatLayout.build(((n, p.shape) for n, p in meta_target(base).named_parameters()), shapes)
    _check_size(layout, recipe.size)
    index = {n: i for i, n in enumerate(layout.names)}

    def tensor(name: str) -> torch.Tensor:
        info = base_ckpt.tensors[name]
        if name not in index:
            x = base_ckpt.read(name)
        elif isinstance(recipe, Offspring):
            x = stored.read(name)
        else:
            t, off, n = index[name], layout.offsets[index[name]], math.prod(layout.shapes[index[name]])
            flat = torch.zeros(n, dtype=torch.float32)
            full = [ckpt.read(name).reshape(-1).float() for ckpt in members]  # each source read once
            for (lo, hi), row in zip(recipe.segment_bounds(), recipe.coefficients):
                a, b = max(lo, off) - off, min(hi, off + n) - off
                if a < b:
                    for src, c in zip(full, row):
                        if c != 0.0:
                            flat[a:b].add_(src[a:b], alpha=c)
            x = flat.view(layout.shapes[t])
        return x.to(dtype or info.dtype).contiguous()

    if out.exists():
        raise ConfigError(f"{out}: output directory already exists")
    with atomic_dir(out) as tmp:  # shards planned from the headers, then written one tensor at a time
        specs = [TensorSpec(n, tuple(i.shape), dtype or i.dtype) for n, i in base_ckpt.tensors.items()]
        write_weights(tmp, specs, lambda spec: tensor(spec.name), max_shard_bytes)
        copy_files(locate(base), tmp, ("config.json", *TOKENIZER_FILES))
        (tmp / "evomerge_recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    return out
