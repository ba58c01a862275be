"""ModelSpace: the space of model-space strategies (M2N2, GENOME), whose members are recipes over the pool
rather than genome vectors (see `evomerge.merge.mixture`).

It owns what every such strategy needs from the pool, computed once on the driver without holding a model:
the flat parameter order (`layout`, from the target's module on the meta device and the sources' headers),
the allowed split points (`boundaries`, from `chunk`) and the cumulative pool Gram matrices (`gram`, read
one tensor at a time) that make mixture angles exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import PurePath

import numpy as np

from evomerge.errors import ConfigError
from evomerge.merge.mixture import FlatLayout, chunk_boundaries
from evomerge.merge.recipe import Recipe
from evomerge.space.base import Space


class ModelSpace(Space):
    """No genes: `models` (the pool, in coefficient order), `layout`, `size`, `boundaries`, `gram`. With `delta`,
    members live in task-vector space (ALGORITHMS.md 4.3 offers both; full weights is the reference's)."""

    names: tuple[str, ...] = ()
    lower = upper = np.zeros(0)

    def __init__(self, base: str | PurePath, sources: Sequence[str | PurePath], chunk: str | int = "tensor",
                 delta: bool = False) -> None:  # fmt: skip
        if not sources:
            raise ConfigError("a model space needs at least one source model")
        self.base = str(base)
        self.models = tuple(str(s) for s in sources)
        if delta and self.base in self.models:
            raise ConfigError(
                "delta: true merges task vectors against the base; do not list the base among sources"
            )
        self.chunk = chunk
        self.delta = delta  # members are task vectors tau = theta - theta_base; the model is base + member
        chunk_boundaries(FlatLayout(("x",), ((1,),), (0,), 1), chunk)  # validate early, before any reading

    @cached_property
    def _sources(self) -> dict[str, object]:
        from evomerge.checkpoints import open_source

        return {ref: open_source(ref) for ref in self.models}

    @cached_property
    def layout(self) -> FlatLayout:
        from evomerge.merge.target import meta_target

        model = meta_target(self.base)
        shapes = [{n: info.shape for n, info in src.tensors.items()} for src in self._sources.values()]
        return FlatLayout.build(((n, p.shape) for n, p in model.named_parameters()), shapes)

    @property
    def size(self) -> int:
        return self.layout.size

    @cached_property
    def boundaries(self) -> np.ndarray:
        return chunk_boundaries(self.layout, self.chunk)

    @cached_property
    def gram(self) -> np.ndarray:
        """Of the sources, or of their task vectors (`delta`): the vectors members combine."""
        from evomerge.checkpoints import open_source
        from evomerge.merge.members import pool_gram

        base = open_source(self.base) if self.delta else None

        def read(ref: str, name: str):  # noqa: ANN202
            x = self._sources[ref].read(name)
            return x - base.read(name) if base is not None else x

        return pool_gram(read, self.models, self.layout, self.boundaries)

    def decode(self, x: np.ndarray) -> Recipe:
        raise ConfigError("a model space has no genome: use a model-space strategy (m2n2)")
