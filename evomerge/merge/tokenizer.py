"""The output vocabulary of a merge (`tokenizer_source`, `tokenizer:`) and each model's rows in its order.

mergekit 0.1.5's rules:

- The output tokenizer is the base's (`base`), a named model's (a path), or `union`: the base's plus every
  token another model has (new ordinary tokens, then added tokens, models in recipe order, ids ascending).
  `tokenizer.tokens` keys it lacks are added as ordinary tokens. A model's tokenizer entries at ids >= its
  `vocab_size` (no embedding row) do not count; the base tokenizer drops them (BPE only, as mergekit).
- Each model's embedding / LM-head rows are gathered by token string into the output ids. A row a model
  lacks, and every row of a `force`d token, takes the token's `tokens` setting, else mergekit's automatic
  source: the only model that has the token, the base when it has it, the mean of the models that have it,
  zeros when none has it. `pad_to_multiple_of` pads with the mean of the model's own (gathered) rows.
- The base tokenizer is `base_model`, else the first model (mergekit takes an arbitrary one); the base of a
  tensor's automatic rule is the slice's or recipe's `base_model`, as mergekit.
- When the output tokenizer is a source's tokenizer unchanged, its files are copied as they are; otherwise
  transformers writes them (`save_pretrained`), which is what mergekit writes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evomerge.errors import ConfigError, ShapeMismatchError
from evomerge.merge.recipe import ModelTokenEmbedding, Recipe, TokenEmbedding, ZeroEmbedding

log = logging.getLogger(__name__)

TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class TokenizerSpec:
    """`tokenizer_source: X` and the `tokenizer:` block, as one setting."""

    source: str  # "base" | "union" | a model reference
    tokens: Mapping[str, TokenEmbedding]
    pad_to_multiple_of: int | None = None
    where: str = "tokenizer_source"  # the key errors name


def tokenizer_spec(recipe: Recipe) -> TokenizerSpec | None:
    """None when the recipe leaves the vocabulary alone (no `tokenizer_source`, no `tokenizer:` block)."""
    if recipe.tokenizer is not None:
        t = recipe.tokenizer
        return TokenizerSpec(
            t.source or "union", dict(t.tokens or {}), t.pad_to_multiple_of, "tokenizer.source"
        )
    if recipe.tokenizer_source is not None:
        return TokenizerSpec(recipe.tokenizer_source, {})
    return None


@dataclass
class OutputVocab:
    """The merge's tokenizer and, per model, the row of each output token id in that model's tensors."""

    tokenizer: Any | None  # a transformers tokenizer to save; None: `copy_from`'s files are the output's
    copy_from: str | None
    tokens: tuple[str, ...]  # the output token of each id
    rows: int  # output rows: len(tokens) rounded up to pad_to_multiple_of
    perms: dict[str, tuple[int, ...]]  # model -> its row of each output id, -1 where it lacks the token
    vocabs: dict[str, dict[str, int]]  # model -> its own token ids (rows), for model_token by name
    settings: Mapping[str, TokenEmbedding]


def has_tokenizer(path: Path | None) -> bool:
    return path is not None and path.is_dir() and any((path / f).exists() for f in TOKENIZER_MARKERS)


def load_tokenizer(path: Path) -> Any:
    """A fast transformers tokenizer from a local directory (never the hub: callers check the directory)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), use_fast=True)
    except Exception as e:  # transformers raises many types for unreadable tokenizers
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: cannot load its tokenizer ({reason})") from None


def _ids(tok: Any) -> list[tuple[str, int]]:
    """(token, id) in id order: get_vocab() comes from a hash map, so its order is arbitrary."""
    return sorted(tok.get_vocab().items(), key=lambda kv: kv[1])


def _strip_unused(tok: Any, size: int, path: Path) -> bool:
    """Drop tokenizer entries at ids >= size (no embedding row), as mergekit's base tokenizer; True if any."""
    unused = {t for t, i in tok.get_vocab().items() if i >= size}
    if not unused:
        return False
    data = json.loads(tok.backend_tokenizer.to_str()) if getattr(tok, "is_fast", False) else None
    if data is None or data["model"]["type"] != "BPE":
        kind = data["model"]["type"] if data else "a slow tokenizer"
        raise ConfigError(
            f"{path}: its tokenizer has {len(unused)} tokens at ids >= vocab_size {size} and is {kind}; only "
            "BPE tokenizers can be trimmed to the embedding rows (as mergekit)"
        )
    from tokenizers import Tokenizer

    data["added_tokens"] = [a for a in data["added_tokens"] if a["id"] < size]
    for t in unused:
        data["model"]["vocab"].pop(t, None)

    def keep(merge: str | list[str]) -> bool:
        pieces = merge.split(" ") if isinstance(merge, str) else merge
        return not any(p in unused for p in pieces)

    data["model"]["merges"] = [m for m in data["model"]["merges"] if keep(m)]
    tok._tokenizer = Tokenizer.from_str(json.dumps(data))
    return True


def _forget_special(tok: Any) -> None:
    """Unlist special tokens the vocabulary no longer has. mergekit leaves a trimmed token in
    `extra_special_tokens`, and transformers adds it back on load, at an id past the embedding rows."""
    have = tok.get_vocab()
    for attr in ("extra_special_tokens", "additional_special_tokens"):
        listed = getattr(tok, attr, None)
        if isinstance(listed, list) and any(str(t) not in have for t in listed):
            setattr(tok, attr, [t for t in listed if str(t) in have])
    for attr, value in dict(tok.special_tokens_map).items():
        if isinstance(value, str) and value not in have:
            log.warning("the base tokenizer's %s %r has no embedding row; it is unset", attr, value)
            setattr(tok, attr, None)


def _union(out: Any, models: Sequence[tuple[Any, int]]) -> None:
    """Add to `out` every token of `models` (tokenizer, vocab_size) it lacks: ordinary tokens, then added ones."""
    ordinary: dict[str, None] = {}
    added: dict[str, Any] = {}
    for tok, size in models:
        ordinary.update((t, None) for t, i in _ids(tok) if i < size)
        for i, info in sorted(tok.added_tokens_decoder.items()):
            if i >= size:
                continue
            if info.content in added and added[info.content] != info:
                log.warning(
                    "token %r is added with different settings by two models; using the first", info.content
                )
            added.setdefault(info.content, info)
    have = out.get_vocab()
    new = [t for t in ordinary if t not in added and t not in have]
    if new:
        out.add_tokens(new)
    if added:
        out.add_tokens(list(added.values()))


def build_output_vocab(
    spec: TokenizerSpec,
    refs: Sequence[str],
    base_ref: str,
    tokenizer_dir: Callable[[str], Path],
    vocab_size: Callable[[str], int | None],
) -> OutputVocab:
    """The output tokenizer and every model's permutation; errors name the setting, nothing is written."""
    base_dir = tokenizer_dir(base_ref)
    if not has_tokenizer(base_dir):
        raise ConfigError(f"{spec.where}: {spec.source}: the base model {base_ref} has no tokenizer")
    _check_token_models(spec, refs)
    base_tok = load_tokenizer(base_dir)
    tokenizers = {base_ref: base_tok}
    for ref in refs:
        if ref not in tokenizers and has_tokenizer(tokenizer_dir(ref)):
            tokenizers[ref] = load_tokenizer(tokenizer_dir(ref))
        elif ref not in tokenizers:
            log.warning("%s has no tokenizer; taking it to be the base model's (as mergekit)", ref)
    sizes = {
        ref: vocab_size(ref) or len(tokenizers.get(ref, base_tok).get_vocab()) for ref in {base_ref, *refs}
    }
    vocabs = {ref: {t: i for t, i in _ids(tokenizers.get(ref, base_tok)) if i < sizes[ref]} for ref in refs}

    if spec.source in ("base", "union"):
        out, copy_from = load_tokenizer(base_dir), base_ref  # a fresh copy: `base_tok` stays as read
        pristine = out.backend_tokenizer.to_str()
        stripped = _strip_unused(out, sizes[base_ref], base_dir)
        if spec.source == "union":
            order = [base_ref, *(r for r in refs if r in tokenizers and r != base_ref)]
            _union(out, [(tokenizers[r], sizes[r]) for r in order])
    else:
        path = tokenizer_dir(spec.source)
        if not has_tokenizer(path):
            raise ConfigError(
                f"{spec.where}: {spec.source} has no tokenizer (give 'base', 'union', or a model or directory "
                "with one)"
            )
        out, copy_from, stripped = load_tokenizer(path), spec.source, False
        pristine = out.backend_tokenizer.to_str()
    new = [t for t in spec.tokens if t not in out.get_vocab()]
    if new:
        out.add_tokens(new)
    unchanged = not stripped and out.backend_tokenizer.to_str() == pristine
    if stripped:
        _forget_special(out)

    ordered = _ids(out)
    if [i for _, i in ordered] != list(range(len(ordered))):
        raise ConfigError(
            f"{spec.where}: {spec.source}: the output tokenizer's ids are not 0..{len(ordered) - 1}"
        )
    tokens = tuple(t for t, _ in ordered)
    rows = len(tokens)
    pad = spec.pad_to_multiple_of
    if pad and rows % pad:
        rows += pad - rows % pad
    perms = {ref: tuple(vocabs[ref].get(t, -1) for t in tokens) for ref in refs}
    return OutputVocab(
        tokenizer=None if unchanged else out,
        copy_from=copy_from if unchanged else None,
        tokens=tokens,
        rows=rows,
        perms=perms,
        vocabs=vocabs,
        settings=spec.tokens,
    )


def _check_token_models(spec: TokenizerSpec, refs: Sequence[str]) -> None:
    for token, setting in spec.tokens.items():
        src = setting.source
        model = src.model if isinstance(src, ModelTokenEmbedding) else src
        if isinstance(model, str) and model not in refs:
            raise ConfigError(f"tokenizer.tokens[{token!r}].source: {model} is not a model of the merge")


# ------------------------------------------------------------------------------------- rows of one tensor


@dataclass(frozen=True, eq=False)
class VocabRows:
    """How a vocabulary tensor's inputs are put in output token order (row r = output token id r).

    Input i's row r is its own row `own[i, r]`; where that is -1 (it lacks the token, or the token is forced)
    it is the mean over inputs j of their rows `picks[j, d]` (-1: not in the mean; none: zeros) for the
    default d of token `default_ids[d]`. Rows past the tokens (padding) are the mean of the input's rows.
    """

    rows: int
    own: torch.Tensor  # [inputs, tokens] long
    default_ids: torch.Tensor  # [defaults] long
    picks: torch.Tensor  # [inputs, defaults] long


def row_map(
    vocab: OutputVocab,
    refs: Sequence[str],
    base: str | None,
    shapes: Sequence[tuple[int, ...]],
    name: str,
) -> VocabRows | None:
    """The row map of one vocabulary tensor whose inputs are `refs`; None when every input already is in
    output order (same tokens at the same ids, no padding), so the tensor merges as it is."""
    if len({tuple(s[1:]) for s in shapes}) > 1:
        listing = ", ".join(f"{ref}: {tuple(s)}" for ref, s in zip(refs, shapes))
        raise ShapeMismatchError(f"{name}: shapes differ beyond the vocabulary axis ({listing})")
    n = len(vocab.tokens)
    perm = torch.tensor([vocab.perms[ref] for ref in refs], dtype=torch.long).view(len(refs), n)
    for ref, row, shape in zip(refs, perm, shapes):
        if n and int(row.max()) >= shape[0]:
            raise ShapeMismatchError(
                f"{name}: {ref} has {shape[0]} rows, but its tokenizer and vocab_size give token ids up to "
                f"{int(row.max())}"
            )
    index = {t: i for i, t in enumerate(vocab.tokens)}
    forced = torch.zeros(n, dtype=torch.bool)
    forced[[index[t] for t, s in vocab.settings.items() if s.force]] = True
    identity = torch.arange(n)
    if (
        vocab.rows == n
        and not forced.any()
        and all(s[0] == n for s in shapes)
        and bool((perm == identity).all())
    ):
        return None
    have = perm >= 0
    default_ids = torch.nonzero(~have.all(dim=0) | forced).flatten()
    # mergekit's automatic source: the base when it has the token, else the mean of the inputs that have it
    # (the only one, or none: zeros)
    picks = torch.where(have, perm, -1)[:, default_ids]
    base_at = refs.index(base) if base in refs else None
    if base_at is not None:
        base_has = have[base_at, default_ids]
        picks[:, base_has] = -1
        picks[base_at, base_has] = perm[base_at, default_ids[base_has]]
    missing = int((picks < 0).all(dim=0).sum())
    if missing:
        log.warning("%s: %d tokens are in no input model; their rows are zeros", name, missing)
    column = {int(tid): d for d, tid in enumerate(default_ids)}
    for token, setting in vocab.settings.items():
        if setting.source is not None and index[token] in column:
            d = column[index[token]]
            picks[:, d] = -1
            at, row = _configured(setting, token, vocab, refs, perm[:, index[token]], shapes, name)
            if at is not None:
                picks[at, d] = row
    own = torch.where(forced, -1, perm)
    return VocabRows(vocab.rows, own, default_ids, picks)


def _configured(
    setting: TokenEmbedding,
    token: str,
    vocab: OutputVocab,
    refs: Sequence[str],
    rows: torch.Tensor,
    shapes: Sequence[tuple[int, ...]],
    name: str,
) -> tuple[int | None, int]:
    """(input, row) a `tokens` setting names for `token` in tensor `name` (None: zeros). `rows`: each
    input's row of the token."""
    src = setting.source
    where = f"tokenizer.tokens[{token!r}].source"
    if isinstance(src, ZeroEmbedding):
        return None, -1
    model = src.model if isinstance(src, ModelTokenEmbedding) else src
    if model not in refs:
        raise ConfigError(f"{where}: {model} is not an input of {name}")
    at = refs.index(model)
    if isinstance(src, ModelTokenEmbedding):
        row = src.token_id if src.token is None else vocab.vocabs[model].get(src.token, -1)
        if row is None or row < 0 or row >= shapes[at][0]:
            what = f"token {src.token!r}" if src.token is not None else f"token_id {src.token_id}"
            raise ConfigError(f"{where}: {model} has no {what} ({shapes[at][0]} rows)")
        return at, row
    if int(rows[at]) < 0:
        raise ConfigError(
            f"{where}: {model} has no token {token!r}; name a model that has it, or use model_token"
        )
    return at, int(rows[at])


def permute(rows: VocabRows, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each input's tensor in output token order (fp32 inputs give exactly mergekit's fp32 rows)."""
    n = rows.own.shape[1]
    defaults = _default_rows(rows, tensors)
    out = []
    for own, t in zip(rows.own.to(tensors[0].device), tensors):
        new = t.new_zeros((rows.rows, *t.shape[1:]))
        have = own >= 0
        new[:n][have] = t[own[have]]
        fill = ~have[rows.default_ids.to(t.device)]
        new[rows.default_ids.to(t.device)[fill]] = defaults[fill]
        if rows.rows > n:
            new[n:] = new[:n].mean(dim=0)  # mergekit: padding rows are the mean of the real ones
        out.append(new)
    return out


def _default_rows(rows: VocabRows, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The default row of each token in `rows.default_ids`: a sum over inputs in input order, then one
    division (mergekit's order of float operations, so fp32 rows match it exactly)."""
    picks = rows.picks.to(tensors[0].device)
    acc = tensors[0].new_zeros((picks.shape[1], *tensors[0].shape[1:]))
    for i, t in enumerate(tensors):
        slots = torch.nonzero(picks[i] >= 0).flatten()
        acc[slots] = acc[slots] + t[picks[i, slots]]
    count = (picks >= 0).sum(dim=0).clamp(min=1).to(acc.dtype)
    return acc / count.view(-1, *([1] * (acc.dim() - 1)))


def save_tokenizer(tokenizer: Any, out: Path, chat_template: str | None) -> None:
    """Write a rebuilt tokenizer as mergekit does (transformers' save_pretrained)."""
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(out))
