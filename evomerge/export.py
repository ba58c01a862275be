"""Export one candidate of a run as an ordinary Hugging Face model directory.

    result = export(Path("runs/demo"), Path("out/best"), pick="knee", verify=True)

What lands in OUT_DIR: the merged weights (sharded safetensors, streamed tensor by tensor by the merge engine,
so memory holds one tensor's inputs at a time), `config.json` and the tokenizer, `evomerge_recipe.yaml` (the
exact recipe: `evomerge merge evomerge_recipe.yaml OUT` rebuilds the same tensors), `mergekit_config.yml`
when mergekit can express the recipe, and a model card `README.md` (model_card.py). Everything is written
into a temp dir beside OUT_DIR and renamed at the end: an interrupted or failed export (a failed `--verify`
included) leaves no OUT_DIR and no temp dir.

Recipe types: candidates' recipes come from the journal as dicts. `recipe_from_json` parses them (one place),
and `materialize`, `mergekit_yaml` and `describe` dispatch on the recipe's type. Only `Recipe` (mergekit's
schema) exists today; a new recipe type (e.g. a model-space mixture) adds one case to each.

Which candidate: `best` (the run's weighted objective, as front.json's best), `knee` (pareto.knee_point of
the successful results), a candidate id, or `weights` ({objective: weight}; best by that weighted sum of the
maximized objective vector). The run is a run directory or an MLflow run id (parent: the run's best; child:
that candidate), resolved through the tracking store's `evomerge.run_dir` / `evomerge.candidate` tags.

The export is recorded on the run's MLflow parent run (tags with the path, the card and recipes as artifacts
under `exports/<candidate>/`, optionally a registered model version); tracking problems are warnings, the
export stands.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.config import RunConfig, load_config
from evomerge.errors import EvomergeError
from evomerge.merge.recipe import Recipe

log = logging.getLogger(__name__)

RECIPE_FILE = "evomerge_recipe.yaml"
MERGEKIT_FILE = "mergekit_config.yml"
CARD_FILE = "README.md"
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
REGISTRY_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")


class ExportError(EvomergeError):
    pass


class VerifyError(EvomergeError):
    """The exported directory does not reproduce the journal's scores."""


# ------------------------------------------------------------------------------------------ recipe types


def recipe_from_json(data: dict[str, Any], where: str = "recipe") -> Any:
    """A journal's recipe dict -> a recipe object. The one place that knows the recipe types."""
    if data.get("kind") is not None:  # a model-space recipe (Mixture, Offspring)
        from evomerge.merge.mixture import candidate_recipe

        return candidate_recipe(data)
    from evomerge.merge.mergekit_io import recipe_from_dict

    return recipe_from_dict(data, where)


def materialize(
    recipe: Any,
    out: Path,
    *,
    device: str = "cpu",
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    on_plan: Callable[[Any], None] | None = None,
    on_tensor: Callable[[Any], None] | None = None,
    run_dir: Path | None = None,
) -> Path:
    """Write the merged model to `out` (must not exist): weights, config, tokenizer and RECIPE_FILE.
    `run_dir`: the run the recipe comes from, for recipes that read from it (e.g. stored members)."""
    if isinstance(recipe, Recipe):
        from evomerge.merge.engine import merge_to_dir

        return merge_to_dir(recipe, out, device=device, dtype=dtype, max_shard_bytes=max_shard_bytes,
                            on_plan=on_plan, on_tensor=on_tensor)  # fmt: skip
    from evomerge.merge.engine import parse_dtype
    from evomerge.merge.members import write_model_dir

    if run_dir is None:
        raise TypeError(
            f"a {type(recipe).__name__} recipe needs its run dir (the base model is in its config)"
        )
    from evomerge.journal import read_journal
    from evomerge.runtime.run import run_models

    config = load_config(Path(run_dir) / "config.yaml")
    base, _ = run_models(config, read_journal(Path(run_dir) / "journal.jsonl", repair=False))
    return write_model_dir(recipe, base, out, dtype=parse_dtype(dtype, "--dtype"),
                           max_shard_bytes=max_shard_bytes)  # fmt: skip


def mergekit_yaml(recipe: Any) -> tuple[str | None, str]:
    """(mergekit YAML, "") when mergekit can build the recipe, else (None, the reason)."""
    if isinstance(recipe, Recipe):
        from evomerge.merge.mergekit_io import dump_mergekit_yaml
        from evomerge.merge.methods import METHODS

        if not METHODS.get(recipe.merge_method).in_mergekit:
            return None, f"merge method {recipe.merge_method!r} is evomerge's own (not in mergekit)"
        return dump_mergekit_yaml(recipe), ""
    return None, f"a {type(recipe).__name__} recipe has no mergekit equivalent"


@dataclass(frozen=True)
class RecipeSummary:
    """What a model card says about a recipe."""

    method: str
    base: str | None
    models: list[str]  # every model it reads, base first


def describe(recipe: Any) -> RecipeSummary:
    if isinstance(recipe, Recipe):
        return RecipeSummary(recipe.merge_method, recipe.base_model, recipe.referenced_models())
    from evomerge.merge.mixture import Mixture

    if isinstance(recipe, Mixture):  # M2N2 archive member: per-segment coefficients over the pool
        return RecipeSummary("m2n2 model-space mixture", None, list(recipe.models))
    return RecipeSummary("m2n2 offspring (stored member)", None, list(recipe.parents))


# ------------------------------------------------------------------------------------------ the run


@dataclass
class RunView:
    """A run as the journal tells it: candidates (as recorded) and their first results."""

    run_dir: Path
    config: RunConfig
    names: list[str]  # objective names
    directions: list[str]
    weights: np.ndarray  # the config's objective weights
    candidates: dict[str, dict[str, Any]]  # id -> ask record (recipe as a dict)
    results: dict[str, dict[str, Any]]  # id -> first result event
    ok: list[str] = field(default_factory=list)  # successful ids, in result order

    def points(self, ids: list[str] | None = None) -> np.ndarray:
        """Maximized objective vectors of `ids` (default: every successful candidate)."""
        ids = self.ok if ids is None else ids
        return np.array([self.results[c]["objectives"] for c in ids], dtype=np.float64).reshape(len(ids), -1)

    def front(self) -> list[str]:
        from evomerge.pareto import non_dominated

        return [self.ok[i] for i in np.flatnonzero(non_dominated(self.points()))] if self.ok else []


def read_run(run_dir: Path) -> RunView:
    from evomerge.journal import final_results, read_journal

    if not (run_dir / "journal.jsonl").exists():
        raise ExportError(f"{run_dir}: no journal.jsonl (not a run directory?)")
    config = load_config(run_dir / "config.yaml")
    events = read_journal(run_dir / "journal.jsonl", repair=False)
    candidates = {c["id"]: c for e in events if e["event"] == "ask" for c in e["candidates"]}
    results = final_results(events)
    ok = [c for c, r in results.items() if r["status"] == "ok"]
    if config.objectives:
        names = [o.name for o in config.objectives]
        directions = [o.direction for o in config.objectives]
        weights = np.array([o.weight for o in config.objectives], dtype=np.float64)
    else:
        names = list(results[ok[0]]["scores"]) if ok else []
        directions, weights = ["maximize"] * len(names), np.ones(len(names))
    return RunView(run_dir, config, names, directions, weights, candidates, results, ok)


def parse_weights(text: str, names: list[str]) -> np.ndarray:
    """`task=w,task=w` -> a weight per objective (unnamed objectives weigh 0)."""
    out = dict.fromkeys(names, 0.0)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep:
            raise ExportError(f"--weights: {part!r} is not task=weight")
        if name not in out:
            raise ExportError(f"--weights: unknown objective {name!r} (objectives: {', '.join(names)})")
        try:
            out[name] = float(value)
        except ValueError:
            raise ExportError(f"--weights: {name}: {value.strip()!r} is not a number") from None
    w = np.array(list(out.values()))
    if not np.all(np.isfinite(w)) or not np.any(w):
        raise ExportError(f"--weights: {text!r} gives no finite non-zero weight")
    return w


def select(view: RunView, pick: str = "best", weights: np.ndarray | None = None) -> tuple[str, str]:
    """(candidate id, how it was chosen). `pick`: best, knee or a candidate id."""
    if pick not in ("best", "knee"):
        return _by_id(view, pick), "candidate id given"
    if not view.ok:
        raise ExportError(f"{view.run_dir}: no successful candidate to export")
    if pick == "knee":
        from evomerge.pareto import knee_point

        return view.ok[knee_point(view.points())], "knee point of the Pareto front"
    w = view.weights if weights is None else weights
    i = int(np.argmax(view.points() @ w))  # first of ties, as front.json's best
    terms = ", ".join(f"{n}={v:g}" for n, v in zip(view.names, w) if v)
    return view.ok[i], f"best weighted objective ({terms})"


def _by_id(view: RunView, cid: str) -> str:
    if cid not in view.candidates:
        known = list(view.candidates)
        sample = ", ".join(known[:3]) + (", ..." if len(known) > 3 else "")
        raise ExportError(f"unknown candidate {cid!r} in {view.run_dir} (known: {sample or 'none'})")
    r = view.results.get(cid)
    if r is None or r["status"] != "ok":
        why = "was never evaluated" if r is None else f"failed ({r.get('error') or 'no reason recorded'})"
        raise ExportError(f"candidate {cid} in {view.run_dir} {why}: nothing to export")
    return cid


# ------------------------------------------------------------------------------------------ MLflow run ids


def resolve_run(ref: str, tracking_uri: str | None) -> tuple[Path, str | None]:
    """RUN (a run dir, or an MLflow run id) -> (run dir, candidate id of a child run or None)."""
    path = Path(ref)
    if path.is_dir() or not RUN_ID.match(ref):
        if not path.is_dir():
            raise ExportError(f"{ref}: not a run directory (nor an MLflow run id)")
        return path, None
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ExportError(f"{ref}: looks like an MLflow run id; give the store with --tracking-uri")
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from evomerge.tracking import CANDIDATE_TAG, RUN_DIR_TAG

    client = MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(ref)
    except MlflowException:
        raise ExportError(f"{ref}: no such MLflow run in {uri}") from None
    candidate = run.data.tags.get(CANDIDATE_TAG)
    parent_id = run.data.tags.get("mlflow.parentRunId")
    tags = client.get_run(parent_id).data.tags if candidate and parent_id else run.data.tags
    run_dir = tags.get(RUN_DIR_TAG)
    if not run_dir:
        raise ExportError(f"{ref}: not an evomerge run (no {RUN_DIR_TAG} tag)")
    if not Path(run_dir).is_dir():
        raise ExportError(f"{ref}: its run directory {run_dir} does not exist here")
    return Path(run_dir), candidate


# ------------------------------------------------------------------------------------------ export


@dataclass
class ExportResult:
    out: Path
    candidate: str
    how: str
    scores: dict[str, float]
    mergekit: bool
    verified: dict[str, tuple[float, float]] | None = None  # task -> (journal, re-evaluated)
    tracking: str | None = None  # parent run id the export was logged to


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise ExportError(f"{out}: already exists (use --force to replace it)")
    if not out.resolve().parent.is_dir():
        raise ExportError(f"{out}: parent directory {out.resolve().parent} does not exist")


def export(
    run: str | Path,
    out: Path,
    *,
    pick: str | None = None,
    weights: str | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    device: str = "cpu",
    force: bool = False,
    verify: bool = False,
    tolerance: float = 0.0,
    tracking_uri: str | None = None,
    register: str | None = None,
    command: str | None = None,
    on_plan: Callable[[Any], None] | None = None,
    on_tensor: Callable[[Any], None] | None = None,
) -> ExportResult:
    """Choose a candidate, write it to `out` atomically, optionally verify it, record it in MLflow."""
    from evomerge.model_card import CardInput, render_card

    _check_tolerance(tolerance)
    run_dir, child = resolve_run(str(run), tracking_uri)
    view = read_run(run_dir)
    if weights is not None and pick not in (None, "best"):
        raise ExportError(
            "--weights chooses the best by a weighted objective; it cannot go with --pick " + pick
        )
    w = parse_weights(weights, view.names) if weights is not None else None
    cid, how = select(view, pick or (None if w is not None else child) or "best", w)
    recipe = recipe_from_json(view.candidates[cid]["recipe"], f"{run_dir}: candidate {cid}")
    _check_out(out, force)
    uri = _store_uri(view, tracking_uri)
    if register is not None and (uri is None or uri.split(":", 1)[0].split("+")[0] not in REGISTRY_SCHEMES):
        raise ExportError(
            f"--register {register}: the tracking store {uri or '(none)'} has no model registry"
        )

    parent = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.resolve().parent))
    try:
        model_dir = materialize(recipe, parent / "model", device=device, dtype=dtype,
                                max_shard_bytes=max_shard_bytes, on_plan=on_plan, on_tensor=on_tensor,
                                run_dir=run_dir)  # fmt: skip
        mk, why_not = mergekit_yaml(recipe)
        if mk is not None:
            (model_dir / MERGEKIT_FILE).write_text(mk)
        card = CardInput(
            candidate=cid, how=how, run_dir=run_dir.resolve(), view=view, summary=describe(recipe),
            mergekit=mk is not None, mergekit_reason=why_not, dtype=dtype,
            command=command or _command(run_dir, out, cid),
        )  # fmt: skip
        (model_dir / CARD_FILE).write_text(render_card(card))
        result = ExportResult(out, cid, how, dict(view.results[cid]["scores"]), mk is not None)
        if verify:
            result.verified = verify_scores(model_dir, view, cid, tolerance=tolerance)
        _replace(model_dir, out)
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    if uri is not None:
        result.tracking = log_export(uri, view, cid, out, register=register)
    return result


def _check_tolerance(tolerance: float) -> None:
    if not tolerance >= 0:
        raise ExportError(f"--tolerance: must be >= 0 (got {tolerance})")


def _command(run_dir: Path, out: Path, cid: str) -> str:
    return f"evomerge export {run_dir} {out} --pick {cid}"


def _replace(src: Path, out: Path) -> None:
    """Move the finished export into place; an existing `out` (--force) is removed only then."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(src, 0o777 & ~umask)  # mkdtemp made it private
    if out.exists():
        trash = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, trash)
        os.replace(src, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, out)


# ------------------------------------------------------------------------------------------ verify


def _export_meta(model_dir: Path) -> dict[str, Any]:
    """The `evomerge:` block of an export's model card front matter."""
    import yaml

    card = model_dir / CARD_FILE
    try:
        text = card.read_text()
    except OSError:
        raise ExportError(f"{model_dir}: no {CARD_FILE} (not an evomerge export?)") from None
    parts = text.split("---\n", 2)
    meta = yaml.safe_load(parts[1]) if text.startswith("---\n") and len(parts) == 3 else None
    if not isinstance(meta, dict) or not isinstance(meta.get("evomerge"), dict):
        raise ExportError(f"{card}: no evomerge block in its front matter (not an evomerge export?)")
    return meta["evomerge"]


def verify_export(
    model_dir: Path, run_dir: Path | None = None, *, tolerance: float = 0.0, device: str | None = None
) -> tuple[str, dict[str, tuple[float, float]]]:
    """Re-evaluate an existing export against its run's journal; (candidate id, per-task scores)."""
    _check_tolerance(tolerance)
    meta = _export_meta(model_dir)
    run_dir = run_dir or Path(meta["run_dir"])
    cid = str(meta["candidate"])
    view = read_run(run_dir)
    _by_id(view, cid)
    return cid, verify_scores(model_dir, view, cid, tolerance=tolerance, device=device)


def verify_scores(
    model_dir: Path, view: RunView, cid: str, *, tolerance: float = 0.0, device: str | None = None
) -> dict[str, tuple[float, float]]:
    """Evaluate the model in `model_dir` from disk with the run's evaluator; a score further than
    `tolerance` from the journal's is a VerifyError naming the task and both values."""
    from evomerge.merge.target import load_target
    from evomerge.runtime.run import evaluator_spec
    from evomerge.runtime.worker import resolve_device

    spec = evaluator_spec(view.config)
    if spec is None:
        raise ExportError(
            f"--verify needs an lm-eval or digits evaluator; {view.run_dir} used {view.config.evaluator.type}"
        )
    from evomerge.fidelity.plan import is_exact

    if not is_exact(view.results[cid]):
        items = sum(view.results[cid].get("fidelity", {}).get("items", {}).values())
        raise VerifyError(
            f"verify: the journal's scores of {cid} were measured on {items} items only (reduced fidelity; the run "
            "re-scores its best and front on every item): nothing exact to verify against; export without --verify"
        )
    model, tokenizer = load_target(model_dir, resolve_device(device or view.config.device))
    got = spec.build().evaluate(model, tokenizer).scores
    expected = view.results[cid]["scores"]
    pairs = {t: (float(expected[t]), float(got[t])) for t in expected if t in got}
    missing = sorted(set(expected) - set(got))
    if missing:
        raise VerifyError(f"verify: the evaluator gave no score for {', '.join(missing)}")
    bad = [(t, a, b) for t, (a, b) in pairs.items() if not abs(a - b) <= tolerance]
    if bad:
        t, a, b = bad[0]
        more = f" (and {len(bad) - 1} more tasks)" if len(bad) > 1 else ""
        raise VerifyError(
            f"verify failed for candidate {cid}: {t} = {b:.6g} from the exported weights, {a:.6g} in the "
            f"journal (|diff| {abs(a - b):.3g} > tolerance {tolerance:g}){more}"
        )
    return pairs


# ------------------------------------------------------------------------------------------ MLflow


def _store_uri(view: RunView, tracking_uri: str | None) -> str | None:
    """The run's tracking store, or None when there is none to record the export in."""
    from evomerge.tracking import default_uri

    if tracking_uri:
        return tracking_uri
    if not view.config.tracking.enabled:
        return None
    if view.config.tracking.uri:
        return view.config.tracking.uri
    return default_uri(view.run_dir) if (view.run_dir / "mlflow.db").exists() else None


def log_export(uri: str, view: RunView, cid: str, out: Path, *, register: str | None = None) -> str | None:
    """Tags (export path), artifacts (card, recipes) and optionally a model version on the parent run.
    Returns the parent run id; any tracking failure is a warning (the export itself is done)."""
    try:
        return _log_export(uri, view, cid, out.resolve(), register)
    except Exception as e:  # noqa: BLE001 - MLflow raises many kinds; the export must stand
        log.warning("export not recorded in MLflow (%s): %s", uri, str(e).splitlines()[0] if str(e) else e)
        return None


def _log_export(uri: str, view: RunView, cid: str, out: Path, register: str | None) -> str | None:
    from mlflow import MlflowClient

    from evomerge.tracking import CANDIDATE_TAG, RUN_DIR_TAG

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(view.config.tracking.experiment or view.config.name)
    if exp is None:
        log.warning("export not recorded: %s has no experiment for %s", uri, view.run_dir)
        return None
    run_dir = str(view.run_dir.resolve())
    runs = client.search_runs([exp.experiment_id], f"tags.`{RUN_DIR_TAG}` = '{run_dir}'",
                              order_by=["attributes.start_time DESC"])  # fmt: skip
    parent = next((r for r in runs if "mlflow.parentRunId" not in r.data.tags), None)
    if parent is None:
        log.warning("export not recorded: no parent run for %s in %s", run_dir, uri)
        return None
    pid = parent.info.run_id
    client.set_tag(pid, "evomerge.export", str(out))
    client.set_tag(pid, f"evomerge.export.{cid}", str(out))
    for name in (CARD_FILE, RECIPE_FILE, MERGEKIT_FILE):
        if (out / name).exists():
            client.log_artifact(pid, str(out / name), artifact_path=f"exports/{cid}")
    children = client.search_runs([exp.experiment_id], f"tags.`{CANDIDATE_TAG}` = '{cid}'")
    for child in children:
        if child.data.tags.get("mlflow.parentRunId") == pid:
            client.set_tag(child.info.run_id, "evomerge.export", str(out))
    if register:
        from mlflow.exceptions import MlflowException

        try:
            client.create_registered_model(register)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        client.create_model_version(register, source=out.as_uri(), run_id=pid,
                                    tags={"evomerge.candidate": cid, "evomerge.run_dir": run_dir},
                                    description=f"evomerge candidate {cid} of {run_dir}")  # fmt: skip
    return pid
