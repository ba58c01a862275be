"""Start or resume a search in a run directory.

A run directory holds `config.yaml` (the run config as given), `journal.jsonl` (every ask, result and
tell) and, once the budget is reached, `front.json` and `best.yaml`. `resume` rebuilds everything from
these two files.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

import evomerge
from evomerge.config import Objective, RunConfig, load_config
from evomerge.errors import ConfigError, EvomergeError
from evomerge.fidelity.plan import is_exact
from evomerge.journal import Journal, pinned_models, read_journal
from evomerge.merge.recipe import Recipe
from evomerge.runtime.search import (
    Budget,
    Objectives,
    Observer,
    Progress,
    Search,
    SearchState,
    WorkerPool,
    WorkerStartError,
    failure_summary,
    init_error,
    replay,
)
from evomerge.space import build_space

log = logging.getLogger(__name__)


def given_models(config: RunConfig) -> tuple[str, list[str]]:
    """(base, sources) as the config names them; a zoo is built (or reused from its cache) first."""
    if config.models.zoo is not None:
        from evomerge.zoo import build_zoo

        paths = build_zoo(Path(config.models.zoo), seed=config.models.zoo_seed)
        return str(paths["base"]), [str(p) for name, p in sorted(paths.items()) if name != "base"]
    assert config.models.base is not None
    return config.models.base, list(config.models.sources)


def resolve_models(config: RunConfig) -> tuple[str, list[str]]:
    """(base, sources) pinned (`evomerge.references.pin`: absolute paths, hub ids at their commit), before
    anything starts: a bad reference is one line here, not a worker's crash. A function evaluator's run reads
    no model: its names stay as given."""
    from evomerge.references import pin

    base, sources = given_models(config)
    if config.evaluator.type == "function":  # its workers hold no model: the names only label the genes
        return base, sources
    try:
        return pin(base), [pin(s) for s in sources]
    except EvomergeError as e:
        raise ConfigError(f"models: {e}") from None


def run_models(config: RunConfig, events: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """The models of a run: those its journal recorded when it started (resume keeps the commits it began with,
    even if a branch has moved since), else pinned now. A journal from before pinning keeps its references as
    given (its recipes name them so)."""
    pinned = pinned_models(events)
    if pinned is not None:
        return pinned
    started = any(e["event"] == "start" for e in events)
    return given_models(config) if started else resolve_models(config)


def evaluator_spec(config: RunConfig) -> Any:
    ev = config.evaluator
    if ev.type == "lmeval":
        from evomerge.evaluate.lmeval import LMEvalSpec

        return LMEvalSpec(tasks=tuple(ev.tasks), include_path=ev.include_path, limit=ev.limit,
                          subsample=ev.subsample, seed=config.seed, batch_size=ev.batch_size, max_length=ev.max_length,
                          apply_chat_template=ev.apply_chat_template, fewshot_as_multiturn=ev.multiturn,
                          system_instruction=ev.system_instruction, gen_kwargs=ev.gen_kwargs)  # fmt: skip
    if ev.type == "digits":
        from evomerge.evaluate.digits import DigitsSpec

        return DigitsSpec(split=ev.split, report_test=ev.report_test)
    return None


def backend_spec(config: RunConfig, base: str, sources: list[str]) -> Any:
    from evomerge.runtime.worker import FunctionBackendSpec, MergeBackendSpec

    if config.evaluator.type == "function":
        return FunctionBackendSpec(config.evaluator.function, dict(config.evaluator.kwargs))
    return MergeBackendSpec(base, tuple(sources), evaluator_spec(config), device=config.device,
                            pool_dtype=config.workers.pool_dtype, model_dtype=config.workers.model_dtype,
                            pool_device=config.workers.pool_device)  # fmt: skip


def check_chat_template(config: RunConfig, base: str) -> None:
    """`apply_chat_template` needs a template in the target's tokenizer (the base's): checked from its files before
    anything starts, not by every candidate failing on the workers."""
    choice = config.evaluator.apply_chat_template
    if config.evaluator.type != "lmeval" or not choice:
        return
    from evomerge.references import locate

    names = chat_templates(locate(base))
    if (choice is True and "default" not in names) or (choice is not True and choice not in names):
        have = f"its templates: {', '.join(sorted(names))}" if names else "it has none"
        raise ConfigError(
            f"evaluator.apply_chat_template: {choice!r} is not a chat template of the base's tokenizer {base} "
            f"({have}); a search evaluates with the base's tokenizer: pick a base whose tokenizer has one, or drop it"
        )


def chat_templates(tokenizer_dir: Path) -> set[str]:
    """The chat templates a saved tokenizer has, from its files alone ("default": its main one)."""
    names = {"default"} if (tokenizer_dir / "chat_template.jinja").exists() else set()
    names |= {p.stem for p in (tokenizer_dir / "additional_chat_templates").glob("*.jinja")}
    try:
        template = json.loads((tokenizer_dir / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, ValueError, AttributeError):
        template = None
    if isinstance(template, str):
        names.add("default")
    elif isinstance(template, list):
        names |= {t["name"] for t in template if isinstance(t, dict) and "name" in t}
    return names


def objectives_of(config: RunConfig) -> list[Objective]:
    """The configured objectives, or every task of the lm-eval evaluator (its task list is built once here)."""
    if config.objectives:
        return list(config.objectives)
    if config.evaluator.type == "digits":
        return [Objective(name="digits")]
    if config.evaluator.type != "lmeval":
        raise ConfigError("objectives: required with a function evaluator (name each score to optimize)")
    names = evaluator_spec(config).build().task_names
    return [Objective(name=n) for n in names]


def build_strategy(
    config: RunConfig, space: Any, objectives: list[Objective], run_dir: Path | None = None
) -> Any:
    """The configured strategy; `num_workers` (the candidates in flight: workers x batch) and, for model-space
    strategies, the run dir's member store (`RUN_DIR/members`) are filled in when the strategy takes them."""
    from evomerge.strategies import STRATEGIES

    cls = STRATEGIES.get(config.strategy.name)
    options = dict(config.strategy.options)
    params = inspect.signature(cls).parameters
    if "num_workers" in params and "num_workers" not in options:
        options["num_workers"] = config.workers.count * config.workers.batch
    if "store_dir" in params and run_dir is not None:  # inside the run dir (config.py refuses anything else)
        options["store_dir"] = str(Path(run_dir).resolve() / options.get("store_dir", "members"))
    return cls(space, n_objectives=len(objectives), seed=config.seed, weights=[o.weight for o in objectives],
               budget=config.budget.candidates, **options)  # fmt: skip


def check_fidelity(config: RunConfig, strategy: Any) -> None:
    """Refuse, before anything starts, a strategy that needs every candidate's per-item scores on all items."""
    if config.fidelity.reduced and getattr(strategy, "needs_all_items", False):
        raise ConfigError(
            f"strategy {config.strategy.name}: {strategy.needs_all_items}; it cannot use fidelity.racing or "
            "fidelity.estimator (drop them)"
        )


def fidelity_event(config: RunConfig, pool: WorkerPool, models: list[str]) -> dict[str, Any]:
    """The run's item counts per task and, for an estimator, the base's and sources' per-item scores on every
    item (computed once, on the workers, in parallel; journaled so that resume and the estimates replay)."""
    import ray

    actors = pool.actors
    try:
        sizes = ray.get(actors[0].task_sizes.remote())
    except ray.exceptions.RayActorError as e:
        raise WorkerStartError(f"search worker could not start: {init_error(e)}") from None
    event: dict[str, Any] = {"event": "fidelity", "t": time.time(), "sizes": sizes, "forward_passes": 0}
    est = config.fidelity.estimator
    if est is not None:  # `mean` needs no reference rows: only the task sizes
        small = {t: n for t, n in sizes.items() if n < est.items}
        if small:
            task, n = next(iter(small.items()))
            raise ConfigError(
                f"fidelity.estimator.items: {est.items} items is more than task {task} has ({n})"
            )
        if est.name == "mean":
            return event
        refs = list(dict.fromkeys(models))
        answers = ray.get([actors[i % len(actors)].evaluate_model.remote(r) for i, r in enumerate(refs)])
        event["reference"] = {r: a["samples"] for r, a in zip(refs, answers)}
        event["forward_passes"] = sum(int(a["forward_passes"]) for a in answers)
    return event


def build_plan(config: RunConfig, objectives: Objectives, strategy: Any, event: dict[str, Any] | None) -> Any:
    """The fidelity plan of the run (`evomerge.fidelity.plan`), from its journaled `fidelity` event."""
    from evomerge.evaluate.base import unpack_samples
    from evomerge.fidelity.plan import EstimatePlan, ExactPlan, ObjectiveMap, RacingPlan

    fid = config.fidelity
    if not fid.reduced:
        return ExactPlan()
    assert event is not None
    sizes = event["sizes"]
    unknown = [n for n in objectives.names if n not in sizes]
    if unknown:
        raise ConfigError(f"objective {unknown[0]!r} is not a task of the evaluator ({', '.join(sizes)})")
    seed = config.seed if fid.seed is None else fid.seed
    if fid.racing is not None:
        r = fid.racing
        omap = ObjectiveMap(objectives.names, objectives.signs, objectives.weights, strategy.multi_objective)
        return RacingPlan(sizes, omap, rungs=r.rungs, eta=r.eta, test=r.test, alpha=r.alpha, seed=seed,
                          window=r.window)  # fmt: skip
    est = fid.estimator
    assert est is not None
    reference = event.get("reference", {})  # none for `mean`: a placeholder row gives the task size
    matrices = {t: np.stack([unpack_samples(reference[m][t]) for m in reference]) if reference
                else np.zeros((1, n)) for t, n in sizes.items()}  # fmt: skip
    return EstimatePlan(matrices, name=est.name, items=est.items, delta=est.delta, seed=seed)


RAY_AUTH_NOTICE = "ray._private.authentication.authentication_token_setup"


def init_ray(address: str | None, config: RunConfig) -> bool:
    """Connect to `address` or start a local Ray; returns True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    else:
        from evomerge.runtime.worker import verbose

        if not verbose():  # Ray's notice that a new local cluster has token auth on (it stays on); setting
            # RAY_AUTH_MODE would not do: Ray read its config when the driver imported it
            logging.getLogger(RAY_AUTH_NOTICE).setLevel(logging.ERROR)
        cpus = max(os.cpu_count() or 1, int(np.ceil(config.workers.count * config.workers.num_cpus)))
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
    return True


def create_run_dir(config: RunConfig, config_path: Path | None, out: Path | None) -> Path:
    run_dir = Path(out or config.output or Path("runs") / config.name)
    if (run_dir / "journal.jsonl").exists():
        raise ConfigError(
            f"{run_dir}: already holds a run; continue it with `evomerge resume {run_dir}` or pick --out"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    if config_path is not None:
        shutil.copyfile(config_path, run_dir / "config.yaml")
    else:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return run_dir


def write_results(run_dir: Path, state: SearchState, objectives: Objectives) -> dict[str, Any]:
    """front.json (non-dominated candidates with scores and recipes) and best.yaml (best weighted)."""
    from evomerge.merge.mergekit_io import dump_recipe_yaml
    from evomerge.pareto import non_dominated

    # in ask order, not arrival order: the same run gives the same front.json however results raced
    ok = [r for c in state.candidates if (r := state.results.get(c)) is not None and r["status"] == "ok"]
    counts = failure_summary(state)
    if not ok:
        summary = {"objectives": objectives.names, "front": [], "best": None, "counts": counts}
        tmp = run_dir / "front.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, run_dir / "front.json")
        return summary
    points = np.array([r["objectives"] for r in ok])
    front = [ok[i] for i in np.flatnonzero(non_dominated(points))]
    best = max(ok, key=lambda r: float(np.dot(objectives.weights, r["objectives"])))

    def row(r: dict[str, Any]) -> dict[str, Any]:
        out = {"id": r["id"], "scores": r["scores"], "objectives": r["objectives"], "exact": is_exact(r),
               "recipe": state.candidates[r["id"]].recipe.to_dict()}  # fmt: skip
        out.update({k: r[k] for k in ("fidelity", "estimate") if k in r})
        return out

    summary = {"objectives": objectives.names, "front": [row(r) for r in front], "best": row(best),
               "counts": counts}  # fmt: skip
    tmp = run_dir / "front.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, run_dir / "front.json")
    recipe = state.candidates[best["id"]].recipe
    text = (
        dump_recipe_yaml(recipe)
        if isinstance(recipe, Recipe)
        else yaml.safe_dump(recipe.to_dict(), sort_keys=False)
    )
    (run_dir / "best.yaml").write_text(text)
    return summary


def execute(
    run_dir: Path,
    config: RunConfig,
    *,
    address: str | None = None,
    resume: bool = False,
    on_progress: Callable[[Progress], None] | None = None,
    observers: list[Observer] | None = None,
) -> tuple[SearchState, dict[str, Any]]:
    """Run (or continue) the search of `run_dir` to its budget."""
    events = read_journal(run_dir / "journal.jsonl")
    if events and not resume:
        raise ConfigError(f"{run_dir}: already holds a run; use `evomerge resume {run_dir}`")
    base, sources = run_models(config, events)
    check_chat_template(config, base)
    objectives = Objectives(objectives_of(config))
    space = build_space(config, base, sources)
    strategy = build_strategy(config, space, objectives.items, run_dir)
    check_fidelity(config, strategy)
    fid_event = next((e for e in events if e["event"] == "fidelity"), None)
    if config.fidelity.reduced and fid_event is None and any(e["event"] == "ask" for e in events):
        raise ConfigError(
            f"{run_dir}: the journal has candidates but no fidelity record (was the config edited?)"
        )
    plan = (
        build_plan(config, objectives, strategy, fid_event)
        if fid_event or not config.fidelity.reduced
        else None
    )
    state = replay(events, strategy, objectives, plan)
    # The memory plan, before any worker loads a model: CPU workers here are checked against this machine's
    # RAM before Ray starts; GPU workers (and a cluster's) once Ray can probe a node for them.
    from evomerge.runtime import memory

    probe = memory.probes(config, remote=address is not None)
    if not probe:
        memory.check_run(config, base, sources, space)
    started = init_ray(address, config)
    try:
        if probe:
            memory.check_run(config, base, sources, space, remote=address is not None)
    except BaseException:
        if started:
            import ray

            ray.shutdown()
        raise
    pool = WorkerPool(backend_spec(config, base, sources), count=config.workers.count,
                      num_cpus=config.workers.num_cpus, num_gpus=config.workers.num_gpus,
                      torch_threads=config.workers.torch_threads)  # fmt: skip
    budget = Budget(config.budget.candidates, config.budget.forward_passes, config.budget.seconds)
    tracker = None
    if config.tracking.enabled:  # MLflow in a side process; on resume it re-attaches and catches up
        from evomerge.tracking import MLflowTracker

        tracker = MLflowTracker(run_dir, config, objectives=objectives.items, gene_names=space.names,
                                models={"base": base, "sources": sources}, resumed=bool(events))  # fmt: skip
        observers = [*(observers or []), tracker]
    try:
        with Journal(run_dir / "journal.jsonl") as journal:
            mark = {"event": "resume" if events else "start", "t": time.time(), "seed": config.seed,
                    "config_hash": config.content_hash(), "version": evomerge.__version__}  # fmt: skip
            if not events:  # the pinned models: what resume and every worker use from now on
                mark["models"] = {"base": base, "sources": sources}
            journal.append(mark)
            if plan is None:  # a fresh run scored on fewer items: task sizes (and reference rows) first
                fid_event = fidelity_event(config, pool, [base, *sources])
                journal.append(fid_event)
                state.forward_passes += int(fid_event["forward_passes"])
                plan = build_plan(config, objectives, strategy, fid_event)
            search = Search(strategy, objectives, journal, pool, state, budget,
                            scheduling=config.workers.scheduling, max_retries=config.workers.max_retries,
                            timeout=config.workers.timeout_seconds, on_progress=on_progress,
                            observers=observers, plan=plan, cache=config.fidelity.cache,
                            rescore=config.fidelity.rescore if config.fidelity.reduced else 0,
                            batch=config.workers.batch)  # fmt: skip
            state = search.run()
    finally:
        pool.shutdown()
        if started:
            import ray

            ray.shutdown()
        if tracker is not None:  # after Ray's teardown, which the tracker's final flush overlaps
            tracker.close()
    return state, write_results(run_dir, state, objectives)


def start(config_path: Path, *, out: Path | None = None, address: str | None = None, workers: int | None = None,
          on_progress: Callable[[Progress], None] | None = None) -> tuple[Path, SearchState, dict[str, Any]]:  # fmt: skip
    config = load_config(config_path)
    if workers is not None:
        config = config.model_copy(update={"workers": config.workers.model_copy(update={"count": workers})})
    new = not Path(out or config.output or Path("runs") / config.name).exists()
    run_dir = create_run_dir(config, config_path if workers is None else None, out)
    try:
        state, summary = execute(run_dir, config, address=address, on_progress=on_progress)
    except EvomergeError:
        events = read_journal(run_dir / "journal.jsonl", repair=False)
        if new and not any(e["event"] == "result" for e in events):  # nothing done: leave nothing behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return run_dir, state, summary


def resume(run_dir: Path, *, address: str | None = None,
           on_progress: Callable[[Progress], None] | None = None) -> tuple[SearchState, dict[str, Any]]:  # fmt: skip
    if not (run_dir / "config.yaml").exists():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    config = load_config(run_dir / "config.yaml")
    return execute(run_dir, config, address=address, resume=True, on_progress=on_progress)
