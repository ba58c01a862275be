"""How evomerge names things in MLflow: the tags that find a run again, keys MLflow accepts, values as
strings, and a recipe or config flattened into readable params."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from evomerge.merge.recipe import Recipe
from evomerge.references import display_name

RUN_DIR_TAG = "evomerge.run_dir"
CANDIDATE_TAG = "evomerge.candidate"
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
FRONT_MARK = " ★"


_BAD_KEY_CHARS = re.compile(r"[^/\w.\- ]")


def mlflow_key(name: str) -> str:
    """An MLflow param/metric/tag key for `name`: alphanumerics, _ - . space and single inner slashes."""
    key = _BAD_KEY_CHARS.sub("_", str(name).replace("*", "all"))
    parts = [p for p in key.split("/") if p not in ("", ".", "..")]
    return "/".join(parts)[:250] or "_"


def mlflow_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (int, str)):
        return str(value)[:6000]
    return json.dumps(value, separators=(",", ":"), default=str)[:6000]


def _layers(layer_range: Sequence[int]) -> str:
    a, b = int(layer_range[0]), int(layer_range[1])
    return f"layers{a}-{b - 1}" if b - a > 1 else f"layers{a}"


def _flatten_model_space(d: dict[str, Any]) -> dict[str, str]:
    """A model-space recipe as a few params: a mixture's size-weighted mean coefficient per model and its
    segment count (the exact coefficients are in the journal); an offspring's crossover settings."""
    if d["kind"] == "offspring":
        out = {f"parent{i}": display_name(p) for i, p in enumerate(d["parents"])}
        out.update({k: mlflow_value(d[k]) for k in ("weight", "split", "noise_std") if d.get(k) is not None})
        return out
    starts = np.asarray(d["starts"], dtype=np.float64)
    lengths = np.diff(np.append(starts, d["size"]))
    means = lengths @ np.asarray(d["coefficients"], dtype=np.float64) / d["size"]
    out = {
        f"{mlflow_key(display_name(m))}.weight_mean": mlflow_value(float(v))
        for m, v in zip(d["models"], means)
    }
    out["segments"] = str(len(starts))
    return out


def flatten_recipe(recipe: Recipe | dict[str, Any]) -> dict[str, str]:
    """The recipe as MLflow params with readable names: models by directory name, layer ranges inclusive.

    `models:` recipes give `<model>.<param>`; `slices:` recipes `slices.<i>.layers<a>-<b>.<model>.<param>`
    (slice-level: `slices.<i>.layers<a>-<b>.<param>`); recipe-level parameters keep their bare name. A
    filtered setting adds the filter (`expert.weight.mlp`, `expert.weight.all` for the default); a gradient
    list is one JSON value."""
    d = dict(recipe) if isinstance(recipe, dict) else recipe.to_dict()
    if d.get("kind") in ("mixture", "offspring"):
        return _flatten_model_space(d)
    refs = [d.get("base_model")] if d.get("base_model") else []
    refs += [m["model"] for m in d.get("models") or []]
    refs += [src["model"] for s in d.get("slices") or [] for src in s["sources"]]
    refs = list(dict.fromkeys(refs))
    short = [display_name(r) for r in refs]
    labels = {
        r: (f"{lab}_{i}" if short.count(lab) > 1 else lab) for i, (r, lab) in enumerate(zip(refs, short))
    }
    out: dict[str, str] = {}

    def put(name: str, value: Any) -> None:
        key = mlflow_key(name)
        while key in out:
            key += "_"
        out[key] = mlflow_value(value)

    def settings(prefix: str, params: dict[str, Any] | None) -> None:
        for name, setting in (params or {}).items():
            conds = [setting] if isinstance(setting, dict) else setting
            if isinstance(conds, list) and conds and all(isinstance(c, dict) for c in conds):
                for c in conds:
                    put(f"{prefix}{name}.{c.get('filter') or 'all'}", c.get("value"))
            else:
                put(f"{prefix}{name}", setting)

    put("merge_method", d["merge_method"])
    if d.get("base_model"):
        put("base_model", labels[d["base_model"]])
    for k in ("dtype", "out_dtype", "tokenizer_source", "random_seed"):
        if d.get(k) is not None:
            put(k, d[k])
    settings("", d.get("parameters"))
    for m in d.get("models") or []:
        settings(f"{labels[m['model']]}.", m.get("parameters"))
    for i, s in enumerate(d.get("slices") or []):
        settings(f"slices.{i}.{_layers(s['sources'][0]['layer_range'])}.", s.get("parameters"))
        for src in s["sources"]:
            settings(
                f"slices.{i}.{_layers(src['layer_range'])}.{labels[src['model']]}.", src.get("parameters")
            )
    return out


def flatten_config(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> dotted keys; lists of mappings by index, lists of scalars as one JSON value."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten_config(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(data, list) and any(isinstance(v, dict) for v in data):
        for i, v in enumerate(data):
            out.update(flatten_config(v, f"{prefix}.{i}"))
    elif data is not None:
        out[mlflow_key(prefix)] = mlflow_value(data)
    return out
