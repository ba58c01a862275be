"""Search spaces: genome vector <-> Recipe, with bounds and a readable name per gene (contract in `base.py`).

`SPACES` names the spaces a run config can choose:

- `layerwise`: the mergekit-evolve / Sakana PS genome, per layer group x model x filter x the method's
  searched parameters (`Param.search` in `evomerge.merge.methods`), plus per-group global parameters;
- `task_vector`: MAP's one coefficient per task vector (task_arithmetic);
- `evo_merging`: per source (and layer group) a density and a signed scale, Evo-Merging [ours];
- `dataflow`: Sakana's data-flow space, a path through the layers of all sources (layer stacking);
- `model`: no genome; members are recipes over the pool (M2N2), see `model.py`.

Importing this package does not import torch; building a LayerwiseSpace reads `METHODS`, which does.
"""

from __future__ import annotations

import inspect

from evomerge.config import RunConfig
from evomerge.errors import ConfigError
from evomerge.registry import Registry
from evomerge.space.base import Space
from evomerge.space.dataflow import DataFlowSpace
from evomerge.space.evo_merging import EvoMergingSpace
from evomerge.space.layerwise import LayerwiseSpace
from evomerge.space.model import ModelSpace
from evomerge.space.task_vector import TaskVectorSpace

SPACES: Registry[type[Space]] = Registry("search space")
SPACES.add("layerwise", LayerwiseSpace)
SPACES.add("task_vector", TaskVectorSpace)
SPACES.add("model", ModelSpace)
SPACES.add("evo_merging", EvoMergingSpace)
SPACES.add("dataflow", DataFlowSpace)


def build_space(config: RunConfig, base: str, sources: list[str]) -> Space:
    """The run config's space over these (resolved) models; `num_layers` read from the base when the space
    takes it and the config does not say."""
    options = {k: v for k, v in (config.space.model_extra or {}).items()}
    cls = SPACES.get(config.space.type)
    params = inspect.signature(cls).parameters
    if "num_layers" in params and "num_layers" not in options:
        from evomerge.checkpoints import Checkpoint

        options["num_layers"] = Checkpoint(base).num_layers
    try:
        return cls(base=base, sources=sources, **options)
    except TypeError as e:
        raise ConfigError(f"space: {e}") from None


__all__ = [
    "SPACES",
    "DataFlowSpace",
    "EvoMergingSpace",
    "LayerwiseSpace",
    "ModelSpace",
    "Space",
    "TaskVectorSpace",
    "build_space",
]
