"""Apply a Recipe: streamed to an output directory, or in place into a resident model.

One planner serves both. `plan()` turns a Recipe and the sources' metadata into a list of `TensorJob`s
(output name, input tensors, resolved parameters) without reading tensor data, so a bad recipe fails
before anything is computed or written. `merge_tensor()` runs one job in fp32 on the inputs' device.

- `merge_to_dir()` streams jobs to sharded safetensors: each shard's header is written first (the plan
  knows every output shape and dtype), then tensors one by one, so memory holds one job's inputs at a time.
  Everything goes to a temp dir beside the target, renamed at the end; a failure leaves nothing behind.
- `ResidentPool` + `apply_in_place()` is what a search worker does per candidate: sources stay loaded on
  the device and the target model's parameters are overwritten with `copy_`, no new model is allocated.

Layer structure follows mergekit: `models:` is one slice over all layers of every model (the base added
when not listed); tensors outside decoder layers use position u = 0 and the first (embeddings) or last
(norm, head) slice's sources.

The output's tensors are the union over the models each part reads (a slice's sources at their layers, the
first/last slice's sources outside layers), never one listed model's names: which model comes first must
not change what is written. A source layer must also hold what any of the recipe's models holds at the same
layer index (as mergekit's architecture templates require), so a one-source slice cannot drop a tensor
either. A tensor that a model lacks is refused, naming the model and the tensor.
The one exception is mergekit's `tied_names`: a tied model (tie_word_embeddings, no LM head) gives its
input embedding as its head.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evomerge.checkpoints import (
    VOCAB_TENSOR,
    Source,
    check_architectures,
    common_vocab_rows,
    open_source,
)
from evomerge.errors import CheckpointError, ConfigError, EvomergeError, MergeError, ShapeMismatchError
from evomerge.merge.methods import METHODS, Method
from evomerge.merge.recipe import Recipe, Slice, SliceSource, resolve
from evomerge.merge.shards import TOKENIZER_FILES, TensorSpec, copy_files, write_weights
from evomerge.merge.tokenizer import (
    OutputVocab,
    VocabRows,
    build_output_vocab,
    permute,
    row_map,
    save_tokenizer,
    tokenizer_spec,
)
from evomerge.references import locate, pin_names

LAYER = re.compile(r"^(?P<prefix>.*?\b(?:layers|h|blocks|layer))\.(?P<idx>\d+)\.(?P<rest>.+)$")
PRE_LAYER = re.compile(r"embed|wte|wpe|word_embeddings")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # fmt: skip


def parse_dtype(name: str | None, where: str = "dtype") -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ConfigError(f"{where}: unknown dtype {name!r} (use one of {', '.join(DTYPES)})")
    return DTYPES[name]


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: where its inputs come from and the method's resolved parameters."""

    name: str
    inputs: tuple[tuple[str, str], ...]  # (model ref, tensor name), all inputs in order
    base_index: int | None  # position of the base among inputs
    method: str
    params: dict[str, Any] = field(hash=False)
    per_source: dict[str, tuple[Any, ...]] = field(hash=False)  # aligned with the method's `tensors`
    shape: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32  # output dtype
    vocab_rows: int | None = None  # truncate the vocabulary axis to this many rows
    seed: int = 0
    vocab: VocabRows | None = field(default=None, hash=False, compare=False)  # rows in the output vocabulary


@dataclass
class Plan:
    jobs: list[TensorJob]
    config: dict[str, Any]  # output config.json
    tokenizer_source: str | None  # the model whose tokenizer files are copied (None: `vocab` writes its own)
    vocab: OutputVocab | None = None  # the output vocabulary of `tokenizer_source:` / `tokenizer:`


def _pylist_key(name: str) -> str:
    return "lambda_" if name == "lambda" else name


def _split_layer(name: str) -> tuple[str, int, str] | None:
    m = LAYER.match(name)
    return (m["prefix"], int(m["idx"]), m["rest"]) if m else None


def _layer_index(src: Source) -> dict[int, list[tuple[str, str]]]:
    """Layer -> (prefix, rest) of its tensors, in checkpoint order: one pass over the names, not one per layer."""
    out: dict[int, list[tuple[str, str]]] = {}
    for name in src.tensors:
        parts = _split_layer(name)
        if parts:
            out.setdefault(parts[1], []).append((parts[0], parts[2]))
    return out


def _union(groups: Iterable[Iterable[Any]]) -> list[Any]:
    """Every item of every group once, in order of first appearance (the anchor's checkpoint order first)."""
    return list(dict.fromkeys(item for group in groups for item in group))


def _outside_names(src: Source, pre: bool) -> list[str]:
    """Tensors outside decoder layers, before them (embeddings) or after (norm, head)."""
    return [n for n in src.tensors if _split_layer(n) is None and bool(PRE_LAYER.search(n)) == pre]


def _is_head(name: str) -> bool:
    """An LM head (lm_head, embed_out, output): a vocabulary tensor outside layers that is not an embedding."""
    return _split_layer(name) is None and not PRE_LAYER.search(name) and bool(VOCAB_TENSOR.search(name))


def _is_tied(src: Source) -> bool:
    """transformers' default is tied; only an explicit `tie_word_embeddings: false` unties."""
    return src.config.get("tie_word_embeddings", True) is not False


def _tied_embedding(src: Source, name: str) -> str | None:
    """The input embedding a tied model gives for LM head `name` it lacks (mergekit's `tied_names`), else None."""
    if not (_is_head(name) and _is_tied(src)):
        return None
    return next((n for n in _outside_names(src, pre=True) if VOCAB_TENSOR.search(n)), None)


def _read_names(refs: list[str], names: list[str], sources: Mapping[str, Source]) -> list[str]:
    """The tensor each source gives for one output tensor: its own, or a tied model's embedding for the head.
    A source without it is refused, whatever its position: dropping the tensor would depend on who is first."""
    out = []
    for ref, name in zip(refs, names):
        read = name if name in sources[ref].tensors else _tied_embedding(sources[ref], name)
        if read is None:
            holder = next((r for r, n in zip(refs, names) if n in sources[r].tensors), None)
            raise ShapeMismatchError(
                f"{ref}: tensor {name} is missing" + (f" (present in {holder})" if holder else "")
            )
        out.append(read)
    return out


def _normalize_slices(recipe: Recipe, sources: Mapping[str, Source]) -> list[Slice]:
    """`models:` -> one slice over all layers of every model (base appended when absent), as mergekit."""
    if recipe.slices is not None:
        return recipe.slices
    refs = [m.model for m in recipe.models or []]
    entries = [(m.model, m.parameters) for m in recipe.models or []]
    if recipe.base_model and recipe.base_model not in refs:
        entries.append((recipe.base_model, None))
    out = []
    for ref, params in entries:
        n = sources[ref].num_layers
        if n is None:
            n = 1 + max((p[1] for p in map(_split_layer, sources[ref].tensors) if p), default=-1)
        out.append(SliceSource(model=ref, layer_range=(0, max(n, 1)), parameters=params))
    return [Slice(sources=out)]


def _check_contract(method: Method, refs: list[str], base: str | None, where: str) -> None:
    if len(set(refs)) != len(refs):
        raise ConfigError(f"{where}: a model is listed twice")
    if base is not None and base not in refs and method.base != "input":
        raise ConfigError(f"{where}: base_model {base} is not among the slice's sources")
    has_base = base is not None and base in refs and method.base != "input"
    if method.base == "required" and not has_base:
        raise ConfigError(f"{where}: method {method.name!r} needs a base_model")
    n = len(refs) - int(has_base)
    if n < method.min_sources or (method.max_sources is not None and n > method.max_sources):
        want = (
            f"exactly {method.min_sources}"
            if method.max_sources == method.min_sources
            else f"at least {method.min_sources}"
            + (f" and at most {method.max_sources}" if method.max_sources else "")
        )
        raise ConfigError(f"{where}: method {method.name!r} takes {want} non-base models (got {n})")


def _job(
    recipe: Recipe,
    method: Method,
    out_name: str,
    slice_: Slice,
    in_names: list[str],
    u: float,
    sources: Mapping[str, Source],
    out_dtype: torch.dtype | None,
    truncate_vocab: bool,
    vocab: OutputVocab | None = None,
) -> TensorJob:
    """Resolve one output tensor's parameters and check its inputs' shapes."""
    refs = [s.model for s in slice_.sources]
    base = slice_.base_model or recipe.base_model
    base_index = refs.index(base) if base in refs else None
    tensor_inputs = [i for i in range(len(refs)) if method.base == "input" or i != base_index]
    read_names = _read_names(refs, in_names, sources)
    infos = [sources[ref].tensors[name] for ref, name in zip(refs, read_names)]
    rows_map = None
    if vocab is not None and _split_layer(out_name) is None and VOCAB_TENSOR.search(out_name):
        rows_map = row_map(vocab, refs, base, [i.shape for i in infos], out_name)
    vocab_rows = None
    if rows_map is None:
        vocab_rows = common_vocab_rows(out_name, dict(zip(refs, (i.shape for i in infos))), truncate_vocab)
    shared_scopes = [slice_.parameters, recipe.parameters]
    params: dict[str, Any] = {}
    per_source: dict[str, tuple[Any, ...]] = {}
    for p in method.params:
        if p.per_source:
            values = []
            for i in tensor_inputs:
                where = f"{refs[i]}: {in_names[i]}"
                v = resolve([slice_.sources[i].parameters, *shared_scopes], p.name, in_names[i], u)
                if v is None and p.required:
                    raise ConfigError(f"missing required parameter {p.name!r} for {where}")
                values.append(p.validate(p.default if v is None else v, where))
            per_source[_pylist_key(p.name)] = tuple(values)
        else:
            v = resolve(shared_scopes, p.name, out_name, u)
            if v is None and p.required:
                raise ConfigError(f"missing required parameter {p.name!r} for {out_name}")
            params[_pylist_key(p.name)] = p.validate(p.default if v is None else v, out_name)
    shape = list(infos[base_index if base_index is not None else 0].shape)
    if vocab_rows is not None or rows_map is not None:
        shape[0] = rows_map.rows if rows_map is not None else vocab_rows
    first = infos[base_index if base_index is not None else 0]
    dtype = out_dtype if (out_dtype is not None and first.dtype.is_floating_point) else first.dtype
    seed_text = f"{recipe.random_seed or 0}:{out_name}"
    seed = int.from_bytes(hashlib.sha256(seed_text.encode()).digest()[:8], "little") & ((1 << 63) - 1)
    return TensorJob(out_name, tuple(zip(refs, read_names)), base_index, method.name, params, per_source,
                     tuple(shape), dtype, vocab_rows, seed, rows_map)  # fmt: skip


def _anchor_first(slice_: Slice, recipe: Recipe) -> list[str]:
    """A slice's sources, its base first: the output keeps the base's checkpoint order."""
    refs = [src.model for src in slice_.sources]
    base = slice_.base_model or recipe.base_model
    return [base, *(r for r in refs if r != base)] if base in refs else refs


def _slice_layer_suffixes(
    slice_: Slice, j: int, layer_index: Mapping[str, dict[int, list[tuple[str, str]]]]
) -> list[tuple[str, str]]:
    """(prefix, rest) of layer j of a slice: the union over its sources, each at its own layer_range[0] + j, and
    over every model of the recipe at those layer indices (a passthrough slice has one source to compare
    with). A source without that layer at all is a layer_range error, named as such."""
    layers = [src.layer_range[0] + j for src in slice_.sources]
    for src, layer in zip(slice_.sources, layers):
        if not layer_index[src.model].get(layer):
            raise ConfigError(f"{src.model}: has no layer {layer} (layer_range {list(src.layer_range)})")
    own = [layer_index[src.model][layer] for src, layer in zip(slice_.sources, layers)]
    return _union([*own, *(index.get(layer, ()) for layer in layers for index in layer_index.values())])


def _untie_for_own_head(config: dict[str, Any], jobs: list[TensorJob], sources: Mapping[str, Source]) -> None:
    """An output head merged from an untied model's own head is not the embedding: loaded tied, transformers
    would drop it, so the config unties (mergekit 0.1.5 keeps the base's flag, and loses the head)."""
    for job in jobs:
        if _is_head(job.name) and any(not _is_tied(sources[ref]) for ref, _ in job.inputs):
            if config.get("tie_word_embeddings", True) is not False:
                config["tie_word_embeddings"] = False
            return


def plan(
    recipe: Recipe,
    sources: Mapping[str, Source],
    *,
    out_dtype: torch.dtype | None = None,
    truncate_vocab: bool = False,
) -> Plan:
    """Every output tensor of the merge, with resolved parameters; reads no tensor data."""
    method = METHODS.get(recipe.merge_method)
    check_architectures(sources)
    out_dtype = out_dtype or parse_dtype(recipe.out_dtype, "out_dtype") or parse_dtype(recipe.dtype)
    slices = _normalize_slices(recipe, sources)
    for i, s in enumerate(slices):
        _check_contract(
            method, [src.model for src in s.sources], s.base_model or recipe.base_model, f"slices[{i}]"
        )
    first_src = sources[slices[0].sources[0].model]
    base_ref = recipe.base_model or slices[0].sources[0].model
    spec = tokenizer_spec(recipe)
    vocab = None
    if spec is not None:
        vocab = build_output_vocab(spec, recipe.referenced_models(), base_ref,
                                   tokenizer_dir=lambda ref: _tokenizer_dir(ref, sources),
                                   vocab_size=lambda ref: sources[ref].config.get("vocab_size"))  # fmt: skip
    jobs: list[TensorJob] = []
    layer_index = {ref: _layer_index(sources[ref]) for ref in recipe.referenced_models() if ref in sources}

    def outside_layers(pre: bool) -> None:
        slice_ = slices[0] if pre else slices[-1]
        for name in _union(_outside_names(sources[ref], pre) for ref in _anchor_first(slice_, recipe)):
            jobs.append(_job(recipe, method, name, slice_, [name] * len(slice_.sources), 0.0, sources,
                             out_dtype, truncate_vocab, vocab))  # fmt: skip

    outside_layers(pre=True)
    out_layer = 0
    for s in slices:
        length = s.sources[0].layer_range[1] - s.sources[0].layer_range[0]
        for j in range(length):
            u = j / (length - 1) if length > 1 else 1.0
            for prefix, rest in _slice_layer_suffixes(s, j, layer_index):
                in_names = [f"{prefix}.{src.layer_range[0] + j}.{rest}" for src in s.sources]
                jobs.append(_job(recipe, method, f"{prefix}.{out_layer}.{rest}", s, in_names, u, sources,
                                 out_dtype, truncate_vocab))  # fmt: skip
            out_layer += 1
    outside_layers(pre=False)

    config = dict(first_src.config)
    config = dict(sources[base_ref].config) if base_ref in sources else config
    if any(_split_layer(n) for n in first_src.tensors):
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if key in config:
                config[key] = out_layer
    truncated = [j.vocab_rows for j in jobs if j.vocab_rows is not None]
    if truncated and "vocab_size" in config:
        config["vocab_size"] = min(truncated)
    if vocab is not None:
        config["vocab_size"] = vocab.rows  # mergekit: the output tokenizer's size, padded
    if out_dtype is not None:
        config["torch_dtype" if "torch_dtype" in config else "dtype"] = str(out_dtype).removeprefix("torch.")
    _untie_for_own_head(config, jobs, sources)
    # the base model's tokenizer (the first model's without a base), or what `tokenizer_source` builds
    return Plan(jobs, config, base_ref if vocab is None else vocab.copy_from, vocab)


def linear_form(job: TensorJob) -> list[float] | None:
    """Coefficients of the job's inputs when its method is a fixed linear combination of them."""
    method = METHODS.get(job.method)
    if method.coefficients is None or job.vocab_rows is not None or job.vocab is not None:
        return None
    return method.coefficients(len(job.inputs), job.base_index, **job.params, **job.per_source)


def combine(
    coefficients: list[float], stacked: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """sum_i c_i * stacked[i] as one matrix-vector product (one pass over the inputs)."""
    c = torch.tensor(coefficients, dtype=stacked.dtype, device=stacked.device)
    flat = stacked.reshape(len(coefficients), -1)
    if out is not None:
        return torch.mv(flat.T, c, out=out.view(-1)).view(stacked.shape[1:])
    return torch.mv(flat.T, c).view(stacked.shape[1:])


FP32_CHUNK = 1 << 22  # elements per pool row cast to fp32 at a time (a K x 16 MiB scratch buffer)


def combine_into(coefficients: list[float], stacked: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """target = sum_i c_i * stacked[i], accumulated in fp32 whatever the dtypes of `stacked` (a bf16/fp16
    pool) and `target`: a low-precision pool is cast chunk by chunk into a small fp32 buffer, never whole."""
    if stacked.dtype == target.dtype and stacked.dtype.itemsize >= 4:
        return combine(coefficients, stacked, out=target)
    acc = torch.float64 if torch.float64 in (stacked.dtype, target.dtype) else torch.float32
    c = torch.tensor(coefficients, dtype=acc, device=stacked.device)
    flat, out = stacked.reshape(len(coefficients), -1), target.view(-1)
    for lo in range(0, flat.shape[1], FP32_CHUNK):
        hi = min(lo + FP32_CHUNK, flat.shape[1])
        out[lo:hi].copy_(torch.mv(flat[:, lo:hi].to(acc).T, c))
    return target


def merge_tensor(job: TensorJob, read: Callable[[str, str], torch.Tensor],
                 read_into: Callable[[str, str, torch.Tensor], None] | None = None,
                 scratch: StackBuffer | None = None) -> torch.Tensor:  # fmt: skip
    """Compute one output tensor in fp32 and cast it to the job's dtype; NaN/Inf is an error. `read_into(ref,
    name, out)`, when given, fills an input's slot of the fp32 stack directly (no buffer of its own). With
    `scratch`, the stack lives in its buffer: the result must then be used before the next call."""
    method = METHODS.get(job.method)
    rows = slice(None, job.vocab_rows)
    if job.vocab is not None:  # each input in the output vocabulary's order (fp32, as the method runs)
        permuted = permute(job.vocab, [read(*ref_name).float() for ref_name in job.inputs])
        fetch: Callable[[int], torch.Tensor] = permuted.__getitem__
    else:
        fetch = lambda i: read(*job.inputs[i])[rows]  # noqa: E731
    anchor_at = job.base_index if job.base_index is not None else 0
    anchor = fetch(anchor_at)
    if not anchor.is_floating_point():
        return anchor.clone()
    coefficients = linear_form(job)
    separate_base = job.base_index is not None and method.base != "input" and coefficients is None
    order = [i for i in range(len(job.inputs)) if not (separate_base and i == job.base_index)]
    # One fp32 buffer for the method's inputs: each source is read and cast straight into its slot.
    shape = (len(order), *anchor.shape)
    stacked = (
        scratch(shape, anchor.device)
        if scratch
        else torch.empty(shape, dtype=torch.float32, device=anchor.device)
    )
    direct = read_into is not None and job.vocab is None and job.vocab_rows is None
    for slot, i in enumerate(order):
        if i == anchor_at:
            stacked[slot].copy_(anchor)
        elif direct:
            read_into(*job.inputs[i], stacked[slot])
        else:
            stacked[slot].copy_(fetch(i))
    if coefficients is not None:
        out = combine(coefficients, stacked)
    else:
        base = anchor.float() if separate_base else None
        gen = torch.Generator(device=anchor.device).manual_seed(job.seed) if method.random else None
        try:
            out = method.fn(base, stacked, gen=gen, **job.params, **job.per_source)
        except MergeError as e:
            raise MergeError(f"{job.name}: {e}") from None
    _check_finite(job, out)
    return out.to(job.dtype)


SMALL_STACK = 1 << 20
"""Stacks below this many elements come from malloc's heap as they are: there are no page faults to save."""


class StackBuffer:
    """One fp32 buffer that the input stacks of consecutive tensors are carved from in turn.

    Why: a fresh stack per tensor is a fresh mmap whose pages fault in one 4 KiB page at a time (above 32 MiB
    glibc maps and unmaps each allocation); that was ~1/3 of a fp32 linear merge's time in process. A stack
    reuses the buffer while the buffer is at most twice its size, else the buffer is replaced by one of its
    size, so what stays allocated between tensors is never more than twice what the next tensor needs."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def __call__(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        n = math.prod(shape)
        if n < SMALL_STACK:
            return torch.empty(shape, dtype=torch.float32, device=device)
        if self.buffer is None or not n <= self.buffer.numel() <= 2 * n or self.buffer.device != device:
            self.buffer = None  # freed before the larger one is allocated
            self.buffer = torch.empty(n, dtype=torch.float32, device=device)
        return self.buffer[:n].view(shape)


def _check_finite(job: TensorJob, out: torch.Tensor) -> None:
    # NaN/Inf anywhere makes the sum non-finite (one cheap pass); a finite tensor whose fp32 sum overflows
    # is told apart by the exact check, which only runs then.
    if not torch.isfinite(out.sum()) and not bool(torch.isfinite(out).all()):
        raise MergeError(
            f"{job.name}: method {job.method} produced NaN or Inf (check the sources and parameters)"
        )


def open_recipe_sources(recipe: Recipe, *, allow_pickle: bool = False) -> dict[str, Source]:
    """Open every model the recipe references (lazily: headers only)."""
    return {
        ref: open_source(ref, base=recipe.base_model, allow_pickle=allow_pickle)
        for ref in recipe.referenced_models()
    }


# ------------------------------------------------------------------------------------- streaming


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _tokenizer_dir(ref: str, sources: Mapping[str, Source]) -> Path:
    src = sources.get(ref)
    if src is None:
        return locate(ref)
    return (
        src.base.path if hasattr(src, "base") else src.path
    )  # a LoRA source: the tokenizer lives with its base


def _source_chat_template(path: Path) -> str | None:
    if (path / "chat_template.jinja").exists():
        return (path / "chat_template.jinja").read_text()
    cfg = path / "tokenizer_config.json"
    return json.loads(cfg.read_text()).get("chat_template") if cfg.exists() else None


def resolve_chat_template(value: str, sources: Mapping[str, Source]) -> str:
    """`chat_template`: Jinja text as is, `chatml`, or `auto` (the template most of the sources share)."""
    if "{{" in value or "{%" in value:
        return value
    if value == "chatml":
        return CHATML
    if value == "auto":
        found = [t for ref in sources if (t := _source_chat_template(_tokenizer_dir(ref, sources)))]
        if not found:
            raise ConfigError("chat_template: auto, but no source has a chat template")
        return max(found, key=found.count)
    raise ConfigError(f"chat_template: {value!r} is not a template; give Jinja text, 'chatml' or 'auto'")


def _copy_side_files(
    plan_: Plan, sources: Mapping[str, Source], out: Path, chat_template: str | None
) -> None:
    (out / "config.json").write_text(json.dumps(plan_.config, indent=2) + "\n")
    if plan_.vocab is not None and plan_.vocab.tokenizer is not None:
        template = resolve_chat_template(chat_template, sources) if chat_template is not None else None
        save_tokenizer(plan_.vocab.tokenizer, out, template)
        return
    src = _tokenizer_dir(plan_.tokenizer_source, sources)
    if not src.is_dir():
        raise ConfigError(f"tokenizer_source: {plan_.tokenizer_source} is not a model directory")
    copy_files(src, out, TOKENIZER_FILES)
    if chat_template is not None:
        cfg_file = out / "tokenizer_config.json"
        if not cfg_file.exists():
            raise ConfigError(f"chat_template: the tokenizer source {src} has no tokenizer_config.json")
        cfg = json.loads(cfg_file.read_text())
        cfg["chat_template"] = resolve_chat_template(chat_template, sources)
        cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")
        (out / "chat_template.jinja").write_text(cfg["chat_template"])


def merge_to_dir(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    dtype: str | None = None,
    allow_pickle: bool = False,
    truncate_vocab: bool = False,
    max_shard_bytes: int = 5 * 1024**3,
    overwrite: bool = False,
    on_tensor: Callable[[TensorJob], None] | None = None,
    on_plan: Callable[[Plan], None] | None = None,
) -> Path:
    """Stream a merge into an HF model directory (sharded safetensors, config, tokenizer). Its models are pinned
    first (hub ids at their commit, absolute paths): what is merged is what its evomerge_recipe.yaml records."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out}: output directory already exists (use --force to replace it)")
    from evomerge.merge.mergekit_io import dump_recipe_yaml, recipe_from_dict

    recipe = recipe_from_dict(
        pin_names(recipe.to_dict(), recipe.referenced_models(), allow_pickle=allow_pickle)
    )
    sources = open_recipe_sources(recipe, allow_pickle=allow_pickle)
    plan_ = plan(recipe, sources, out_dtype=parse_dtype(dtype, "--dtype"), truncate_vocab=truncate_vocab)
    if on_plan:
        on_plan(plan_)
    parent = out.resolve().parent
    if not parent.exists():
        raise ConfigError(f"{out}: parent directory {parent} does not exist")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as e:
        raise ConfigError(f"{out}: cannot write to {parent} ({e.strerror})") from None

    jobs = {job.name: job for job in plan_.jobs}
    scratch = StackBuffer()  # safe: write_weights writes each result before it asks for the next

    def produce(spec: TensorSpec) -> torch.Tensor:
        job = jobs[spec.name]
        t = merge_tensor(job, lambda ref, name: sources[ref].read(name, device),
                         lambda ref, name, out: sources[ref].read_into(name, out), scratch)  # fmt: skip
        if on_tensor:
            on_tensor(job)
        return t

    try:
        specs = [TensorSpec(j.name, j.shape, j.dtype) for j in plan_.jobs]
        write_weights(tmp, specs, produce, max_shard_bytes)
        _copy_side_files(plan_, sources, tmp, recipe.chat_template)
        (tmp / "evomerge_recipe.yaml").write_text(dump_recipe_yaml(recipe))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, EvomergeError):
            raise CheckpointError(f"{out}: write failed ({e.strerror or e})") from None
        raise
    return out


# ------------------------------------------------------------------------------------- in place


class ResidentPool:
    """The sources of a search, loaded once onto a device for in-place candidates.

    Tensors that every source has with the same shape are kept stacked, `[K, *shape]` in pool order, in
    `dtype` (fp32 by default: the math runs in fp32 anyway; use bf16 to halve memory for large models). A
    candidate whose recipe is a linear combination of exactly the pool in pool order (task arithmetic,
    linear; the order `models:` recipes produce when the pool is [sources..., base]) is then one
    matrix-vector product per tensor, written straight into the target: a memory-bandwidth-bound switch.

    The pool may live on another device than the target (`workers.pool_device: cpu`: in host memory, `pin`ned
    so that copies to the GPU are asynchronous DMA): `apply_in_place` and `fetch` then move each tensor to
    the target's device as it is used, so pools larger than GPU memory work and results equal a pool on the
    target's device.
    """

    def __init__(self, sources: Mapping[str, Source], device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, pin: bool = False) -> None:  # fmt: skip
        self.sources = dict(sources)
        self.device = torch.device(device)
        self.dtype = dtype
        pin = pin and self.device.type == "cpu" and torch.cuda.is_available()  # pinning needs CUDA
        self.refs = list(self.sources)
        self.index = {ref: i for i, ref in enumerate(self.refs)}
        self.stacked: dict[str, torch.Tensor] = {}
        self.tensors: dict[str, dict[str, torch.Tensor]] = {ref: {} for ref in self.refs}
        first = self.sources[self.refs[0]]
        for name, info in first.tensors.items():
            shared = all(
                name in s.tensors and s.tensors[name].shape == info.shape for s in self.sources.values()
            )
            if shared and info.dtype.is_floating_point:
                stack = torch.empty(
                    (len(self.refs), *info.shape), dtype=dtype, device=self.device, pin_memory=pin
                )
                for i, src in enumerate(self.sources.values()):
                    stack[i].copy_(src.read(name, self.device))
                self.stacked[name] = stack
        for ref, src in self.sources.items():
            for name in src.tensors:
                if name not in self.stacked:
                    tensor = src.read(name, self.device)
                    self.tensors[ref][name] = tensor.pin_memory() if pin else tensor

    @classmethod
    def from_refs(cls, refs: Iterable[str], *, base: str | None = None, device: str = "cpu",
                  allow_pickle: bool = False, dtype: torch.dtype = torch.float32, pin: bool = False) -> ResidentPool:  # fmt: skip
        return cls(
            {r: open_source(r, base=base, allow_pickle=allow_pickle) for r in refs}, device, dtype, pin
        )

    def read(self, ref: str, name: str) -> torch.Tensor:
        if ref not in self.index:
            raise ConfigError(f"{ref}: not in the resident pool (pool: {', '.join(self.refs)})")
        stack = self.stacked.get(name)
        return stack[self.index[ref]] if stack is not None else self.tensors[ref][name]

    def fetch(self, ref: str, name: str, device: torch.device | str) -> torch.Tensor:
        """`read`, on `device` (a copy, asynchronous from pinned memory, when the pool lives elsewhere)."""
        return self.read(ref, name).to(device, non_blocking=True)

    def stacks_on(self, device: torch.device | str) -> Mapping[str, torch.Tensor]:
        """The stacks as seen from `device`: themselves when the pool is there, else streamed on lookup."""
        return self.stacked if self.device == torch.device(device) else _StreamedStacks(self.stacked, device)

    def whole_pool_stack(self, job: TensorJob) -> torch.Tensor | None:
        """The stacked tensor when the job reads the same tensor from every pool model in pool order."""
        stack = self.stacked.get(job.inputs[0][1])
        if stack is None or job.vocab_rows is not None or len(job.inputs) != len(self.refs):
            return None
        same = all(
            ref == self.refs[i] and name == job.inputs[0][1] for i, (ref, name) in enumerate(job.inputs)
        )
        return stack if same else None


class _StreamedStacks(Mapping[str, torch.Tensor]):
    """Stacks moved to a device when looked up; the last one is kept (a mixture reads one tensor's stack once
    per segment, in a row)."""

    def __init__(self, stacked: Mapping[str, torch.Tensor], device: torch.device | str) -> None:
        self._stacked, self._device = stacked, device
        self._last: tuple[str, torch.Tensor] | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        if self._last is None or self._last[0] != name:
            self._last = None  # free the previous copy first
            self._last = (name, self._stacked[name].to(self._device, non_blocking=True))
        return self._last[1]

    def __iter__(self) -> Iterator[str]:
        return iter(self._stacked)

    def __len__(self) -> int:
        return len(self._stacked)


def _check_tied_target(plan_: Plan, targets: Mapping[str, torch.Tensor]) -> None:
    """A target that ties its head to its embedding holds one tensor for both: when the merge unties them
    (a source has its own head), writing the head would overwrite the embedding. Refused before any write."""
    if plan_.config.get("tie_word_embeddings", True) is not False:
        return
    seen: dict[int, str] = {}  # tied weights are one Parameter object (data_ptr would be 0 for all on `meta`)
    for job in plan_.jobs:
        target = targets.get(job.name)
        if target is not None and target.numel():
            first = seen.setdefault(id(target), job.name)
            if first != job.name:
                raise ShapeMismatchError(
                    f"target model ties {job.name} to {first}, but the merge gives {job.name} its own values "
                    "(a source has an untied head): the target must be an untied model"
                )


@torch.no_grad()
def apply_in_place(recipe: Recipe, pool: ResidentPool, model: torch.nn.Module) -> Plan:
    """Overwrite `model`'s parameters (and buffers) with the merge `recipe` describes; no allocation of
    a new model. Every recipe tensor must exist in the model with the same shape. A pool on another device
    (host memory) is streamed: each job's inputs are moved to the target's device before the math, so the
    result is the one a pool on that device gives."""
    unknown = [r for r in recipe.referenced_models() if r not in pool.sources]
    if unknown:
        raise ConfigError(f"recipe uses {unknown[0]}, which is not in the resident pool")
    plan_ = plan(recipe, pool.sources)
    targets = model.state_dict(keep_vars=True)
    _check_tied_target(plan_, targets)
    for job in plan_.jobs:
        target = targets.get(job.name)
        if target is None:
            raise ShapeMismatchError(f"target model has no tensor {job.name}")
        if tuple(target.shape) != job.shape:
            raise ShapeMismatchError(
                f"{job.name}: target model shape {tuple(target.shape)}, merge gives {job.shape}"
            )
        coefficients = linear_form(job)
        stack = pool.whole_pool_stack(job) if coefficients is not None else None
        device = target.device
        if stack is not None and target.data.is_contiguous():
            stack = stack.to(device, non_blocking=True)  # no copy when the pool is on the target's device
            _check_finite(job, combine_into(coefficients, stack, target.data))  # straight into the target
        else:
            target.data.copy_(merge_tensor(job, lambda ref, name, to=device: pool.fetch(ref, name, to)))
    return plan_
