"""EvoMergingSpace: the genome of Evo-Merging (ALGORITHMS.md 4.5, **our interpretation**; only the paper's
abstract was available): per source model (and per layer group), a density d in (0, 1] for the magnitude
top-k denoising and a signed scale c in [-c_max, c_max]; with `asymmetric`, a second density for the
negative entries. Decoded into an `evo_merging` recipe (see `evomerge.merge.methods.evo_merging`) by the
layer-wise genome machinery, so any vector strategy (CMA by default) searches it through the normal engine.

Start point: c_i = 1/M and d_i = `init_density` (0.5: the middle of the pruning range, not the box edge),
or, with `init_scores` (one cheap evaluation of the base and of each source, e.g. the zoo's SCORES.json),
c_i = init_total * (s_i - s_base) / sum_j |s_j - s_base|: better-than-base models start positive, worse ones
negative, as the abstract's sign-aware scaling suggests. Driver side: no tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import PurePath

import numpy as np

from evomerge.errors import ConfigError
from evomerge.space.layerwise import LayerwiseSpace


def initial_scales(scores: Sequence[float], base_score: float, total: float = 1.0) -> np.ndarray:
    """c_i = total * (s_i - s_base) / sum_j |s_j - s_base| (all 1/M * total when no model differs)."""
    diff = np.asarray(scores, dtype=np.float64) - base_score
    norm = np.abs(diff).sum()
    if norm < 1e-12:
        return np.full(len(diff), total / len(diff))
    return total * diff / norm


class EvoMergingSpace(LayerwiseSpace):
    """LayerwiseSpace fixed to method `evo_merging`, with signed scale genes in [-c_max, c_max]."""

    def __init__(
        self,
        base: str | PurePath,
        sources: Sequence[str | PurePath] | Mapping[str, str | PurePath],
        num_layers: int,
        layer_groups: int = 1,
        c_max: float = 1.5,
        asymmetric: bool = False,
        init_density: float = 0.5,
        init_scores: Mapping[str, float] | None = None,
        init_total: float = 1.0,
    ) -> None:
        if not c_max > 0:
            raise ConfigError(f"evo_merging space: c_max must be > 0 (got {c_max})")
        if not 0 < init_density <= 1:
            raise ConfigError(f"evo_merging space: init_density must be in (0, 1] (got {init_density})")
        params = ("weight", "density", "density_neg") if asymmetric else ("weight", "density")
        super().__init__("evo_merging", base, sources, num_layers, layer_groups=layer_groups, params=params)
        self.c_max, self.asymmetric, self.init_density = float(c_max), asymmetric, float(init_density)
        for i, gene in enumerate(self._genes):
            if gene.param == "weight":
                self.lower[i], self.upper[i] = -self.c_max, self.c_max
        self.init_scales = np.full(len(self.models), 1.0 / len(self.models))
        if init_scores is not None:
            missing = [k for k in ("base", *self.labels) if k not in init_scores]
            if missing:
                raise ConfigError(f"init_scores: needs 'base' and every source label; missing {', '.join(missing)}"
                                  f" (labels: {', '.join(self.labels)})")  # fmt: skip
            self.init_scales = initial_scales(
                [init_scores[k] for k in self.labels], init_scores["base"], init_total
            )

    def initial(self) -> np.ndarray:
        x = np.empty(self.dim)
        for i, gene in enumerate(self._genes):
            x[i] = self.init_scales[gene.model] if gene.param == "weight" else self.init_density
        return self.clip(x)
