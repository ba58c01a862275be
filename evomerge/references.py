"""Model references as users name them: a local directory, or a Hugging Face hub id `org/name[@revision]`.

mergekit's syntax: `org/name@revision` (branch, tag or commit) and `model+adapter` for a LoRA adapter on a model;
a local directory of that name wins over the hub. Hub references resolve through `huggingface_hub` and its cache
(`HF_HOME` / `HF_HUB_CACHE` and `HF_HUB_OFFLINE`, read when a reference resolves, not at import; the token is
huggingface_hub's own business: `HF_TOKEN` or the user's login, never seen or logged here). Only what a merge needs
is fetched: safetensors weights, configs, tokenizer and generation files, adapters' files, the model card; pickled
weights only with `allow_pickle`.

`pin` turns a reference into one that reproduces the same files anywhere: an absolute path for a local directory,
`org/name@<commit>` for a hub model. A search pins its models once, before any worker starts, and names them that
way in the journal, the recipes, `best.yaml`, exports and MLflow; `locate` then finds the pinned snapshot in the
cache on any node, even after the branch has moved.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import CheckpointError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
# What a merge reads, at the top of the repo only (`*/*`: no `original/` checkpoints or other subfolders): weights,
# configs, tokenizer and vocab/merges files, chat templates, the card (its license). Mistral's `consolidated.*`
# duplicates the weights in its own format.
NEEDED_FILES = ["*.safetensors", "*.json", "*.jinja", "tokenizer.model", "*.txt", "README.md"]
PICKLED_FILES = ["*.bin", "*.pt", "*.pth"]
SKIPPED_FILES = ["*/*", "consolidated*"]


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id


def parse_hub(ref: str) -> HubRef | None:
    """The hub id a reference names, or None for a local directory (or anything that is not `org/name[@rev]`)."""
    if Path(ref).exists():
        return None
    repo_id, at, revision = ref.partition("@")
    if not HUB_ID.match(repo_id) or (at and not revision) or "@" in revision or "+" in revision:
        return None
    return HubRef(repo_id, revision or None)


def parts(ref: str) -> list[str]:
    """`model+adapter` -> [model, adapter]; a path that exists (even with a `+` in its name) is one part."""
    return [ref] if "+" not in ref or Path(ref).exists() else ref.split("+", 1)


CACHE_ENV = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")
MODE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT")


def hub_cache() -> Path:
    """The hub cache huggingface_hub uses: HF_HUB_CACHE (or its old name), else HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub."""
    env = os.environ
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not cache:
        home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
        cache = os.path.join(home, "hub")
    return Path(os.path.expandvars(cache)).expanduser()


def hub_env() -> dict[str, str]:
    """The driver's hub settings that workers must share to find the same snapshots (a cache on shared storage,
    offline mode), for the Ray workers: the cache as an absolute path (a worker's working directory differs), only
    when the driver chose one. The token is not among them: a node that must download a gated model logs in."""
    env = {k: os.environ[k] for k in MODE_ENV if k in os.environ}
    if any(k in os.environ for k in CACHE_ENV):
        env["HF_HUB_CACHE"] = os.path.abspath(hub_cache())
    return env


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as huggingface_hub reads it, but now rather than at its import."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in {"1", "ON", "YES", "TRUE"}


def locate(ref: str, *, allow_pickle: bool = False) -> Path:
    """The directory holding the files of one model or adapter reference (no `+`): the local directory itself, or
    the hub snapshot in the cache (fetched first when online and not cached)."""
    hub = parse_hub(ref)
    if hub is None:
        return Path(ref)
    return _snapshot(hub, allow_pickle=allow_pickle)


def pin(ref: str, *, allow_pickle: bool = False) -> str:
    """A reference that names the same files anywhere: absolute paths, `org/name@<commit>` for hub models."""
    pinned = []
    for part in parts(ref):
        hub = parse_hub(part)
        if hub is None:
            if not Path(part).is_dir():
                raise CheckpointError(
                    f"{part}: no such model directory, and not a hub id (org/name or org/name@revision)"
                )
            pinned.append(os.path.abspath(part))  # absolute, symlinks kept as the user named them
        else:
            pinned.append(f"{hub.repo_id}@{_snapshot(hub, allow_pickle=allow_pickle).name}")
    return "+".join(pinned)


MODEL_KEYS = ("model", "base_model", "tokenizer_source", "source")  # where mergekit YAML names a model


def pin_names(data: Any, refs: Iterable[str], *, allow_pickle: bool = False) -> Any:
    """A recipe dict (mergekit YAML) with each of `refs` pinned wherever it names a model: what an output's
    `evomerge_recipe.yaml` records so that it rebuilds the same tensors anywhere, later."""
    pinned = {r: pin(r, allow_pickle=allow_pickle) for r in refs}

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: pinned.get(v, v) if k in MODEL_KEYS and isinstance(v, str) else walk(v)
                    for k, v in node.items()}  # fmt: skip
        return [walk(v) for v in node] if isinstance(node, list) else node

    return walk(data)


def display_name(ref: str) -> str:
    """A short name for tables: the directory name of a local model, `name@<7 hex>` of a pinned hub model."""
    names = []
    for part in parts(ref):
        hub = parse_hub(part)
        if hub is None:
            names.append(Path(part.rstrip("/")).name or part)
        else:
            rev = hub.revision[:7] if hub.revision and COMMIT.match(hub.revision) else hub.revision
            names.append(hub.repo_id.split("/")[1] + (f"@{rev}" if rev else ""))
    return "+".join(names)


def hub_id(ref: str) -> str:
    """What the Hub's `base_model` field takes: `org/name` of a hub model (the model of `model+adapter`), the
    reference itself otherwise."""
    model = parts(ref)[0]
    hub = parse_hub(model)
    return hub.repo_id if hub is not None else model


def _snapshot(hub: HubRef, *, allow_pickle: bool) -> Path:
    """Snapshot directory of a hub reference; every failure is one CheckpointError naming the reference."""
    import huggingface_hub
    from huggingface_hub import errors

    def fetch(patterns: list[str]) -> Path:
        return Path(huggingface_hub.snapshot_download(
            hub.repo_id, revision=hub.revision, cache_dir=str(hub_cache()), allow_patterns=patterns,
            ignore_patterns=SKIPPED_FILES, local_files_only=offline(),
        ))  # fmt: skip

    try:
        path = fetch(NEEDED_FILES)
        if allow_pickle and not any(path.glob("*.safetensors")):  # pickles only where there is nothing else
            path = fetch(NEEDED_FILES + PICKLED_FILES)
    except errors.IncompleteSnapshotError as e:  # cached, but without some files a merge needs
        raise CheckpointError(
            f"{hub}: the cached snapshot lacks files a merge needs ({str(e).splitlines()[0]}); fetch them "
            f"(`hf download {hub.repo_id}`{f' --revision {hub.revision}' if hub.revision else ''}) or go online"
        ) from None
    except errors.LocalEntryNotFoundError as e:  # offline, or the hub unreachable, and not cached
        raise CheckpointError(_not_cached(hub, e)) from None
    except errors.GatedRepoError:
        raise CheckpointError(
            f"{hub}: gated repository; accept its terms on huggingface.co and log in (`hf auth login`) or set HF_TOKEN"
        ) from None
    except errors.RevisionNotFoundError:
        raise CheckpointError(f"{hub}: revision {hub.revision!r} not found on the hub") from None
    except errors.RepositoryNotFoundError:
        raise CheckpointError(
            f"{hub}: no local directory of that name and no such model on the hub (a private one needs HF_TOKEN "
            "or `hf auth login`)"
        ) from None
    except (errors.HfHubHTTPError, OSError, ValueError) as e:
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(
            f"{hub}: cannot fetch from the hub ({type(e).__name__}: {first_line})"
        ) from None
    _check_weights(hub, path, allow_pickle)
    return path


def _not_cached(hub: HubRef, error: Exception) -> str:
    """Why a lookup from the cache failed: the repo is not cached at all, or not at that revision."""
    cache = hub_cache()
    repo = cache / f"models--{hub.repo_id.replace('/', '--')}"
    why = "HF_HUB_OFFLINE is set" if offline() else f"the hub is unreachable ({type(error).__name__})"
    if not repo.is_dir():
        return (f"{hub}: no local directory of that name, not in the hub cache {cache}, and {why}; fetch it first "
                f"(`hf download {hub.repo_id}`) or fix the path")  # fmt: skip
    cached = [p.name for p in sorted((repo / "refs").glob("*"))] + [
        p.name[:7] for p in sorted((repo / "snapshots").glob("*"))
    ]
    rev = hub.revision or "main"
    return (
        f"{hub}: revision {rev!r} not in the hub cache {cache} (cached: {', '.join(cached) or 'nothing'}) and "
        f"{why}; fetch it (`hf download {hub.repo_id} --revision {rev}`) or name a cached revision"
    )


def _check_weights(hub: HubRef, path: Path, allow_pickle: bool) -> None:
    """A snapshot must hold safetensors weights (a model's or an adapter's); pickled ones only when allowed."""
    names = [p.name for p in path.iterdir()]
    if any(n.endswith(".safetensors") for n in names):
        return
    if allow_pickle and any(n.endswith((".bin", ".pt", ".pth")) for n in names):
        return
    fix = (
        ""
        if allow_pickle
        else "; pass --allow-pickle to fetch its pickled weights (loaded with weights_only=True)"
    )
    raise CheckpointError(f"{hub}: the repository has no safetensors weights{fix}")
