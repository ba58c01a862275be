"""lm-eval as the fitness source: lm-eval's own tasks and metrics, run in process on a resident model.

`LMEvalSpec(...).build()` runs once per worker: it indexes the task YAMLs, loads the data and builds every
request (prompts, few-shot context, generation settings) once. Per candidate, `evaluate(model, tokenizer)`
only runs the model on those prebuilt requests, applies the tasks' filters and scores each document with
the task's own `process_results`, then aggregates with the task's own aggregation. Nothing derived from
the weights is cached, so a worker can overwrite the model in place between candidates.

Per-sample scores are the primary metric (the task's first metric) of every document, in the task's
document order, restricted to the fixed subsample when one is given: the same order for every candidate.
`forward_passes` counts model requests (one generation or one log-likelihood each).

Cheap fitness on item subsets: `evaluate(model, tokenizer, items={task: positions})` runs only the requests
of the chosen documents (positions into that task's document order above, `0 <= p < task_sizes[task]`,
distinct, at least one) and of the named tasks only. `samples[task]` then holds one score per position in
the given order, `scores[task]` is the task's own aggregation over those documents, and `forward_passes`
counts only what ran. Only the chosen requests are reset, filtered and scored, so consecutive calls with
different selections never see each other's responses. `items=None` evaluates everything.

Instruct models: `apply_chat_template` (true: the tokenizer's template; a name: one of its named templates),
`fewshot_as_multiturn`, `system_instruction` and `gen_kwargs` mean what they mean in lm-eval's
`simple_evaluate`, and the requests are the ones it builds. A chat template needs the tokenizer, which a
spec built on the driver does not have, so with a template the requests are built on the first `evaluate`
(still once per worker: the tokenizer, unlike the weights, never changes) and the documents at `build()`.
One deliberate difference: lm-eval 0.4.13 validates a template name but renders with the tokenizer's default
template; here the named template is the one rendered (with `true`, or a tokenizer with one template, the
two agree).
"""

from __future__ import annotations

import logging
import operator
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.evaluate.base import Evaluation, EvaluationError

BUNDLED_TASKS = Path(__file__).parent / "tasks"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LMEvalSpec:
    """What to evaluate. Picklable; `build()` runs in the worker.

    tasks: task, group or tag names (bundled zoo tasks, anything under `include_path`, or lm-eval's own
      tasks when their data is available locally).
    limit: first N documents per task (int) or a fraction (float), lm-eval's semantics.
    subsample: N documents per task drawn once with `seed` (fixed for the whole search); exclusive with limit.
    """

    tasks: tuple[str, ...]
    include_path: str | None = None
    limit: int | float | None = None
    subsample: int | None = None
    seed: int = 0
    batch_size: int = 64
    max_length: int | None = None  # HFLM's: longer requests are left-truncated (None: the model's context)
    device: str = "cpu"
    num_fewshot: int | None = None
    apply_chat_template: bool | str = False
    fewshot_as_multiturn: bool = False
    system_instruction: str | None = None
    gen_kwargs: dict[str, Any] | None = field(default=None, hash=False)  # updates generate_until tasks' own

    def build(self) -> LMEvalEvaluator:
        return LMEvalEvaluator(self)


@dataclass
class _TaskRun:
    """One leaf task with its prebuilt requests; `groups[i]` holds the requests of `docs[i]` (built once, so a
    selection of documents finds its requests without scanning the task)."""

    name: str
    task: Any
    docs: list[tuple[int, Any]]
    groups: list[list[Any]]
    metric: str
    higher_is_better: bool
    limit: int | None = None
    samples: list[int] | None = None


def _task_manager(include: list[str], names: tuple[str, ...]) -> Any:
    """Index only our paths when they hold every name (fast); else add lm-eval's own task tree."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include, include_defaults=False)
    if all(n in manager.all_tasks for n in names):
        return manager
    manager = TaskManager(include_path=include, include_defaults=True)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise EvaluationError(f"unknown lm-eval task {unknown[0]!r}.{hint}")
    return manager


def _load_tasks(spec: LMEvalSpec) -> dict[str, Any]:
    include = [str(BUNDLED_TASKS)] + ([spec.include_path] if spec.include_path else [])
    manager = _task_manager(include, spec.tasks)
    try:
        loaded = manager.load(list(spec.tasks))
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as e:
        raise EvaluationError(
            f"tasks {', '.join(spec.tasks)}: data could not be loaded ({type(e).__name__}: {e}). Standard lm-eval "
            "tasks need their datasets in the local Hugging Face cache (no downloads happen here)"
        ) from None
    except Exception as e:  # datasets raises its own hierarchy for unreachable hubs
        if "offline" in str(e).lower() or "connect" in str(e).lower() or "not found" in str(e).lower():
            raise EvaluationError(
                f"tasks {', '.join(spec.tasks)}: data is not available locally ({type(e).__name__}: {e})"
            ) from None
        raise
    return loaded["tasks"]


def _primary_metric(task: Any) -> tuple[str, bool]:
    config_metrics = getattr(task.config, "metric_list", None) or []
    names = [m["metric"] for m in config_metrics if isinstance(m.get("metric"), str)]
    name = names[0] if names else next(iter(task.aggregation()))
    return name, bool(task.higher_is_better().get(name, True))


def _memoize_targets(task: Any, docs: list[Any]) -> None:
    """Render each document's target once: lm-eval re-compiles the Jinja template on every call (~0.6 ms a
    document), which would dominate per-candidate scoring. Targets depend on the data only, never on weights."""
    targets = {id(doc): task.doc_to_target(doc) for doc in docs}
    render = task.doc_to_target

    def doc_to_target(doc: Any, *args: Any, **kwargs: Any) -> Any:
        hit = targets.get(id(doc)) if not args and not kwargs else None  # few-shot calls pass their own field
        return hit if hit is not None else render(doc, *args, **kwargs)

    task.doc_to_target = doc_to_target


def _subsample(n_docs: int, k: int, seed: int, name: str) -> list[int]:
    import hashlib

    mix = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
    rng = np.random.default_rng(mix)
    return sorted(rng.choice(n_docs, size=min(k, n_docs), replace=False).tolist())


class LMEvalEvaluator:
    """Runs prebuilt lm-eval requests on whatever weights the model holds now."""

    def __init__(self, spec: LMEvalSpec) -> None:
        if spec.limit is not None and spec.subsample is not None:
            raise EvaluationError("give either limit or subsample, not both")
        if spec.fewshot_as_multiturn and not spec.apply_chat_template:
            raise EvaluationError("fewshot_as_multiturn needs apply_chat_template (as in lm-eval)")
        self.spec = spec
        self._lm: Any = None
        self._lm_key: tuple[int, int] | None = None
        self._template: str | None = None  # the chat template the current requests were built with
        self._templated_lm: Any = None  # the HFLM that renders with it
        self.runs = [self._prepare(name, task) for name, task in _load_tasks(spec).items()]
        if not self.runs:
            raise EvaluationError(f"tasks {', '.join(spec.tasks)} contain no evaluable task")

    @property
    def task_names(self) -> list[str]:
        return [r.name for r in self.runs]

    @property
    def task_sizes(self) -> dict[str, int]:
        """Documents per task in task order (after limit/subsample): the range of `evaluate`'s positions."""
        return {r.name: len(r.docs) for r in self.runs}

    def _prepare(self, name: str, task: Any) -> _TaskRun:
        _configure(task, self.spec)
        samples = None
        if self.spec.subsample is not None:
            docs = task.eval_docs
            samples = _subsample(len(docs), self.spec.subsample, self.spec.seed, name)
        from lm_eval.evaluator_utils import get_sample_size

        limit = get_sample_size(task, self.spec.limit) if samples is None else None
        docs = list(task.doc_iterator(rank=0, limit=limit, world_size=1, samples=samples))
        metric, hib = _primary_metric(task)
        run = _TaskRun(name, task, docs, [[] for _ in docs], metric, hib, limit, samples)
        if not self.spec.apply_chat_template:  # plain prompts need no tokenizer: build them now
            _build_requests(run, self.spec, None)
        _memoize_targets(task, [doc for _, doc in docs])
        return run

    def _ensure_requests(self, lm: Any) -> None:
        """With a chat template: build every task's requests with the template of `lm`'s tokenizer, once
        (again only if a later tokenizer renders with another template)."""
        if not self.spec.apply_chat_template or lm is self._templated_lm:
            return
        template = _resolve_template(lm, self.spec.apply_chat_template)
        lm.chat_template_args = {**lm.chat_template_args, "chat_template": template}
        if template != self._template:
            for run in self.runs:
                _build_requests(run, self.spec, lm.apply_chat_template)
            self._template = template
        self._templated_lm = lm

    def _wrap(self, model: Any, tokenizer: Any) -> Any:
        """lm-eval's HFLM around the resident model, made once per (model, tokenizer) object pair."""
        key = (id(model), id(tokenizer))
        if self._lm is not None and self._lm_key == key:
            return self._lm
        if tokenizer is None:
            raise EvaluationError("LMEvalEvaluator needs the model's tokenizer")
        if tokenizer.pad_token is None:
            raise EvaluationError(
                "the tokenizer has no pad token: batched evaluation needs one "
                "(set tokenizer.pad_token, e.g. to the eos token, and save it with the model)"
            )
        from lm_eval.models.huggingface import HFLM

        self._lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.spec.batch_size,
                        max_length=self.spec.max_length, device=self.spec.device)  # fmt: skip
        self._lm_key = key
        return self._lm

    def evaluate(
        self, model: Any, tokenizer: Any = None, items: Mapping[str, Sequence[int]] | None = None
    ) -> Evaluation:
        """Score the model as it is now, on every document or only on `items` (see the module docstring)."""
        start = time.perf_counter()
        if items is not None:
            self._select(items)  # bad items fail before any work
        lm = self._wrap(model, tokenizer)
        self._ensure_requests(lm)
        selection = self._select(items)
        passes = _run_requests(lm, [instances for _, _, instances in selection])
        scores: dict[str, float] = {}
        samples: dict[str, np.ndarray] = {}
        for run, positions, instances in selection:
            samples[run.name], scores[run.name] = _score(run, positions, instances)
        device = str(getattr(model, "device", self.spec.device))
        return Evaluation(
            scores, samples, forward_passes=passes, seconds=time.perf_counter() - start, device=device
        )

    def _select(
        self, items: Mapping[str, Sequence[int]] | None
    ) -> list[tuple[_TaskRun, list[int], list[Any]]]:
        """(run, document positions, their requests) per task to evaluate, in task order."""
        if items is None:
            return [(run, list(range(len(run.docs))), run.task.instances) for run in self.runs]
        unknown = sorted(set(items) - set(self.task_names))
        if unknown:
            raise EvaluationError(f"items name unknown tasks {unknown}; tasks are {self.task_names}")
        chosen = []
        for run in self.runs:
            if run.name in items:
                positions = _positions(run.name, items[run.name], len(run.docs))
                chosen.append((run, positions, [inst for p in positions for inst in run.groups[p]]))
        return chosen


def _configure(task: Any, spec: LMEvalSpec) -> None:
    """The task settings `simple_evaluate` overrides: num_fewshot, and the generation kwargs (generate_until
    tasks only, updating the task's own as lm-eval's --gen_kwargs does)."""
    if spec.num_fewshot is not None:
        task.set_config(key="num_fewshot", value=spec.num_fewshot)
    if spec.gen_kwargs and task.get_config("output_type") == "generate_until":
        task.set_config(key="generation_kwargs", value=dict(spec.gen_kwargs), update=True)


def _build_requests(run: _TaskRun, spec: LMEvalSpec, chat_template: Any) -> None:
    """lm-eval's `build_all_requests` with the spec's prompt options; `run.groups[i]` = requests of document i.
    The few-shot sampler is seeded first with `simple_evaluate`'s default seed: unseeded, few-shot examples
    would differ between workers, and a rebuild draws the same examples."""
    from lm_eval.defaults import DEFAULT_OTHER_SEED

    run.task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
    try:
        run.task.build_all_requests(
            limit=run.limit, samples=run.samples, rank=0, world_size=1, cache_requests=False,
            system_instruction=spec.system_instruction, apply_chat_template=bool(spec.apply_chat_template),
            fewshot_as_multiturn=spec.fewshot_as_multiturn, chat_template=chat_template,
        )  # fmt: skip
    except Exception as e:
        raise EvaluationError(f"task {run.name}: cannot build requests ({type(e).__name__}: {e})") from None
    instances: dict[int, list[Any]] = defaultdict(list)
    for inst in run.task.instances:
        instances[inst.doc_id].append(inst)
    for group in instances.values():
        group.sort(key=lambda x: x.idx)
    run.groups = [instances.get(doc_id, []) for doc_id, _ in run.docs]


def _resolve_template(lm: Any, choice: bool | str) -> str:
    """The chat template lm-eval picks for `choice` (true: the tokenizer's own or its `default`; a name: that
    one of its named templates); a clear error when the tokenizer has none."""
    try:
        template = lm.chat_template(choice)
    except ValueError as e:
        raise EvaluationError(f"apply_chat_template: {e}") from None
    if not template:
        raise EvaluationError(
            "apply_chat_template: the tokenizer has no chat template (a base model's tokenizer usually has none; "
            "use the instruct model's tokenizer, or drop apply_chat_template)"
        )
    return template


def _positions(task: str, given: Sequence[int], n_docs: int) -> list[int]:
    """`given` as a list of ints, checked: non-empty, distinct, each in [0, n_docs)."""
    try:
        positions = [operator.index(p) for p in given]
    except TypeError:
        raise EvaluationError(f"task {task}: item positions must be integers") from None
    if not positions:
        raise EvaluationError(f"task {task}: empty item selection (leave the task out of items instead)")
    bad = [p for p in positions if not 0 <= p < n_docs]
    if bad:
        raise EvaluationError(f"task {task}: item positions {bad[:5]} out of range 0..{n_docs - 1}")
    if len(set(positions)) != len(positions):
        dup = sorted({p for p in positions if positions.count(p) > 1})
        raise EvaluationError(f"task {task}: duplicated item positions {dup[:5]}")
    return positions


def _run_requests(lm: Any, per_task: list[list[Any]]) -> int:
    """Reset the given requests, run them batched by request type; returns the forward passes run."""
    by_type: dict[str, list[Any]] = defaultdict(list)
    for instances in per_task:
        for inst in instances:
            inst.resps = []
            inst.filtered_resps = {}
            by_type[inst.request_type].append(inst)
    passes = 0
    for request_type, instances in by_type.items():
        cloned = [inst for inst in instances for _ in range(inst.repeats)]
        responses = getattr(lm, request_type)(cloned, disable_tqdm=True)
        for inst, resp in zip(cloned, responses, strict=True):
            inst.resps.append(resp)
        passes += len(cloned)
    return passes


def _score(run: _TaskRun, positions: list[int], instances: list[Any]) -> tuple[np.ndarray, float]:
    """Per-document scores at `positions` (in that order) and their aggregate. Filters run on `instances`
    only (lm-eval's `apply_filters` would walk every request of the task, stale ones included)."""
    for ensemble in getattr(run.task, "_filters", ()):
        ensemble.apply(instances)
    key = next(iter(instances[0].filtered_resps))
    values = []
    for p in positions:
        results = [inst.filtered_resps[key] for inst in run.groups[p]]
        values.append(run.task.process_results(run.docs[p][1], results)[run.metric])
    return np.asarray(values, dtype=np.float64), float(run.task.aggregation()[run.metric](values))
