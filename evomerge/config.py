"""The run YAML: one file describes a search. Pydantic models; every error names the file, field and reason.

```yaml
name: demo
models: {zoo: zoo}                       # or {base: path, sources: [path, ...]}
space: {type: task_vector, low: 0.0, high: 1.0}
strategy: {name: cma, options: {popsize: 8}}
evaluator: {type: lmeval, tasks: [zoo_search]}
objectives: [{name: zoo_rev_search}, {name: zoo_sort_search, weight: 2.0}]   # default: every task
budget: {candidates: 40}
workers: {count: 2}
seed: 0
output: runs/demo
```
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from evomerge.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelsConfig(_Strict):
    """Either a zoo directory (built or reused: base + experts) or explicit paths."""

    zoo: str | None = None
    zoo_seed: int = 0
    base: str | None = None
    sources: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_kind(self) -> ModelsConfig:
        if self.zoo is None and (self.base is None or not self.sources):
            raise ValueError("give either zoo: DIR, or base: PATH with sources: [PATH, ...]")
        if self.zoo is not None and (self.base is not None or self.sources):
            raise ValueError("give either zoo or base/sources, not both")
        return self


class SpaceConfig(_Strict):
    """`type`: layerwise | task_vector; other keys go to the space's constructor."""

    model_config = ConfigDict(extra="allow", frozen=True)
    type: str = "task_vector"


class StrategyConfig(_Strict):
    name: str = "cma"
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _store_inside_run_dir(self) -> StrategyConfig:
        store = self.options.get("store_dir")
        if store is not None and not _inside(str(store)):
            raise ValueError(f"options.store_dir: must be a relative path inside the run dir (got {store!r})")
        return self


def _inside(path: str) -> bool:
    """A relative path that stays inside the directory it is relative to (no `..` out of it)."""
    parts = PurePosixPath(path.replace("\\", "/")).parts
    return bool(parts) and not PurePosixPath(path).is_absolute() and ".." not in parts and ":" not in path


class EvaluatorConfig(_Strict):
    """lmeval: lm-eval tasks on the merged LLM; function: a Python `module:function` of the recipe
    (synthetic objectives, benchmarks); digits: M2N2's sklearn-digits MLP setting (score `digits`, per-sample
    0/1 on `split`; `report_test` adds `digits_test`, the test accuracy, outside the forward-pass budget).

    Instruct models (lmeval), as lm-eval's options of the same names: `apply_chat_template` (true: the base
    tokenizer's template; a string: one of its named templates), `fewshot_as_multiturn` (unset: on with a chat
    template, as lm-eval's CLI; true needs a template), `system_instruction`, `gen_kwargs` (updates every
    generate_until task's generation kwargs, e.g. {max_gen_toks: 256})."""

    type: Literal["lmeval", "function", "digits"] = "lmeval"
    tasks: list[str] = Field(default_factory=lambda: ["zoo_search"])
    include_path: str | None = None
    limit: int | float | None = None
    subsample: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=64, ge=1)
    max_length: int | None = Field(
        default=None, ge=1
    )  # lm-eval's: requests truncated to it; the memory plan's length
    apply_chat_template: bool | str = False
    fewshot_as_multiturn: bool | None = None
    system_instruction: str | None = None
    gen_kwargs: dict[str, Any] | None = None
    function: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    split: Literal["train", "test"] = "train"
    report_test: bool = False

    @model_validator(mode="after")
    def _function_named(self) -> EvaluatorConfig:
        if self.type == "function" and not self.function:
            raise ValueError("type: function needs function: 'module:function'")
        return self

    @model_validator(mode="after")
    def _chat_options(self) -> EvaluatorConfig:
        prompt = [self.apply_chat_template, self.fewshot_as_multiturn, self.system_instruction]
        if self.type != "lmeval" and any(v not in (None, False) for v in [*prompt, self.gen_kwargs]):
            raise ValueError(
                f"apply_chat_template, fewshot_as_multiturn, system_instruction and gen_kwargs are lm-eval "
                f"options; the {self.type} evaluator has no prompts"
            )
        if isinstance(self.apply_chat_template, str) and not self.apply_chat_template.strip():
            raise ValueError("apply_chat_template: give true, or the name of a tokenizer's template")
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise ValueError("fewshot_as_multiturn: needs apply_chat_template (as in lm-eval)")
        return self

    @property
    def multiturn(self) -> bool:
        """fewshot_as_multiturn as lm-eval resolves it: unset means on exactly when a chat template is."""
        if self.fewshot_as_multiturn is None:
            return bool(self.apply_chat_template)
        return self.fewshot_as_multiturn


class Objective(_Strict):
    name: str
    direction: Literal["maximize", "minimize"] = "maximize"
    weight: float = 1.0


class BudgetConfig(_Strict):
    candidates: int | None = Field(default=None, ge=1)
    forward_passes: int | None = Field(default=None, ge=1)
    seconds: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _some_limit(self) -> BudgetConfig:
        if self.candidates is None and self.forward_passes is None and self.seconds is None:
            raise ValueError("set at least one of candidates, forward_passes, seconds")
        return self


Dtype = Literal["float32", "bfloat16", "float16"]


class WorkersConfig(_Strict):
    """`num_gpus` per worker may be fractional (0.25: four workers share a GPU); a worker with GPUs puts its
    pool and target model on its GPU (`device: auto`). `pool_dtype` stores the resident sources (bfloat16
    halves their memory; merges still accumulate in fp32), `model_dtype` is the target model's (evaluation)
    dtype. `pool_device: cpu` keeps the pool in (pinned) host memory and streams each tensor to the GPU target
    during the candidate switch: pools larger than GPU memory, at PCIe speed (results are the same).
    `batch`: at most this many candidates per worker call, for cheap evaluators (milliseconds: the digits MLP,
    function objectives) whose per-call cost would otherwise dominate; the driver keeps `count x batch`
    candidates asked ahead (a fixed window, so an ordered run stays reproducible) and sizes each call from the
    measured evaluation time (about 0.2 s of work), so seconds-long evaluations still go one per call."""

    count: int = Field(default=2, ge=1)
    num_cpus: float = Field(default=1.0, gt=0)
    num_gpus: float = Field(default=0.0, ge=0)
    torch_threads: int = Field(default=1, ge=1)
    max_retries: int = Field(default=2, ge=0)
    timeout_seconds: float | None = Field(default=None, gt=0)  # per candidate; its worker is then restarted
    scheduling: Literal["ordered", "as_completed"] = "ordered"
    batch: int = Field(default=1, ge=1)  # most candidates per worker call (see above)
    pool_dtype: Dtype = "float32"
    model_dtype: Dtype = "float32"
    pool_device: Literal["auto", "cpu"] = "auto"  # auto: the worker's device


class TrackingConfig(_Strict):
    """MLflow: by default a sqlite store in the run dir (`sqlite:///RUN_DIR/mlflow.db`, artifacts there too);
    `uri` points at a team server instead. `children: front` keeps child runs to the candidates that reach
    the front (a 50,000-candidate search would otherwise spend more CPU on MLflow than on evaluation); the
    parent's metrics, plots and tables still cover every candidate, and the journal holds them all."""

    enabled: bool = True
    uri: str | None = None
    experiment: str | None = None
    children: Literal["all", "front"] = "all"  # "front": child runs only for front candidates (huge searches)


class RacingConfig(_Strict):
    """Racing over nested prefixes of each task's fixed, seeded, shuffled item order: a candidate is scored on
    `rungs` items per task (then on all of them) and stops at a rung when it cannot beat the bar. `eta`:
    successive halving among the reference candidates at the rung (keep the top 1/eta; null: off); `test`:
    a paired test against the incumbent on the shared items (`wilcoxon`, optuna's WilcoxonPruner, or
    `bernstein`, an empirical-Bernstein bound; `none`: off) at level `alpha`, corrected for the repeated looks.
    `window`: halving ranks the candidate among the last `window` reference candidates at the rung (optuna ranks
    among all trials; in a converging search nearly every new candidate then beats the early ones' bar)."""

    rungs: list[int] = Field(default_factory=lambda: [32, 96])
    eta: float | None = Field(default=3.0, gt=1.0)
    # halving compares with the last `window` references (None: all)
    window: int | None = Field(default=32, ge=1)
    test: Literal["wilcoxon", "bernstein", "none"] = "wilcoxon"
    alpha: float = Field(default=0.1, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _increasing(self) -> RacingConfig:
        if not self.rungs or any(r < 1 for r in self.rungs):
            raise ValueError("rungs: give one or more positive item counts per task, e.g. [32, 96]")
        if any(b <= a for a, b in zip(self.rungs, self.rungs[1:])):
            raise ValueError(f"rungs: must be strictly increasing (got {self.rungs})")
        if self.eta is None and self.test == "none":
            raise ValueError("racing needs a rule: eta (successive halving) and/or test")
        return self


class EstimatorConfig(_Strict):
    """Score every candidate on one fixed subset of `items` items per task and estimate its full score from
    the base's and sources' per-item scores on all items (computed once at the start of a run, journaled):
    `mean` (the plain subset mean), `anchor` (k-means anchor points), `irt`, `gmp_irt` (merge-aware IRT,
    blend weight `delta`), `merge_aware` (IRT-free predictor from the sources' per-item scores)."""

    name: Literal["mean", "anchor", "irt", "gmp_irt", "merge_aware"] = "mean"
    items: int = Field(default=20, ge=1)
    delta: float | None = Field(default=None, ge=0.0, le=1.0)  # None: the estimator's own default


class FidelityConfig(_Strict):
    """How many items each candidate is scored on. Default: every item (exact scores). `racing` or `estimator`
    (not both) cut the cost; `cache` skips a recipe already evaluated in the run; `rescore` re-scores up to that
    many candidates of the final front (best first) on every item, so reported and exported scores are exact."""

    racing: RacingConfig | None = None
    estimator: EstimatorConfig | None = None
    seed: int | None = None  # the item order / subset seed; default: the run's seed
    cache: bool = True
    rescore: int = Field(default=10, ge=0)

    @model_validator(mode="after")
    def _one_kind(self) -> FidelityConfig:
        if self.racing is not None and self.estimator is not None:
            raise ValueError("give racing or estimator, not both")
        return self

    @property
    def reduced(self) -> bool:
        """Candidates may be scored on fewer than all items."""
        return self.racing is not None or self.estimator is not None


class RunConfig(_Strict):
    name: str = "search"
    models: ModelsConfig
    space: SpaceConfig = SpaceConfig()
    strategy: StrategyConfig = StrategyConfig()
    evaluator: EvaluatorConfig = EvaluatorConfig()
    objectives: list[Objective] | None = None
    budget: BudgetConfig
    workers: WorkersConfig = WorkersConfig()
    seed: int = 0
    output: str | None = None
    device: str = "auto"
    tracking: TrackingConfig = TrackingConfig()
    fidelity: FidelityConfig = FidelityConfig()

    @model_validator(mode="after")
    def _reduced_fidelity_needs_items(self) -> RunConfig:
        if self.fidelity.reduced and self.evaluator.type != "lmeval":
            raise ValueError(
                f"fidelity: racing and estimators score items of lm-eval tasks; the {self.evaluator.type} "
                "evaluator has none (use evaluator.type: lmeval, or drop fidelity.racing/estimator)"
            )
        if self.fidelity.reduced and (self.evaluator.limit is not None):
            raise ValueError("fidelity: racing/estimator choose the items themselves; drop evaluator.limit")
        return self

    @model_validator(mode="after")
    def _gpu_reserved(self) -> RunConfig:
        if self.device.startswith("cuda") and self.workers.num_gpus == 0:
            raise ValueError(
                f"device: {self.device} needs workers.num_gpus > 0 (Ray gives a worker a GPU only when it asks "
                "for one; e.g. 0.25 for four workers per GPU)"
            )
        return self

    @model_validator(mode="after")
    def _plain_name(self) -> RunConfig:
        if self.output is None and (not _inside(self.name) or "/" in self.name or "\\" in self.name):
            raise ValueError(f"name: must be a plain name, used as runs/NAME (got {self.name!r})")
        return self

    def content_hash(self) -> str:
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for p in loc:
        if isinstance(p, int):
            out += f"[{p}]"
        elif isinstance(p, str) and not p.startswith(("function-", "literal[")) and p[:1].islower():
            out += f".{p}" if out else p
    return out or "<top>"


def parse_config(data: Any, where: str) -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        first = min(e.errors(), key=lambda err: (err["type"] != "extra_forbidden", -len(err["loc"])))
        if first["type"] == "extra_forbidden":
            raise ConfigError(f"{where}: unknown key '{_loc(first['loc'])}'") from None
        got = f" (got {first['input']!r})" if not isinstance(first.get("input"), dict) else ""
        msg = first["msg"].removeprefix("Value error, ")
        field_ = f"{_loc(first['loc'])}: " if first["loc"] else ""  # a whole-config check names its fields
        raise ConfigError(f"{where}: {field_}{msg}{got}") from None


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:  # one line: where and what
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        what = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ConfigError(f"{where}: invalid YAML: {what}") from None
    return parse_config(data, str(path))
