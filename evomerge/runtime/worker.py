"""Search workers: the only place that touches tensors.

A worker is built once from a picklable backend spec and then evaluates candidates one after another:
- `MergeBackendSpec`: loads the source pool onto its device once, holds one target model, and per candidate
  merges the recipe *in place* into it and runs the evaluator (lm-eval on the resident model).
- `FunctionBackendSpec`: calls `fn(recipe, **kwargs) -> {objective: score}` with no model at all: for
  synthetic objectives, tests and scheduler benchmarks.

`Worker` is a plain class; the pool wraps it with `ray.remote` (see scheduler.py).
"""

from __future__ import annotations

import importlib
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evomerge.evaluate.base import Evaluation, EvaluationError
from evomerge.merge.recipe import Recipe


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class MergeBackendSpec:
    """Sources resident on the worker's device; `target` gives the architecture and tokenizer (the base)."""

    base: str
    sources: tuple[str, ...]
    evaluator: Any  # an evaluator spec with build()
    device: str = "auto"

    def build(self) -> MergeBackend:
        return MergeBackend(self)


class MergeBackend:
    def __init__(self, spec: MergeBackendSpec) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from evomerge.merge.engine import ResidentPool

        self.device = resolve_device(spec.device)
        refs = list(dict.fromkeys([*spec.sources, spec.base]))  # the order `models:` recipes give (base last)
        self.pool = ResidentPool.from_refs(refs, base=spec.base, device=self.device)
        self.model = (
            AutoModelForCausalLM.from_pretrained(spec.base, dtype=torch.float32).to(self.device).eval()
        )
        self.tokenizer = AutoTokenizer.from_pretrained(spec.base)
        self.evaluator = spec.evaluator.build()

    def evaluate(self, recipe: Recipe) -> Evaluation:
        from evomerge.merge.engine import apply_in_place

        apply_in_place(recipe, self.pool, self.model)
        return self.evaluator.evaluate(self.model, self.tokenizer)


def import_callable(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise EvaluationError(f"cannot import {ref!r} ({e})") from None
    return obj


@dataclass(frozen=True)
class FunctionBackendSpec:
    function: str  # "module:function", called as function(recipe, **kwargs) -> {name: score}
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> FunctionBackend:
        return FunctionBackend(import_callable(self.function), self.kwargs)


class FunctionBackend:
    def __init__(self, fn: Any, kwargs: dict[str, Any]) -> None:
        self.fn, self.kwargs = fn, kwargs

    def evaluate(self, recipe: Recipe) -> Evaluation:
        start = time.perf_counter()
        out = self.fn(recipe, **self.kwargs)
        if not isinstance(out, dict):
            raise EvaluationError(
                f"objective function returned {type(out).__name__}, expected a dict of scores"
            )
        return Evaluation(
            {k: float(v) for k, v in out.items()}, forward_passes=1, seconds=time.perf_counter() - start
        )


class Worker:
    """One search worker (a Ray actor): builds its backend once, then evaluates candidates."""

    def __init__(self, backend: Any, torch_threads: int = 1) -> None:
        import torch

        torch.set_num_threads(torch_threads)
        self.backend = backend.build()

    def evaluate(self, candidate_id: str, recipe: dict[str, Any]) -> dict[str, Any]:
        start = time.perf_counter()
        ev = self.backend.evaluate(Recipe.model_validate(recipe))
        return {
            "id": candidate_id,
            "scores": ev.scores,
            "samples": {k: np.asarray(v, dtype=np.float64).tolist() for k, v in ev.samples.items()},
            "forward_passes": ev.forward_passes,
            "seconds": time.perf_counter() - start,
            "device": ev.device,
            "pid": os.getpid(),
        }

    def pid(self) -> int:
        return os.getpid()
