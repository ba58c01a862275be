"""The evaluator contract: built once inside a worker from a picklable spec, then called per candidate.

    spec = LMEvalSpec(tasks=["zoo_search"])          # plain data: travels to Ray workers
    evaluator = spec.build()                         # once per worker: loads tasks, builds requests
    result = evaluator.evaluate(model, tokenizer)    # per candidate, on the resident model

`evaluate` must read the model as it is *now* (a worker overwrites its weights in place between
candidates), cache nothing that depends on the weights, and be deterministic for a given model.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from evomerge.errors import EvomergeError


class EvaluationError(EvomergeError):
    """A task or evaluator cannot be built or run (unknown task, missing data, unusable tokenizer)."""


@dataclass
class Evaluation:
    """Scores of one candidate. `scores` are per-task aggregates (higher is better); `samples` holds, per
    task, one score per evaluated example in a fixed order (the same order for every candidate), so the
    rows of many evaluations form the score matrix niche-preserving strategies (M2N2) need."""

    scores: dict[str, float]
    samples: dict[str, np.ndarray] = field(default_factory=dict)
    forward_passes: int = 0
    seconds: float = 0.0
    device: str = "cpu"
    candidate_id: str = ""
    status: Literal["ok", "failed"] = "ok"
    error: str | None = None

    def sample_matrix_row(self, tasks: list[str] | None = None) -> np.ndarray:
        """All per-sample scores concatenated in task order (the candidate's row of the score matrix)."""
        names = tasks if tasks is not None else list(self.samples)
        return np.concatenate([np.asarray(self.samples[t], dtype=np.float64) for t in names])


def pack_samples(values: np.ndarray | list[float]) -> list[float] | dict[str, object]:
    """JSON form of one task's per-sample scores: 0/1 scores as a base64 bit field (1,437 digits scores
    take 240 characters instead of ~6,000), anything else as a list of floats."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size and np.all((arr == 0.0) | (arr == 1.0)):
        return {
            "bits": base64.b64encode(np.packbits(arr.astype(np.uint8)).tobytes()).decode(),
            "n": int(arr.size),
        }
    return arr.tolist()


def unpack_samples(packed: list[float] | dict[str, object]) -> np.ndarray:
    """Inverse of `pack_samples` (also reads plain lists)."""
    if isinstance(packed, dict):
        bits = np.frombuffer(base64.b64decode(str(packed["bits"])), dtype=np.uint8)
        return np.unpackbits(bits, count=int(packed["n"])).astype(np.float64)
    return np.asarray(packed, dtype=np.float64)


class Evaluator(Protocol):
    def evaluate(self, model: Any, tokenizer: Any = None) -> Evaluation: ...


class EvaluatorSpec(Protocol):
    """Picklable description of an evaluator; `build()` runs inside the worker."""

    def build(self) -> Evaluator: ...
