"""Command line: `evomerge merge`, ... User errors print one line and exit 2."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Evolutionary merge search for LLMs.")
err = Console(stderr=True)


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.callback()
def main(
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", "-v", help="Everything: debug logging, every library's and every worker's output."
        ),
    ] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if verbose:  # evomerge.runtime.worker.VERBOSE_ENV: Ray workers inherit it (a cluster's get it passed)
        os.environ["EVOMERGE_VERBOSE"] = "1"
    else:
        _quiet_driver()


def _quiet_driver() -> None:
    """The CLI draws its own progress: library bars and lm-eval's task-loading notices (the driver builds the
    task list, the demo scores on the test split) would interleave with it. Workers quiet themselves."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _parse_size(text: str) -> int:
    units = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
    text = text.strip().upper().removesuffix("B").removesuffix("I")  # 5GB, 5GiB
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


@app.command()
def merge(
    config: Annotated[Path, typer.Argument(help="mergekit (or evomerge) merge YAML.")],
    out_dir: Annotated[Path, typer.Argument(help="Output model directory (must not exist unless --force).")],
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N: where the math runs.")] = "cpu",
    dtype: Annotated[str | None, typer.Option(help="Output dtype (float32, bfloat16, float16).")] = None,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Load .bin/.pt checkpoints (weights_only=True).")
    ] = False,
    truncate_vocab: Annotated[
        bool, typer.Option("--truncate-vocab", help="Merge embeddings over the common vocabulary prefix.")
    ] = False,
    max_shard_size: Annotated[str, typer.Option(help="Largest output shard, e.g. 5GB.")] = "5GB",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing OUT_DIR.")] = False,
) -> None:
    """Merge models as CONFIG describes into OUT_DIR (streamed, one tensor at a time)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from evomerge.errors import EvomergeError
    from evomerge.merge.engine import merge_to_dir
    from evomerge.merge.mergekit_io import load_recipe

    try:
        shard_bytes = _parse_size(max_shard_size)
    except ValueError:
        _fail(f"--max-shard-size: cannot parse {max_shard_size!r} (e.g. 2GB, 500MB)")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            _fail(f"--device {device}: CUDA is not available on this machine")
    columns = (TextColumn("merging"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as progress:
        task = progress.add_task("merge", total=None)
        try:
            recipe = load_recipe(config)
            out = merge_to_dir(
                recipe,
                out_dir,
                device=device,
                dtype=dtype,
                allow_pickle=allow_pickle,
                truncate_vocab=truncate_vocab,
                max_shard_bytes=shard_bytes,
                overwrite=force,
                on_plan=lambda p: progress.update(task, total=len(p.jobs)),
                on_tensor=lambda _job: progress.advance(task),
            )
        except EvomergeError as e:
            _fail(str(e))
    print(f"merged model written to {out}")


@app.command()
def demo(
    config: Annotated[Path, typer.Option(help="The demo's run YAML.")] = Path("configs/demo.yaml"),
    out: Annotated[Path, typer.Option(help="Run directory (replaced if it exists).")] = Path("runs/demo"),
) -> None:
    """Zoo (cached) -> a search -> best merge vs every expert and tuned task arithmetic on the test split -> export."""
    import shutil

    from rich.table import Table

    from evomerge.config import load_config
    from evomerge.demo import compare_on_test
    from evomerge.merge.recipe import Recipe
    from evomerge.runtime.run import resolve_models, start

    console = Console()
    try:
        base, experts = resolve_models(load_config(config))
    except Exception as e:  # noqa: BLE001 - report any zoo failure as one line
        _fail(f"zoo: {e}")
    console.print(f"zoo: base {base}, experts {', '.join(Path(e).name for e in experts)}")
    shutil.rmtree(out, ignore_errors=True)
    run_dir, _state, summary = _search(lambda cb: start(config, out=out, on_progress=cb))
    _print_summary(console, run_dir, summary)
    if summary["best"] is None:
        _print_next_steps(console, run_dir)
        _fail("the search produced no successful candidate")
    tasks, rows = compare_on_test(base, experts, Recipe.model_validate(summary["best"]["recipe"]))
    table = Table(title="held-out test split, exact match (%)")
    table.add_column("model")
    for t in tasks:
        table.add_column(t.removeprefix("zoo_"), justify="right")
    table.add_column("mean", justify="right")
    for label, scores in rows:
        values = [scores[t] * 100 for t in tasks]
        table.add_row(label, *(f"{v:.1f}" for v in values), f"{sum(values) / len(values):.1f}")
    console.print(table)
    console.print(f"run dir: {run_dir}  (best recipe: {run_dir / 'best.yaml'}; journal, front.json)")
    from evomerge.demo import export_best
    from evomerge.errors import EvomergeError

    try:
        result = export_best(run_dir)
    except EvomergeError as e:
        _fail(f"export: {e}")
    console.print(
        f"best merge {result.candidate} exported to {result.out} (Hugging Face model dir + model card)"
    )
    _print_next_steps(console, run_dir)


def _progress_view(p: Any) -> Any:
    from rich.table import Table

    total = p.budget.candidates
    rate = p.done / p.seconds * 60 if p.seconds > 0 else 0.0
    head = (
        f"candidates {p.done}"
        + (f"/{total}" if total else "")
        + f"  in flight {p.in_flight}  failed {p.failed}"
    )
    head += f"  front {p.front_size}  {rate:.1f}/min  {p.seconds:.0f}s"
    table = Table(title=head, title_justify="left", show_header=True)
    table.add_column("objective")
    table.add_column("best so far", justify="right")
    for name, value in p.best.items():
        table.add_row(name, f"{value:.4f}")
    return table


MAX_FRONT_ROWS = 10


def _print_summary(console: Console, run_dir: Path, summary: dict[str, Any]) -> None:
    import numpy as np
    from rich.table import Table

    best = summary.get("best")
    counts = summary.get("counts")
    if counts:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(counts["failed_by_reason"].items()))
        console.print(
            f"candidates {counts['candidates']}: {counts['ok']} ok, {counts['failed']} failed"
            + (f" ({reasons})" if reasons else "")
            + f", {counts['retried']} retried ({counts['retries']} extra attempts)"
        )
    if best is None:
        console.print(f"no successful candidate; journal: {run_dir / 'journal.jsonl'}")
        return
    names = summary["objectives"]
    front = sorted(summary["front"], key=lambda r: -float(np.mean(r["objectives"])))
    shown = front[:MAX_FRONT_ROWS]
    more = f", the {len(shown)} best by mean shown" if len(front) > len(shown) else ""
    table = Table(title=f"Pareto front ({len(front)} candidates{more})")
    table.add_column("candidate")
    for n in names:
        table.add_column(n, justify="right")
    for row in shown:
        mark = (" (best)" if row["id"] == best["id"] else "") + ("" if row.get("exact", True) else " *")
        table.add_row(row["id"] + mark, *(f"{row['scores'][n]:.4f}" for n in names))
    console.print(table)
    if any(not r.get("exact", True) for r in shown):
        console.print(
            "* estimated or partial scores (reduced fidelity); the others are measured on every item"
        )
    console.print(f"best candidate {best['id']}: recipe {run_dir / 'best.yaml'}")
    console.print(f"run dir: {run_dir}  (journal.jsonl, front.json)")


def _print_next_steps(console: Console, run_dir: Path) -> None:
    """How to look at a finished run: the MLflow UI over its store (when it has one) and the front."""
    if (run_dir / "mlflow.db").exists():
        console.print(
            f"look at it: evomerge ui {run_dir}  (MLflow), evomerge front {run_dir}",
            highlight=False,
            soft_wrap=True,
        )
    else:
        console.print(f"look at it: evomerge front {run_dir}", highlight=False, soft_wrap=True)


def _search(fn: Any) -> Any:
    """Run a search function under a live progress display; user errors exit 2."""
    from rich.live import Live

    from evomerge.errors import EvomergeError

    console = Console()
    with Live(console=console, refresh_per_second=2, transient=True) as live:
        try:
            return fn(lambda p: live.update(_progress_view(p)))
        except EvomergeError as e:
            live.stop()
            _fail(str(e))


@app.command(name="run")
def run_search(
    config: Annotated[Path, typer.Argument(help="Run YAML (see configs/demo.yaml).")],
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address (auto, ray://...); default: local Ray.")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Override workers.count.")] = None,
    out: Annotated[
        Path | None, typer.Option(help="Run directory (default: the config's output, or runs/NAME).")
    ] = None,
) -> None:
    """Run a merge search to its budget; the run dir holds the journal, front and best recipe."""
    from evomerge.runtime.run import start

    run_dir, _state, summary = _search(
        lambda cb: start(config, out=out, address=address, workers=workers, on_progress=cb)
    )
    console = Console()
    _print_summary(console, run_dir, summary)
    _print_next_steps(console, run_dir)


@app.command()
def resume(
    run_dir: Annotated[Path, typer.Argument(help="A run directory made by `evomerge run`.")],
    address: Annotated[str | None, typer.Option(help="Ray cluster address; default: local Ray.")] = None,
) -> None:
    """Continue a killed or interrupted run; finished candidates are not re-run."""
    from evomerge.runtime.run import resume as resume_run

    _state, summary = _search(lambda cb: resume_run(run_dir, address=address, on_progress=cb))
    console = Console()
    _print_summary(console, run_dir, summary)
    _print_next_steps(console, run_dir)


@app.command()
def plan(
    config: Annotated[Path, typer.Argument(help="Run YAML (see configs/demo.yaml).")],
    address: Annotated[
        str | None,
        typer.Option(help="Ray cluster address: probe a worker's node (GPU memory, RAM, bandwidth)."),
    ] = None,
    gpu_memory: Annotated[
        str | None, typer.Option(help="Plan GPU workers for a card of this size, e.g. 80GiB (no probe).")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Override workers.count.")] = None,
) -> None:
    """Print a run's memory plan (per worker, workers per node, the models, the candidate switch time) from the
    checkpoints' headers, without loading a model or starting a search; exit 1 when it does not fit."""
    from evomerge.checkpoints import Checkpoint
    from evomerge.config import load_config
    from evomerge.errors import EvomergeError
    from evomerge.runtime import memory as mp
    from evomerge.runtime.run import resolve_models
    from evomerge.space import build_space

    if workers is not None and workers < 1:
        _fail(f"--workers: at least 1 (got {workers})")
    try:
        cfg = load_config(config)
        if workers is not None:
            cfg = cfg.model_copy(update={"workers": cfg.workers.model_copy(update={"count": workers})})
        base, sources = resolve_models(cfg)
        infos = mp.pool_infos(base, sources)
        model_config = Checkpoint(base).config
        settings = mp.run_settings(cfg, model_config, build_space(cfg, base, sources))
    except EvomergeError as e:
        _fail(str(e))
    console = Console()
    _print_models(console, cfg, base, sources)
    if settings is None:
        console.print("evaluator: function; the workers hold no model, nothing to plan")
        return
    mem = _plan_memory(cfg, settings, address, gpu_memory)
    result = mp.plan_memory(infos, model_config, settings, base=base)
    console.print(_plan_table(result, mem))
    if settings.gpu:
        per_node = f", {mem.workers_per_node} per node" if mem.workers_per_node else ""
        console.print(f"workers: {cfg.workers.count}, {mem.workers_per_device} per GPU{per_node}")
    else:
        console.print(f"workers: {cfg.workers.count}, {mem.workers_per_device} per node")
    seconds, how = mp.switch_seconds(result, mem)
    console.print(f"candidate switch (estimate): {seconds * 1000:.1f} ms ({how})", highlight=False)
    if mem.per_worker is None:
        console.print("GPU memory: unknown (pass --address to probe, or --gpu-memory 80GiB)")
        return
    message = mp.refusal(result, mem, infos, model_config)
    if message:
        console.print(message, highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print("fits")


def _print_models(console: Console, cfg: Any, base: str, sources: list[str]) -> None:
    """The model references as the run will use them (pinned), beside what the config gives."""
    given = [cfg.models.base, *cfg.models.sources] if cfg.models.zoo is None else [None] * (1 + len(sources))
    for label, ref, as_given in zip(["base", *["source"] * len(sources)], [base, *sources], given):
        shown = f"{as_given} -> {ref}" if as_given is not None and as_given != ref else ref
        console.print(f"{label}: {shown}", highlight=False, soft_wrap=True)


def _plan_memory(cfg: Any, settings: Any, address: str | None, gpu_memory: str | None) -> Any:
    """The workers' memory: --gpu-memory as given, a probe through Ray with --address, else this machine
    (CPU workers) or unknown (GPU workers). Never starts a local Ray."""
    from evomerge.runtime import memory as mp

    if gpu_memory is not None:
        if not settings.gpu:
            _fail("--gpu-memory: the config's workers use no GPU (workers.num_gpus: 0 or device: cpu)")
        try:
            return mp.gpu_memory(cfg, _parse_size(gpu_memory))
        except ValueError:
            _fail(f"--gpu-memory: cannot parse {gpu_memory!r} (e.g. 80GiB, 24GB)")
    if address is not None:
        import ray

        try:
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
            mem = mp.probe_memory(cfg, measure=True)
        except (ConnectionError, RuntimeError, ray.exceptions.RayError) as e:
            _fail(
                f"--address {address}: cannot probe the cluster ({type(e).__name__}: {str(e).splitlines()[0]})"
            )
        finally:
            ray.shutdown()
        if mem is not None:
            return mem
    if settings.gpu:
        return mp.DeviceMemory("cuda", None, mp.workers_per_gpu(cfg), name="GPU", source="unknown")
    from dataclasses import replace

    return replace(mp.local_memory(cfg), bandwidth=mp.copy_bandwidth("cpu", 64))


def _plan_table(result: Any, mem: Any) -> Any:
    from rich.table import Table

    from evomerge.runtime.memory import fmt_bytes

    s = result.settings
    device = "GPU" if s.gpu else "host"
    title = f"memory per worker ({mem.name or device}, {mem.source})" if mem.source else "memory per worker"
    table = Table(title=title, title_justify="left")
    for col in ("held", "where", "size", "note"):
        table.add_column(col, justify="right" if col == "size" else "left")
    rows = [("pool", "pinned host" if result.pool_on_host else device, result.pool, f"{s.pool_dtype}, sources + base"),
            ("target", device, result.target, s.model_dtype)]  # fmt: skip
    if result.stacking:
        rows.append(("stacking targets", device, result.stacking, f"up to depth {s.max_depth}"))
    rows += [
        (f"evaluator {k}", device, n, f"batch {s.batch_size} x {s.seq_len} tokens")
        for k, n in result.headroom.items()
    ]
    if result.stream:
        rows.append(("stream buffer", device, result.stream, "the largest stack, streamed"))
    if result.context:
        rows.append(("CUDA context", device, result.context, ""))
    have = "unknown" if mem.per_worker is None else fmt_bytes(mem.per_worker)
    rows.append((f"total on {device}", device, result.device_bytes, f"available: {have}"))
    if result.host_bytes:
        host = "unknown" if mem.host_per_worker is None else fmt_bytes(mem.host_per_worker)
        rows.append(("total pinned host", "host", result.host_bytes, f"available: {host}"))
    for held, where, n, note in rows:
        table.add_row(held, where, fmt_bytes(n), note)
    return table


@app.command()
def front(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
    plot: Annotated[
        bool, typer.Option("--plot", help="Also write pareto.png and progress.png into RUN_DIR.")
    ] = False,
) -> None:
    """Print the current Pareto front of a run (finished or still running) from its journal."""
    from evomerge.errors import EvomergeError
    from evomerge.runtime.front import front_from_journal

    try:
        summary = front_from_journal(run_dir)
    except EvomergeError as e:
        _fail(str(e))
    _print_summary(Console(), run_dir, summary)
    if plot:
        from evomerge.tracking import load_record, write_plots

        try:
            paths = write_plots(load_record(run_dir)[1], run_dir)
        except EvomergeError as e:
            _fail(str(e))
        except ImportError as e:
            _fail(f"--plot needs matplotlib ({e})")
        for path in paths:
            print(f"wrote {path}")


@app.command()
def sync(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
    uri: Annotated[
        str | None,
        typer.Option(help="Tracking store (default: the run config's tracking.uri, else RUN_DIR/mlflow.db)."),
    ] = None,
) -> None:
    """Bring the MLflow store up to date with the run's journal (missing runs, metrics, tags, artifacts)."""
    from evomerge.errors import EvomergeError
    from evomerge.tracking import sync as sync_run

    try:
        report = sync_run(run_dir, uri=uri)
    except EvomergeError as e:
        _fail(str(e))
    state = "changed" if report["changed"] else "already up to date"
    print(
        f"{report['uri']}: parent run {report['parent_run_id']} {state}; {report['children']} candidates, "
        f"{report['created']} child runs created, {report['updated']} updated, {report['removed']} duplicates "
        f"removed, {report['parent_metrics']} parent metric values logged"
    )


@app.command()
def export(
    run: Annotated[
        str, typer.Argument(help="A run directory, or an MLflow run id (parent or candidate run).")
    ],
    out_dir: Annotated[Path, typer.Argument(help="Output model directory (must not exist unless --force).")],
    pick: Annotated[
        str | None,
        typer.Option(help="best, knee or a candidate id (default: best; a candidate run: itself)."),
    ] = None,
    weights: Annotated[
        str | None, typer.Option(help="task=w,...: the best by this weighted sum of objectives.")
    ] = None,
    dtype: Annotated[str | None, typer.Option(help="Output dtype (float32, bfloat16, float16).")] = None,
    max_shard_size: Annotated[str, typer.Option(help="Largest output shard, e.g. 5GB.")] = "5GB",
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N: where the merge math runs.")] = "cpu",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing OUT_DIR.")] = False,
    verify: Annotated[
        bool, typer.Option("--verify", help="Re-evaluate the export from disk; a score mismatch is an error.")
    ] = False,
    tolerance: Annotated[float, typer.Option(help="--verify: largest allowed score difference.")] = 0.0,
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow store (default: the run's); needed with a run id.")
    ] = None,
    register: Annotated[
        str | None, typer.Option(help="Also register the export as a version of this MLflow model.")
    ] = None,
) -> None:
    """Write one candidate of a run as a Hugging Face model dir with its recipe, mergekit YAML and model card."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from evomerge.errors import EvomergeError
    from evomerge.export import VerifyError
    from evomerge.export import export as export_run

    try:
        shard_bytes = _parse_size(max_shard_size)
    except ValueError:
        _fail(f"--max-shard-size: cannot parse {max_shard_size!r} (e.g. 2GB, 500MB)")
    columns = (TextColumn("exporting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as progress:
        task = progress.add_task("export", total=None)
        try:
            result = export_run(
                run, out_dir, pick=pick, weights=weights, dtype=dtype, max_shard_bytes=shard_bytes,
                device=device, force=force, verify=verify, tolerance=tolerance, tracking_uri=tracking_uri,
                register=register, on_plan=lambda p: progress.update(task, total=len(p.jobs)),
                on_tensor=lambda _job: progress.advance(task),
            )  # fmt: skip
        except VerifyError as e:
            err.print(
                f"[bold red]error:[/] {e}; nothing written to {out_dir}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(1) from None
        except EvomergeError as e:
            _fail(str(e))
    _print_export(result)


def _print_export(result: Any) -> None:
    scores = ", ".join(f"{k} {v:.4f}" for k, v in result.scores.items())
    print(f"candidate {result.candidate} ({result.how}): {scores}")
    if result.verified is not None:
        print(f"verified: {len(result.verified)} task scores re-evaluated from disk match the journal")
    if result.tracking:
        print(f"recorded on MLflow run {result.tracking}")
    extra = " + mergekit_config.yml" if result.mergekit else ""
    print(f"exported to {result.out}  (README.md, evomerge_recipe.yaml{extra})")


@app.command()
def verify(
    model_dir: Annotated[Path, typer.Argument(help="A directory written by `evomerge export`.")],
    run_dir: Annotated[
        Path | None, typer.Option(help="The run it came from (default: the one its model card names).")
    ] = None,
    tolerance: Annotated[float, typer.Option(help="Largest allowed score difference.")] = 0.0,
    device: Annotated[str | None, typer.Option(help="Where to evaluate (default: the run's device).")] = None,
) -> None:
    """Re-evaluate an exported model from disk with its run's evaluator and compare with the journal's scores."""
    from evomerge.errors import EvomergeError
    from evomerge.export import VerifyError, verify_export

    try:
        cid, pairs = verify_export(model_dir, run_dir, tolerance=tolerance, device=device)
    except VerifyError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except EvomergeError as e:
        _fail(str(e))
    print(f"{model_dir}: candidate {cid} verified, {len(pairs)} task scores match the journal")


@app.command()
def zoo(
    out: Annotated[Path, typer.Option(help="Directory of the zoo (reused when complete).")] = Path("zoo"),
    seed: Annotated[int, typer.Option(help="Seed of the zoo (initialisation and training data).")] = 0,
) -> None:
    """Build (or reuse) the trained demo zoo: a tiny base and one expert per skill, and their scores."""
    import json
    import time

    from rich.table import Table

    from evomerge.zoo import build_zoo, load_zoo

    console = Console()
    if load_zoo(out, seed) is None:
        err.print(f"building the zoo in {out} (2-3 minutes on 2 CPU cores)")
    start = time.perf_counter()
    try:
        paths = build_zoo(out, seed=seed)
        report = json.loads((out / "SCORES.json").read_text())
    except OSError as e:
        _fail(f"{out}: {e.strerror or e}")
    seconds = time.perf_counter() - start
    rows = report["scores"]
    tasks = list(next(iter(rows.values())))
    table = Table(title=f"exact match (%) on the held-out test split (seed {seed}, {seconds:.1f} s)")
    for col in ("model", *tasks):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, row in rows.items():
        table.add_row(name, *(f"{row[t]:.1f}" for t in tasks))
    console.print(table)
    console.print(f"zoo: {out} ({', '.join(paths)}); scores: {out / 'SCORES.md'}")


@app.command()
def ui(
    run_dir: Annotated[Path | None, typer.Argument(help="A run directory (its mlflow.db).")] = None,
    tracking_uri: Annotated[
        str | None, typer.Option(help="Any MLflow tracking URI instead of a run dir.")
    ] = None,
    port: Annotated[int, typer.Option(help="Port.")] = 5000,
    host: Annotated[
        str, typer.Option(help="Interface to bind; anything but 127.0.0.1 exposes the store to the network.")
    ] = "127.0.0.1",
) -> None:
    """Serve the MLflow UI for a run's store (on 127.0.0.1 unless --host) and print its URL (Ctrl-C stops it)."""
    from evomerge.errors import EvomergeError
    from evomerge.ui import experiment_url, run_experiment_id, start_server, store_uri

    try:
        uri = store_uri(run_dir, tracking_uri)
        experiment = run_experiment_id(uri, run_dir) if uri.startswith("sqlite") else None
        proc = start_server(uri, host=host, port=port)
    except EvomergeError as e:
        _fail(str(e))
    if host not in ("127.0.0.1", "localhost", "::1"):
        err.print(
            f"warning: the MLflow UI listens on {host}: anyone who can reach it can read and change the store"
        )
    print(f"MLflow UI: {experiment_url(host, port, experiment)}", flush=True)
    try:
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        proc.terminate()
        proc.wait()


def run() -> None:  # pragma: no cover - console entry for `python -m evomerge`
    sys.exit(app())
