"""DataFlowSpace: Sakana's data-flow space (DFS, ALGORITHMS.md 4.2): evolve the path tokens take through
the layers of several models, keeping their weights.

Slots: the M = (number of models) x num_layers layers, listed model by model in a fixed order (`sources`,
then the base with `include_base`), repeated `repeats` (r) times: T = M * r slots. Genes:

- `slot/<r>/<model>/L<l>` in [-1, 1], one per slot: the slot is a hop of the path iff its gene is > 0; the
  path keeps the slot order. An all-negative genome keeps the single slot of largest gene (a model needs at
  least one layer);
- scaling (`scaling`): `slot` (default) one scale per slot, `pair` Sakana's W (M x M: the scale of layer j
  when it follows layer i; the first hop has scale 1), or `none`. Scales lie in `scale_range` (default
  [0.5, 1.5]), start at 1.

Decoding gives a mergekit passthrough recipe with one slice per hop (`layer_range` [l, l+1) of the hop's
model); the engine stacks them (`num_hidden_layers` = hops). Embeddings come from the first hop's model,
the final norm and LM head from the last hop's model (the engine's rule for slices).

**Our interpretation** of the scaling: Sakana multiplies the *input* of layer j by W_ij. mergekit's
passthrough has only a per-tensor `scale`, so a hop with scale s gets its residual contribution scaled:
`o_proj` and `down_proj` weights times s (filters `o_proj`, `down_proj`). With RMSNorm at each block's input,
multiplying the stream entering a hop by 1/s changes the balance between the stream and that hop's
update as this does (exactly for the attention block, approximately for the MLP, whose input includes the
attention update); it is not the paper's operator.

Start point (`initial`): the path of `init_model` (a source label, default the first source) in the first
repetition, scales 1, i.e. that model unchanged; for PS+DFS put the PS-merged model first (ALGORITHMS 4.2:
DFS over {PS-merged, sources}; `configs/dataflow_zoo.yaml`). Driver side: no tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import PurePath

import numpy as np

from evomerge.errors import ConfigError
from evomerge.merge.recipe import Conditional, Recipe, Slice, SliceSource
from evomerge.space.base import Space
from evomerge.space.layerwise import check_genome, source_labels

SCALED = ("o_proj", "down_proj")
"""Tensor-name filters whose weights carry a hop's scale (the residual contribution of its two blocks)."""


def path_slots(indicators: np.ndarray) -> list[int]:
    """Slots used by the path, in order: those with a gene > 0, else the single largest gene."""
    used = [int(t) for t in np.flatnonzero(indicators > 0)]
    return used or [int(np.argmax(indicators))]


def hop_scales(path: Sequence[int], n_layers: int, scaling: str, scales: np.ndarray) -> list[float]:
    """The scale of every hop: slot scales (`slot`), W[prev layer, this layer] (`pair`, first hop 1), or 1."""
    if scaling == "none":
        return [1.0] * len(path)
    if scaling == "slot":
        return [float(scales[t]) for t in path]
    w = scales.reshape(n_layers, n_layers)
    layers = [t % n_layers for t in path]
    return [1.0] + [float(w[i, j]) for i, j in zip(layers, layers[1:])]


def scale_setting(s: float) -> list[Conditional] | None:
    """The passthrough `scale` of a hop: s on its residual-writing tensors, 1 elsewhere (None when s = 1)."""
    if s == 1.0:
        return None
    return [*(Conditional(filter=f, value=s) for f in SCALED), Conditional(value=1.0)]


class DataFlowSpace(Space):
    """Indicator genes over T = M * r slots plus per-hop scaling; decodes to a passthrough (stacking) recipe."""

    def __init__(
        self,
        base: str | PurePath,
        sources: Sequence[str | PurePath] | Mapping[str, str | PurePath],
        num_layers: int,
        repeats: int = 3,
        scaling: str = "slot",
        scale_range: Sequence[float] = (0.5, 1.5),
        include_base: bool = False,
        init_model: str | None = None,
    ) -> None:
        labels, refs = source_labels(sources)
        if include_base:
            labels, refs = [*labels, "base"], [*refs, str(base)]
        if not refs:
            raise ConfigError("dataflow space: needs at least one source model")
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ConfigError(f"dataflow space: repeats must be an integer >= 1 (got {repeats!r})")
        if scaling not in ("slot", "pair", "none"):
            raise ConfigError(f"dataflow space: scaling must be slot, pair or none (got {scaling!r})")
        lo, hi = (float(v) for v in scale_range)
        if not 0 <= lo < 1 < hi:
            raise ConfigError(
                f"dataflow space: scale_range must satisfy 0 <= low < 1 < high (got {[lo, hi]})"
            )
        init = labels[0] if init_model is None else init_model
        if init not in labels:
            raise ConfigError(
                f"dataflow space: init_model {init!r} is not a model label ({', '.join(labels)})"
            )
        self.base, self.labels, self.models = str(base), tuple(labels), tuple(refs)
        self.num_layers, self.repeats, self.scaling = int(num_layers), repeats, scaling
        self.n_layers = len(refs) * self.num_layers  # M
        self.n_slots = self.n_layers * repeats  # T
        self.init_index = labels.index(init)
        slot_names = [
            f"slot/{r}/{label}/L{layer}"
            for r in range(repeats)
            for label in labels
            for layer in range(num_layers)
        ]
        if scaling == "slot":
            scale_names = [f"scale/{n.removeprefix('slot/')}" for n in slot_names]
        elif scaling == "pair":
            flat = [f"{label}.L{layer}" for label in labels for layer in range(num_layers)]
            scale_names = [f"scale/{a}->{b}" for a in flat for b in flat]
        else:
            scale_names = []
        self.names = tuple(slot_names + scale_names)
        self.lower = np.array([-1.0] * self.n_slots + [lo] * len(scale_names))
        self.upper = np.array([1.0] * self.n_slots + [hi] * len(scale_names))

    def slot(self, t: int) -> tuple[str, int]:
        """(model ref, layer) of slot t."""
        m = t % self.n_layers
        return self.models[m // self.num_layers], m % self.num_layers

    def initial(self) -> np.ndarray:
        x = np.concatenate([np.full(self.n_slots, -0.5), np.ones(self.dim - self.n_slots)])
        first = self.init_index * self.num_layers
        x[first : first + self.num_layers] = 0.5
        return self.clip(x)

    def path(self, x: np.ndarray) -> list[tuple[str, int, float]]:
        """The decoded path: (model ref, layer, scale) per hop."""
        x = self.clip(check_genome(x, self.names))
        slots = path_slots(x[: self.n_slots])
        scales = hop_scales(slots, self.n_layers, self.scaling, x[self.n_slots :])
        return [(*self.slot(t), s) for t, s in zip(slots, scales)]

    def decode(self, x: np.ndarray) -> Recipe:
        slices = []
        for ref, layer, s in self.path(x):
            params = scale_setting(s)
            source = SliceSource(model=ref, layer_range=(layer, layer + 1),
                                 parameters=None if params is None else {"scale": params})  # fmt: skip
            slices.append(Slice(sources=[source]))
        return Recipe(merge_method="passthrough", slices=slices)

    def __repr__(self) -> str:
        return (
            f"DataFlowSpace(models={list(self.labels)}, layers={self.num_layers}, repeats={self.repeats}, "
            f"slots={self.n_slots}, scaling={self.scaling}, dim={self.dim})"
        )
