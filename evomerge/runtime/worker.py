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
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from evomerge.evaluate.base import Evaluation, EvaluationError, pack_samples
from evomerge.merge.mixture import AnyRecipe, Mixture, Offspring, candidate_recipe


def resolve_device(device: str) -> str:
    """`auto`: CUDA when this process may use a GPU, else CPU. Inside a Ray worker that means the actor
    reserved GPUs (`workers.num_gpus` > 0; Ray then limits CUDA_VISIBLE_DEVICES to its GPU, shared when
    fractional): a worker without a reservation stays on the CPU even on a GPU node."""
    if device != "auto":
        return device
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    gpus = _ray_gpu_ids()
    return "cuda" if gpus is None or gpus else "cpu"


def _ray_gpu_ids() -> list[Any] | None:
    """The GPUs Ray assigned to this worker process, or None outside a Ray worker."""
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return None
    return list(ray.get_gpu_ids())


def node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray): results say where they were computed."""
    try:
        import ray
    except ImportError:
        return None
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


# "1" (`evomerge -v`): every library's output; workers inherit it (a cluster's get it in their runtime env)
VERBOSE_ENV = "EVOMERGE_VERBOSE"
QUIET_LOGGERS = ("lm_eval", "lm-eval", "transformers")  # lm-eval's per-task and per-model notices; HF's
QUIET_ENV = {"TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}


def verbose() -> bool:
    """Whether the user asked for every library's output (`evomerge -v`), here or on the driver."""
    return os.environ.get(VERBOSE_ENV) == "1"


def quiet_libraries() -> None:
    """Library chatter off in this process, errors kept: every worker would repeat lm-eval's notices (custom
    kwargs, an already-initialized model) and progress bars for every task. Env settings reach libraries not
    imported yet; the others are told directly."""
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    _tqdm_off()
    datasets = sys.modules.get("datasets")
    if datasets is not None:
        datasets.disable_progress_bars()


def _tqdm_off() -> None:
    """Bars off by default (an explicit `disable=False` still shows one): tqdm reads TQDM_DISABLE once, at
    import, and Ray imports it before an actor exists; lm-eval builds every task's requests under a bar."""
    from functools import partialmethod

    import tqdm.std

    if not getattr(tqdm.std.tqdm, "_evomerge_quiet", False):
        tqdm.std.tqdm.__init__ = partialmethod(tqdm.std.tqdm.__init__, disable=True)  # type: ignore[method-assign]
        tqdm.std.tqdm._evomerge_quiet = True  # type: ignore[attr-defined]


MEMBER_CACHE = 4  # stored members kept loaded per worker (their files never change once written)
STACKED_CACHE = 4  # targets of other depths kept per worker (layer-stacking recipes)


@dataclass(frozen=True)
class MergeBackendSpec:
    """Sources resident on the worker's device; `target` gives the architecture and tokenizer (the base)."""

    base: str
    sources: tuple[str, ...]
    evaluator: Any  # an evaluator spec with build()
    device: str = "auto"
    pool_dtype: str = "float32"  # resident sources; merges accumulate in fp32 whatever this is
    model_dtype: str = "float32"  # the target model (what the evaluator runs)
    pool_device: str = "auto"  # auto: the worker's device; cpu: (pinned) host memory, streamed per candidate

    def build(self) -> MergeBackend:
        return MergeBackend(self)


class MergeBackend:
    def __init__(self, spec: MergeBackendSpec) -> None:
        from evomerge.merge.engine import ResidentPool, parse_dtype
        from evomerge.merge.members import model_layout
        from evomerge.merge.target import load_target
        from evomerge.references import locate

        self.device = resolve_device(spec.device)
        refs = list(dict.fromkeys([*spec.sources, spec.base]))  # the order `models:` recipes give (base last)
        pool_dtype = parse_dtype(spec.pool_dtype, "workers.pool_dtype")
        pool_device = self.device if spec.pool_device == "auto" else spec.pool_device
        self.pool = ResidentPool.from_refs(refs, base=spec.base, device=pool_device, dtype=pool_dtype,
                                           pin=pool_device == "cpu" and self.device != "cpu")  # fmt: skip
        self.model, self.tokenizer = load_target(spec.base, "cpu")  # cast before the move: no fp32 copy there
        self.model.to(parse_dtype(spec.model_dtype, "workers.model_dtype")).to(self.device)
        self.base_config = json.loads((locate(spec.base) / "config.json").read_text())
        shapes = [{n: i.shape for n, i in self.pool.sources[r].tensors.items()} for r in spec.sources]
        self.layout = model_layout(self.model, shapes)  # flat order of model-space recipes
        self.evaluator = spec.evaluator.build()
        self._members: dict[str, dict[str, Any]] = {}
        self._stacked: dict[int, Any] = {}  # decoder depth -> target model, for layer-stacking recipes
        self._resident: tuple[str, Any] | None = None  # (candidate id, model) merged last, for promotions

    @property
    def task_sizes(self) -> dict[str, int]:
        return self.evaluator.task_sizes

    def read(self, ref: str, name: str) -> Any:
        """A tensor of a pool model, or of a stored member (model-space offspring) read from disk; the last
        few stored members stay loaded (a parent is usually used by several children in a row)."""
        if ref in self.pool.index:
            return self.pool.fetch(ref, name, self.device)
        if ref not in self._members:
            from evomerge.checkpoints import Checkpoint

            ckpt = Checkpoint(ref)
            self._members[ref] = {n: ckpt.read(n, self.device) for n in self.layout.names}
            while len(self._members) > MEMBER_CACHE:
                self._members.pop(next(iter(self._members)))
        return self._members[ref][name]

    def evaluate(self, recipe: AnyRecipe, items: Any = None, key: str | None = None) -> Evaluation:
        """Merge `recipe` (unless candidate `key` is still the resident model: a racing promotion scores the next
        slice of items without merging again) and evaluate `items` (None: all)."""
        if key is not None and self._resident is not None and self._resident[0] == key:
            return self._run(self._resident[1], items)
        self._resident = None
        model = self.merge(recipe)
        self._resident = (key, model) if key is not None else None
        return self._run(model, items)

    def _run(self, model: Any, items: Any) -> Evaluation:
        if items is None:  # every evaluator; only item-aware ones (lm-eval) take a selection
            return self.evaluator.evaluate(model, self.tokenizer)
        return self.evaluator.evaluate(model, self.tokenizer, items=items)

    def evaluate_model(self, ref: str) -> Evaluation:
        """One pool model as it is (the base or a source) on every item: the reference rows estimators use."""
        from evomerge.merge.mergekit_io import recipe_from_dict

        return self.evaluate(
            recipe_from_dict(
                {"merge_method": "linear", "models": [{"model": ref, "parameters": {"weight": 1.0}}]}
            )
        )

    def merge(self, recipe: AnyRecipe) -> Any:
        """Write the candidate into its target model (in place) and return that model."""
        import torch

        from evomerge.merge import members
        from evomerge.merge.engine import apply_in_place

        if isinstance(recipe, Mixture):
            stacked = self.pool.dtype == torch.float32 and all(
                n in self.pool.stacked for n in self.layout.names
            )
            if stacked:
                members.apply_mixture_stacked(
                    recipe, self.pool.stacks_on(self.device), self.pool.refs, self.model, self.layout
                )
            else:
                members.apply_mixture(recipe, self.read, self.model, self.layout)
        elif isinstance(recipe, Offspring):
            members.build_offspring(recipe, self.read, self.model, self.layout)
            members.save_member(self.model, self.layout, recipe.save, self.base_config)
        else:
            model = self.stacked_target(recipe)
            apply_in_place(recipe, self.pool, model)
            return model
        return self.model

    def stacked_target(self, recipe: AnyRecipe) -> Any:
        """The model a mergekit recipe merges into: the resident target, or, for a layer-stacking recipe
        (data-flow space, passthrough frankenmerges) with another decoder depth, a target of that depth built
        from the base's config (kept for the next few recipes of the same depth; the merge then overwrites
        every tensor). A fresh build of the zoo model costs ~25 ms, small next to an evaluation."""
        slices = getattr(recipe, "slices", None)
        depth = sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0] for s in slices or [])
        if not slices or depth == getattr(getattr(self.model, "config", None), "num_hidden_layers", depth):
            return self.model
        if depth not in self._stacked:
            import copy

            import torch
            from transformers import AutoModelForCausalLM

            config = copy.deepcopy(self.model.config)
            config.num_hidden_layers = depth
            if getattr(config, "layer_types", None):
                config.layer_types = [config.layer_types[0]] * depth
            dtype = next(self.model.parameters()).dtype
            with torch.device(self.device):
                self._stacked[depth] = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
            while len(self._stacked) > STACKED_CACHE:
                self._stacked.pop(next(iter(self._stacked)))
        return self._stacked[depth]


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

    def evaluate(self, recipe: AnyRecipe, items: Any = None, key: str | None = None) -> Evaluation:
        if items is not None:
            raise EvaluationError("a function objective has no items to select (fidelity needs lm-eval)")
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

        if not verbose():
            quiet_libraries()
        torch.set_num_threads(torch_threads)
        self.backend = backend.build()

    def evaluate(self, candidate_id: str, recipe: dict[str, Any], items: Any = None) -> dict[str, Any]:
        start = time.perf_counter()
        if items is None:
            ev = self.backend.evaluate(candidate_recipe(recipe))
        else:
            ev = self.backend.evaluate(candidate_recipe(recipe), items=items, key=candidate_id)
        return self._payload(candidate_id, ev, start)

    def evaluate_batch(self, batch: list[tuple[str, dict[str, Any], Any]]) -> list[dict[str, Any]]:
        """Several candidates in one call (cheap evaluators: one Ray round trip for all of them), each with its
        own outcome: `{"payload": ...}` or `{"error": "Type: message"}`, so one failure fails one candidate."""
        out: list[dict[str, Any]] = []
        for candidate_id, recipe, items in batch:
            try:
                out.append({"payload": self.evaluate(candidate_id, recipe, items)})
            except Exception as e:  # noqa: BLE001 - reported per candidate; the driver retries or records it
                out.append({"error": f"{type(e).__name__}: {e}"})
        return out

    def evaluate_model(self, ref: str) -> dict[str, Any]:
        start = time.perf_counter()
        return self._payload(ref, self.backend.evaluate_model(ref), start)

    def task_sizes(self) -> dict[str, int]:
        return self.backend.task_sizes

    def _payload(self, candidate_id: str, ev: Evaluation, start: float) -> dict[str, Any]:
        return {
            "id": candidate_id,
            "scores": ev.scores,
            "samples": {k: pack_samples(v) for k, v in ev.samples.items()},
            "forward_passes": ev.forward_passes,
            "seconds": time.perf_counter() - start,
            "device": ev.device,
            "pid": os.getpid(),
            "node": node_id(),
        }

    def pid(self) -> int:
        return os.getpid()
