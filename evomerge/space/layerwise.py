"""LayerwiseSpace: the mergekit-evolve / Sakana PS genome (ALGORITHMS.md 4.1, 4.2 PS).

The decoder layers are split into G contiguous groups of s = num_layers / G layers. For each group, each
genome model and each tensor-name filter (plus a default set), one gene per searched per-source parameter
of the method; then one gene per searched global parameter (e.g. lambda) per group and filter. Genes are
laid out group-major, row-major over (model, filter, param) as mergekit-evolve's (G, M, F+1, P) tensor,
followed by the group's (F+1, globals) genes:

    dim = G * M * (F+1) * P + G * (F+1) * P_global

Which parameters are searched and over which range comes from `METHODS` (`Param.search`); parameters
that are not searched take the method default or a value from `fixed` (the recipe's top-level
`parameters`). `decode` emits one slice per group (`layer_range` [g*s, (g+1)*s) of every source, the base
listed last and named `base_model` for methods that take one apart); `encode` reads a recipe of that shape
(or a `models:` recipe, or per-slice/gradient values: each group takes the value at its centre) back.

Owns the genome <-> recipe mapping only. Driver side: no tensors; `METHODS` (a torch module) is imported
when a space is built, not when this module is imported.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

import numpy as np

from evomerge.errors import ConfigError
from evomerge.merge.recipe import Conditional, Parameters, Recipe, Setting, Slice, SliceSource, resolve
from evomerge.references import display_name
from evomerge.space.base import Space

if TYPE_CHECKING:
    from evomerge.merge.methods import Method, Param

log = logging.getLogger(__name__)

DEFAULT_FILTER = "*"
"""Name segment of the default parameter set (the one for tensors no filter matches) when filters are used."""


# ------------------------------------------------------------------------------------------ helpers


def source_labels(
    sources: Sequence[str | PurePath] | Mapping[str, str | PurePath],
) -> tuple[list[str], list[str]]:
    """(labels, refs) of the sources. A mapping gives labels explicitly; otherwise a label is the directory
    name, made unique with `#i` (the source's position) where two sources share one."""
    if isinstance(sources, Mapping):
        labels, refs = [str(k) for k in sources], [str(v) for v in sources.values()]
    elif isinstance(sources, (str, PurePath)):
        raise ConfigError(f"sources must be a list of model paths (got the single path {str(sources)!r})")
    else:
        refs = [str(s) for s in sources]
        labels = [display_name(r) for r in refs]
        labels = [f"{lab}#{i}" if labels.count(lab) > 1 else lab for i, lab in enumerate(labels)]
    if not refs:
        raise ConfigError("sources: at least one model is needed")
    for ref in refs:
        if refs.count(ref) > 1:
            raise ConfigError(f"sources: {ref} is listed twice")
    for lab in labels:
        if not lab or "/" in lab:
            raise ConfigError(f"sources: label {lab!r} must be non-empty and contain no '/'")
    return labels, refs


def check_genome(x: Any, names: Sequence[str]) -> np.ndarray:
    """x as a float64 vector of len(names); a wrong shape or a NaN/Inf gene is a ConfigError naming it."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.shape != (len(names),):
        raise ConfigError(f"genome has shape {arr.shape}; this space expects ({len(names)},)")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        i = int(bad[0])
        raise ConfigError(f"genome gene {i} ({names[i]}) is {arr[i]}; genes must be finite")
    return arr


def clip_encoded(x: np.ndarray, lower: np.ndarray, upper: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """Clip an encoded recipe into the box, logging which genes were outside it."""
    out = np.clip(x, lower, upper)
    moved = np.flatnonzero(out != x)
    if moved.size:
        log.warning(
            "recipe values outside the search box were clipped: %s",
            ", ".join(f"{names[i]} {x[i]:g} -> {out[i]:g}" for i in moved),
        )
    return out


def scope_number(value: Any, where: str) -> float:
    """A resolved recipe value as a finite float (bools and non-numbers are a ConfigError)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a number (got {value!r})") from None
    if not math.isfinite(out):
        raise ConfigError(f"{where}: expected a finite number (got {value!r})")
    return out


@dataclass(frozen=True)
class _Gene:
    group: int
    model: int | None  # index into the genome models; None for a global parameter
    filter: int  # index into filters; len(filters) = the default set
    param: str


# -------------------------------------------------------------------------------------------- space


class LayerwiseSpace(Space):
    """Per layer group, per model, per filter: the method's searched parameters (mergekit-evolve genome).

    method: a METHODS name (or a `Method`); base: the base model (required for task-vector methods,
    optional for nuslerp/multislerp; for methods that take every model as an input, such as linear, a
    given base becomes one more genome model); sources: model paths, or {label: path} to choose the gene
    labels; num_layers: decoder layers of the models; layer_groups: G (must divide num_layers); params:
    restrict the searched parameters (per-source and global) to these names (default: every parameter
    with a search range, e.g. `("weight", "density")` drops dare_ties' lambda as mergekit-evolve does);
    filters: tensor-name filters, each with its own parameter set besides the default one; fixed:
    parameters written to the recipe's top-level `parameters` (e.g. {"normalize": True}; a per-source one
    such as {"weight": 1.0} applies to every model).
    """

    def __init__(
        self,
        method: str | Method,
        base: str | PurePath | None,
        sources: Sequence[str | PurePath] | Mapping[str, str | PurePath],
        num_layers: int,
        layer_groups: int = 1,
        params: Iterable[str] | None = None,
        filters: Iterable[str] = (),
        fixed: Mapping[str, Any] | None = None,
    ) -> None:
        from evomerge.merge.methods import METHODS

        self.method: Method = METHODS.get(method) if isinstance(method, str) else method
        m = self.method
        labels, refs = source_labels(sources)
        self.base = None if base is None else str(base)
        if self.base is not None and self.base in refs:
            raise ConfigError(f"base {self.base} is also listed among the sources; give it only as base")
        if m.base == "required" and self.base is None:
            raise ConfigError(f"method {m.name!r} needs a base model")
        self.base_apart = self.base is not None and m.base != "input"
        """The base is passed to the method apart from the genome models (and carries no genes)."""
        if self.base is not None and not self.base_apart:
            labels, refs = [*labels, display_name(self.base)], [*refs, self.base]
            if labels.count(labels[-1]) > 1:
                labels[-1] = f"{labels[-1]}#base"
        self.labels, self.models = tuple(labels), tuple(refs)
        n = len(self.models)
        if n < m.min_sources or (m.max_sources is not None and n > m.max_sources):
            want = (
                f"exactly {m.min_sources}"
                if m.max_sources == m.min_sources
                else f"at least {m.min_sources}" + (f" and at most {m.max_sources}" if m.max_sources else "")
            )
            what = "non-base models" if self.base_apart else "models"
            raise ConfigError(f"method {m.name!r} takes {want} {what} (got {n})")

        if isinstance(num_layers, bool) or not isinstance(num_layers, (int, np.integer)) or num_layers < 1:
            raise ConfigError(f"num_layers must be a positive integer (got {num_layers!r})")
        if (
            isinstance(layer_groups, bool)
            or not isinstance(layer_groups, (int, np.integer))
            or layer_groups < 1
        ):
            raise ConfigError(f"layer_groups must be a positive integer (got {layer_groups!r})")
        if num_layers % layer_groups:
            raise ConfigError(
                f"layer_groups {layer_groups} does not divide num_layers {num_layers}; "
                f"use a divisor of {num_layers}"
            )
        self.num_layers, self.layer_groups = int(num_layers), int(layer_groups)
        self.group_size = self.num_layers // self.layer_groups

        searchable = [p for p in m.params if p.search is not None]
        if not searchable:
            raise ConfigError(
                f"method {m.name!r} has no searchable parameters; LayerwiseSpace cannot search it"
            )
        if params is None:
            chosen = searchable
        else:
            wanted = [params] if isinstance(params, str) else list(params)
            for name in wanted:
                try:
                    p = m.param(name)
                except KeyError:
                    raise ConfigError(
                        f"method {m.name!r} has no parameter {name!r} "
                        f"(searchable: {', '.join(p.name for p in searchable)})"
                    ) from None
                if p.search is None:
                    raise ConfigError(
                        f"parameter {name!r} of method {m.name!r} has no search range; set it with fixed= "
                        f"(searchable: {', '.join(p.name for p in searchable)})"
                    )
            chosen = [p for p in searchable if p.name in wanted]
            if not chosen:
                raise ConfigError(f"params: no parameter of method {m.name!r} to search (got an empty list)")
        self.per_source: tuple[Param, ...] = tuple(p for p in chosen if p.per_source)
        self.globals: tuple[Param, ...] = tuple(p for p in chosen if not p.per_source)

        self.filters = tuple(filters) if not isinstance(filters, str) else (filters,)
        for f in self.filters:
            if not isinstance(f, str) or not f or f == DEFAULT_FILTER or "/" in f:
                raise ConfigError(
                    f"filters: {f!r} must be a non-empty tensor-name substring without '/' or '*'"
                )
        if len(set(self.filters)) != len(self.filters):
            raise ConfigError(f"filters: {list(self.filters)} lists a filter twice")

        self.fixed: dict[str, Any] = dict(fixed or {})
        for key, value in self.fixed.items():
            try:
                p = m.param(key)
            except KeyError:
                raise ConfigError(
                    f"fixed: method {m.name!r} has no parameter {key!r} "
                    f"(its parameters: {', '.join(p.name for p in m.params)})"
                ) from None
            if key in {c.name for c in chosen}:
                raise ConfigError(f"fixed: parameter {key!r} is searched; drop it from fixed or from params")
            p.validate(value, f"fixed.{key}")
        searched = {c.name for c in chosen}
        for p in m.params:
            if p.required and p.name not in searched and p.name not in self.fixed:
                raise ConfigError(
                    f"parameter {p.name!r} of method {m.name!r} is required; search it (params=) or set it in fixed="
                )

        genes: list[_Gene] = []
        for g in range(self.layer_groups):
            for mi in range(n):
                for fi in range(len(self.filters) + 1):
                    genes.extend(_Gene(g, mi, fi, p.name) for p in self.per_source)
            for fi in range(len(self.filters) + 1):
                genes.extend(_Gene(g, None, fi, p.name) for p in self.globals)
        self._genes = tuple(genes)
        self._index = {gene: i for i, gene in enumerate(genes)}
        self.names = tuple(self._name(gene) for gene in genes)
        assert len(set(self.names)) == len(self.names), "gene names must be unique"
        bounds = {p.name: p.search for p in chosen}
        self.lower = np.array([bounds[gene.param][0] for gene in genes], dtype=np.float64)
        self.upper = np.array([bounds[gene.param][1] for gene in genes], dtype=np.float64)

    # ----------------------------------------------------------------------------------- naming

    def group_range(self, g: int) -> tuple[int, int]:
        """The [start, end) decoder layers of group g."""
        return g * self.group_size, (g + 1) * self.group_size

    def _name(self, gene: _Gene) -> str:
        a, b = self.group_range(gene.group)
        parts = [f"layers.{a}-{b - 1}" if b - a > 1 else f"layers.{a}"]
        if self.filters:
            parts.append(self.filters[gene.filter] if gene.filter < len(self.filters) else DEFAULT_FILTER)
        parts.append(gene.param)
        if gene.model is not None:
            parts.append(self.labels[gene.model])
        return "/".join(parts)

    def initial(self) -> np.ndarray:
        """mergekit-evolve's x0: weight = 1/M, other parameters at their method default (box centre when
        they have none), clipped into the box."""
        from evomerge.merge.methods import REQUIRED

        defaults = {p.name: p.default for p in (*self.per_source, *self.globals)}
        x = (self.lower + self.upper) / 2
        for i, gene in enumerate(self._genes):
            if gene.param == "weight":
                x[i] = 1 / len(self.models)
            elif defaults[gene.param] is not REQUIRED and defaults[gene.param] is not None:
                x[i] = float(defaults[gene.param])
        return self.clip(x)

    # ----------------------------------------------------------------------------------- decode

    def _setting(self, x: np.ndarray, g: int, mi: int | None, name: str) -> Setting:
        if not self.filters:
            return float(x[self._index[_Gene(g, mi, 0, name)]])
        conds = [
            Conditional(filter=f, value=float(x[self._index[_Gene(g, mi, fi, name)]]))
            for fi, f in enumerate(self.filters)
        ]
        default = float(x[self._index[_Gene(g, mi, len(self.filters), name)]])
        return [*conds, Conditional(value=default)]

    def decode(self, x: np.ndarray) -> Recipe:
        x = self.clip(check_genome(x, self.names))
        slices = []
        for g in range(self.layer_groups):
            layer_range = self.group_range(g)
            sources = [
                SliceSource(
                    model=ref,
                    layer_range=layer_range,
                    parameters={p.name: self._setting(x, g, mi, p.name) for p in self.per_source} or None,
                )
                for mi, ref in enumerate(self.models)
            ]
            if self.base_apart:
                sources.append(SliceSource(model=self.base, layer_range=layer_range))
            shared = {p.name: self._setting(x, g, None, p.name) for p in self.globals} or None
            slices.append(
                Slice(sources=sources, base_model=self.base if self.base_apart else None, parameters=shared)
            )
        return Recipe(
            merge_method=self.method.name,
            base_model=self.base,
            slices=slices,
            parameters=dict(self.fixed) or None,
        )

    # ----------------------------------------------------------------------------------- encode

    def _recipe_slices(self, recipe: Recipe) -> list[Slice]:
        """The recipe as slices; a `models:` recipe is one slice over all layers (the base appended)."""
        if recipe.slices is not None:
            return recipe.slices
        whole = (0, self.num_layers)
        sources = [
            SliceSource(model=m.model, layer_range=whole, parameters=m.parameters)
            for m in recipe.models or []
        ]
        if recipe.base_model and recipe.base_model not in {s.model for s in sources}:
            sources.append(SliceSource(model=recipe.base_model, layer_range=whole))
        return [Slice(sources=sources)]

    def encode(self, recipe: Recipe) -> np.ndarray:
        """The genome of a recipe over the same models and layers; each group takes the recipe's value at
        the group's centre layer (filter genes: the value for a tensor named like the filter; default genes:
        the value for a tensor no filter matches). Values outside the box are clipped (logged)."""
        m = self.method
        if recipe.merge_method != m.name:
            raise ConfigError(f"recipe uses method {recipe.merge_method!r}; this space is for {m.name!r}")
        slices = self._recipe_slices(recipe)
        expected = set(self.models) | ({self.base} if self.base else set())
        offsets, offset = [], 0
        for si, s in enumerate(slices):
            where = f"slices[{si}]" if recipe.slices is not None else "models"
            length = s.sources[0].layer_range[1] - s.sources[0].layer_range[0]
            for src in s.sources:
                if tuple(src.layer_range) != (offset, offset + length):
                    raise ConfigError(
                        f"{where}: {src.model} takes layers {list(src.layer_range)} into output layers "
                        f"[{offset}, {offset + length}); a layerwise genome keeps every layer in place"
                    )
            refs = {src.model for src in s.sources}
            if refs != expected:
                missing, extra = sorted(expected - refs), sorted(refs - expected)
                raise ConfigError(
                    f"{where}: models differ from the space's"
                    + (f"; missing {', '.join(missing)}" if missing else "")
                    + (f"; not in the space {', '.join(extra)}" if extra else "")
                )
            base = s.base_model or recipe.base_model
            if self.base_apart and base != self.base:
                raise ConfigError(f"{where}: base_model is {base}; this space's base is {self.base}")
            offsets.append(offset)
            offset += length
        if offset != self.num_layers:
            raise ConfigError(f"recipe has {offset} layers; this space has num_layers {self.num_layers}")

        x = np.empty(len(self._genes), dtype=np.float64)
        params = {p.name: p for p in (*self.per_source, *self.globals)}
        for i, gene in enumerate(self._genes):
            a, b = self.group_range(gene.group)
            centre = (a + b - 1) / 2
            si = max(j for j, off in enumerate(offsets) if off <= int(centre))
            s = slices[si]
            length = s.sources[0].layer_range[1] - s.sources[0].layer_range[0]
            u = min(1.0, (centre - offsets[si]) / (length - 1)) if length > 1 else 1.0
            probe = self.filters[gene.filter] if gene.filter < len(self.filters) else ""
            scopes: list[Parameters | None] = [s.parameters, recipe.parameters]
            if gene.model is not None:
                src = next(src for src in s.sources if src.model == self.models[gene.model])
                scopes.insert(0, src.parameters)
            value = resolve(scopes, gene.param, probe, u)
            p = params[gene.param]
            if value is None:
                if p.required or p.default is None:
                    raise ConfigError(f"recipe gives no {gene.param!r} for gene {self.names[i]}")
                value = p.default
            x[i] = scope_number(value, f"gene {self.names[i]}")
        return clip_encoded(x, self.lower, self.upper, self.names)

    def __repr__(self) -> str:
        return (
            f"LayerwiseSpace({self.method.name}, models={list(self.labels)}, groups={self.layer_groups}"
            f"x{self.group_size} layers, params={[p.name for p in (*self.per_source, *self.globals)]}, "
            f"filters={list(self.filters)}, dim={self.dim})"
        )
