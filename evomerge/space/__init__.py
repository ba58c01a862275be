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

__all__ = [
    "SPACES",
    "DataFlowSpace",
    "EvoMergingSpace",
    "LayerwiseSpace",
    "ModelSpace",
    "Space",
    "TaskVectorSpace",
]
