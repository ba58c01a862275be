"""An evaluator that calls a user function: the escape hatch for fitness that is neither lm-eval
nor digits.

    def my_fitness(model, tokenizer, *, n=100):      # in an importable module, e.g. mypkg.fitness
        return {"math": 0.41, "code": 0.37}          # aggregates only, or:
        return {"scores": {"math": 0.41}, "samples": {"math": per_example_array}}

    spec = CallableSpec("mypkg.fitness:my_fitness", {"n": 100})   # picklable: imported in the worker
    result = spec.build().evaluate(model, tokenizer)

`fn` may also be the function object itself; it must then be picklable (a module-level function,
not a lambda or closure) for the spec to travel to Ray workers. The function must follow the
evaluator contract (base.py): read the model as it is now, cache nothing weight-dependent.

The result is checked: every score a finite real number (int, float, numpy or 0-d tensor scalar),
every sample array 1-D and finite and belonging to a scored task. One call counts as one forward
pass unless the structured form says otherwise (`"forward_passes": int`).
"""

from __future__ import annotations

import importlib
import math
import numbers
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evomerge.evaluate.base import Evaluation, EvaluationError

_STRUCTURED_KEYS = {"scores", "samples", "forward_passes"}


def _split_ref(ref: str) -> tuple[str, str]:
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise EvaluationError(f"callable evaluator {ref!r}: expected 'module:function'")
    return module_name, attr


def resolve_callable(ref: str) -> Callable[..., Any]:
    """Import `"package.module:function"` (the attribute may be dotted: `"mod:Class.method"`)."""
    module_name, attr = _split_ref(ref)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise EvaluationError(
            f"callable evaluator {ref!r}: cannot import module {module_name!r} ({e})"
        ) from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise EvaluationError(
                f"callable evaluator {ref!r}: module {module_name!r} has no attribute {attr!r}"
            ) from None
    if not callable(obj):
        raise EvaluationError(f"callable evaluator {ref!r}: {type(obj).__name__} is not callable")
    return obj


def _name(fn: str | Callable[..., Any]) -> str:
    if isinstance(fn, str):
        return fn
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


@dataclass(frozen=True)
class CallableSpec:
    """Picklable description of a callable evaluator: `fn(model, tokenizer, **kwargs)`."""

    fn: str | Callable[..., Any]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.fn, str):
            _split_ref(self.fn)
        elif not callable(self.fn):
            raise EvaluationError(
                f"callable evaluator: fn must be 'module:function' or a callable, got {type(self.fn).__name__}"
            )
        if not isinstance(self.kwargs, Mapping):
            raise EvaluationError(
                f"callable evaluator {_name(self.fn)}: kwargs must be a dict, got {type(self.kwargs).__name__}"
            )

    def build(self) -> CallableEvaluator:
        fn = resolve_callable(self.fn) if isinstance(self.fn, str) else self.fn
        return CallableEvaluator(fn, dict(self.kwargs), name=_name(self.fn))


class CallableEvaluator:
    def __init__(self, fn: Callable[..., Any], kwargs: dict[str, Any], name: str) -> None:
        self.fn = fn
        self.kwargs = kwargs
        self.name = name

    def evaluate(self, model: Any, tokenizer: Any = None) -> Evaluation:
        start = time.perf_counter()
        result = self.fn(model, tokenizer, **self.kwargs)
        seconds = time.perf_counter() - start
        scores, samples, forward_passes = _parse_result(result, self.name)
        return Evaluation(
            scores=scores,
            samples=samples,
            forward_passes=forward_passes,
            seconds=seconds,
            device=_device_of(model),
        )


def _device_of(model: Any) -> str:
    parameters = getattr(model, "parameters", None)
    if callable(parameters):
        try:
            first = next(iter(parameters()), None)
        except Exception:  # not a torch module after all
            first = None
        if first is not None and hasattr(first, "device"):
            return str(first.device)
    return "cpu"


def _parse_result(result: Any, name: str) -> tuple[dict[str, float], dict[str, np.ndarray], int]:
    expected = "expected a dict {task: float} or {'scores': {...}, 'samples': {...}}"
    if not isinstance(result, Mapping):
        raise EvaluationError(f"callable evaluator {name} returned {type(result).__name__}; {expected}")
    if isinstance(result.get("scores"), Mapping):
        unknown = sorted(str(k) for k in set(result) - _STRUCTURED_KEYS)
        if unknown:
            raise EvaluationError(
                f"callable evaluator {name} returned unknown keys {unknown}; allowed: {sorted(_STRUCTURED_KEYS)}"
            )
        raw_scores, raw_samples = result["scores"], result.get("samples") or {}
        forward_passes = result.get("forward_passes", 1)
    else:
        raw_scores, raw_samples, forward_passes = result, {}, 1
    if not raw_scores:
        raise EvaluationError(f"callable evaluator {name} returned no scores; {expected}")
    if not isinstance(raw_samples, Mapping):
        raise EvaluationError(
            f"callable evaluator {name}: 'samples' must be a dict {{task: array}}, got {type(raw_samples).__name__}"
        )
    if (
        isinstance(forward_passes, bool)
        or not isinstance(forward_passes, numbers.Integral)
        or forward_passes < 0
    ):
        raise EvaluationError(
            f"callable evaluator {name}: forward_passes must be a non-negative int, got {forward_passes!r}"
        )

    scores = {_task(k, name): _score(k, v, name) for k, v in raw_scores.items()}
    samples = {}
    for task, values in raw_samples.items():
        if task not in scores:
            raise EvaluationError(
                f"callable evaluator {name}: samples for task {task!r} which has no score (scored: {sorted(scores)})"
            )
        samples[task] = _sample_array(task, values, name)
    return scores, samples, int(forward_passes)


def _task(key: Any, name: str) -> str:
    if not isinstance(key, str) or not key:
        raise EvaluationError(f"callable evaluator {name}: task names must be non-empty strings, got {key!r}")
    return key


def _score(task: str, value: Any, name: str) -> float:
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # numpy 0-d array, torch scalar
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise EvaluationError(
            f"callable evaluator {name}: score of task {task!r} must be a real number, "
            f"got {type(value).__name__} {value!r}"
        )
    out = float(value)
    if not math.isfinite(out):
        raise EvaluationError(f"callable evaluator {name}: score of task {task!r} is not finite ({out})")
    return out


def _sample_array(task: str, values: Any, name: str) -> np.ndarray:
    if hasattr(values, "detach"):  # torch tensor, possibly on an accelerator
        values = values.detach().cpu().numpy()
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise EvaluationError(
            f"callable evaluator {name}: samples of task {task!r} are not numeric ({e})"
        ) from e
    if arr.ndim != 1:
        raise EvaluationError(
            f"callable evaluator {name}: samples of task {task!r} must be 1-D, got shape {arr.shape}"
        )
    if not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise EvaluationError(
            f"callable evaluator {name}: samples of task {task!r} hold a non-finite value at index {bad} ({arr[bad]})"
        )
    return arr
