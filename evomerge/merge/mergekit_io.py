"""mergekit YAML <-> Recipe. Unknown keys and methods are errors that name the key, never ignored.

Reading then writing a mergekit config gives the same mapping back (values are kept as written).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from evomerge.errors import ConfigError
from evomerge.merge.methods import METHODS
from evomerge.merge.recipe import Recipe

_UNSUPPORTED = {
    "modules": "per-module configs (multimodal models) are not supported; use 'models' or 'slices'",
}


def _field_path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif not (p[:1].isupper() or p in ("bool", "int", "float", "str", "list[...]") or "[" in p):
            parts.append(f".{p}" if parts else p)
    return "".join(parts) or "<top>"


def validation_message(err: ValidationError, where: str) -> str:
    """One line naming the file, the field path and the reason of the most specific error."""
    first = min(err.errors(), key=lambda e: (e["type"] != "extra_forbidden", -len(e["loc"])))
    field = _field_path(first["loc"])
    if first["type"] == "extra_forbidden":
        return f"{where}: unknown key '{field}'"
    msg = first["msg"].removeprefix("Value error, ")
    return f"{where}: {field}: {msg}"


def recipe_from_dict(data: Any, where: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level (got {type(data).__name__})")
    for key, why in _UNSUPPORTED.items():
        if key in data:
            raise ConfigError(f"{where}: '{key}': {why}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise ConfigError(validation_message(e, where)) from None
    METHODS.get(recipe.merge_method)  # unknown method: error with suggestions
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """Read a mergekit (or evomerge) merge YAML."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{at}: {getattr(e, 'problem', e)}") from None
    return recipe_from_dict(data, str(path))


class _FlowListDumper(yaml.SafeDumper):
    """Numbers lists in flow style ([0, 0.5, 1]) as mergekit writes them."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_FlowListDumper.add_representer(list, _represent_list)
_FlowListDumper.add_representer(tuple, _represent_list)


def recipe_to_mergekit_dict(recipe: Recipe) -> dict[str, Any]:
    """The mergekit config mapping (evomerge-only keys removed)."""
    if not METHODS.get(recipe.merge_method).in_mergekit:
        raise ConfigError(f"method {recipe.merge_method!r} is not available in mergekit")
    data = recipe.to_dict()
    data.pop("random_seed", None)
    return data


def dump_mergekit_yaml(recipe: Recipe) -> str:
    text = yaml.dump(recipe_to_mergekit_dict(recipe), Dumper=_FlowListDumper, sort_keys=False)
    if recipe.random_seed is not None and METHODS.get(recipe.merge_method).random:
        text = (
            f"# evomerge seeds the random masks per tensor from random_seed {recipe.random_seed};\n"
            "# mergekit draws its own masks (same keep-rates, different entries).\n" + text
        )
    return text


def dump_recipe_yaml(recipe: Recipe) -> str:
    """evomerge's own YAML (mergekit's keys plus random_seed); works for every method."""
    return yaml.dump(recipe.to_dict(), Dumper=_FlowListDumper, sort_keys=False)
