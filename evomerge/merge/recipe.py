"""Recipe: the one description of a merge, shaped like a mergekit config so YAML round-trips exactly.

A Recipe is frozen, JSON-serializable and has a stable content hash (the prefix of a candidate id in a
search). Parameter values are kept as written (scalars, gradient lists, filter lists); they are
resolved per tensor by `resolve_setting` with mergekit's rules:

- a scalar applies everywhere;
- a list of numbers is a "gradient": for layer j of a slice of L layers, u = j/(L-1) (u = 1 when L = 1,
  as mergekit), x = u*(n-1), value = lerp(v[floor x], v[min(n-1, floor x + 1)], frac x); a list with a
  non-numeric entry picks v[int(u*(n-1))]; tensors outside layers (embeddings, final norm, head) use u = 0;
- a list of {filter, value} takes the first entry whose filter is a substring of the tensor name
  (null or "*" matches all); no match falls through to the next scope.

Scopes, highest precedence first: the source's own parameters, the slice's, the recipe's.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Scalar = Union[bool, int, float, str]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Conditional(_Frozen):
    """A value that applies to tensors whose name contains `filter`."""

    filter: str | None = None
    value: Scalar | list[Scalar]


Setting = Union[Scalar, list[Scalar], Conditional, list[Conditional]]
Parameters = dict[str, Setting]


class ModelSource(_Frozen):
    """A source model (`path`, or `path+lora_adapter_path`) with its own parameters."""

    model: str
    parameters: Parameters | None = None


class SliceSource(_Frozen):
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters | None = None

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"layer_range must be [start, end) with 0 <= start < end (got {list(v)})")
        return v


class Slice(_Frozen):
    """One block of output layers: the same number of layers from each source, merged."""

    sources: list[SliceSource]
    base_model: str | None = None
    parameters: Parameters | None = None

    @field_validator("sources")
    @classmethod
    def _same_length(cls, v: list[SliceSource]) -> list[SliceSource]:
        if not v:
            raise ValueError("a slice needs at least one source")
        lengths = {s.layer_range[1] - s.layer_range[0] for s in v}
        if len(lengths) > 1:
            raise ValueError(
                f"all sources of a slice must span the same number of layers (got {sorted(lengths)})"
            )
        return v


class ZeroEmbedding(_Frozen):
    """`{kind: zero}`: the token's rows are zeros."""

    kind: Literal["zero"]


class ModelTokenEmbedding(_Frozen):
    """`{kind: model_token, model, token | token_id}`: the rows of another token of one model."""

    kind: Literal["model_token"]
    model: str
    token_id: int | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _one_token(self) -> ModelTokenEmbedding:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of 'token' or 'token_id'")
        return self


class TokenEmbedding(_Frozen):
    """Where one output token's embedding and LM-head rows come from (mergekit's `tokenizer.tokens` entry).

    `source` is a model of the merge (its row of this token), `{kind: zero}` or `{kind: model_token, ...}`;
    absent, mergekit's automatic rule applies. `force` uses the source for every model, even those that
    have the token. Fields are None when not written, so a YAML round-trips exactly.
    """

    source: Annotated[ZeroEmbedding | ModelTokenEmbedding, Field(discriminator="kind")] | str | None = None
    force: bool | None = None

    @field_validator("source", mode="before")
    @classmethod
    def _known_kind(cls, v: Any) -> Any:
        if isinstance(v, dict) and v.get("kind") not in ("zero", "model_token"):
            raise ValueError(
                "source must be a model, {kind: zero} or {kind: model_token, model, token | token_id}"
            )
        return v

    @model_validator(mode="after")
    def _force_needs_source(self) -> TokenEmbedding:
        if self.force and self.source is None:
            raise ValueError("force: true needs a source")
        return self


class TokenizerSettings(_Frozen):
    """mergekit's `tokenizer:` block: the output vocabulary, tokens to add or re-source, row padding."""

    source: str | None = None  # base | union | a model; absent means union (mergekit's default)
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: int | None = None

    @field_validator("pad_to_multiple_of")
    @classmethod
    def _positive(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"must be a positive integer (got {v})")
        return v


class Recipe(_Frozen):
    """A merge: mergekit's config schema (models or slices) plus evomerge's `random_seed`.

    `random_seed` seeds the random methods (DARE, DELLA) per tensor; it is not a mergekit key and is written
    as mergekit's `--random-seed` flag in a comment when exporting YAML.
    """

    merge_method: str
    base_model: str | None = None
    models: list[ModelSource] | None = None
    slices: list[Slice] | None = None
    parameters: Parameters | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSettings | None = None
    chat_template: str | None = None
    random_seed: int | None = None

    @model_validator(mode="after")
    def _models_xor_slices(self) -> Recipe:
        if (self.models is None) == (self.slices is None):
            raise ValueError("give exactly one of 'models' or 'slices'")
        if self.models is not None and not self.models:
            raise ValueError("'models' is empty")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give either 'tokenizer_source' or a 'tokenizer' block, not both (as mergekit)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def content_hash(self) -> str:
        """sha256 of the canonical JSON: equal recipes hash equal, whatever their key order."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def referenced_models(self) -> list[str]:
        """Every model path the recipe reads, base first, without duplicates, in order of appearance."""
        refs = [self.base_model] if self.base_model else []
        for m in self.models or []:
            refs.append(m.model)
        for s in self.slices or []:
            refs.extend([s.base_model] if s.base_model else [])
            refs.extend(src.model for src in s.sources)
        return list(dict.fromkeys(refs))


def _is_number(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, (int, float)):
        return True
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def interpolate(values: list[Scalar], u: float) -> Scalar:
    """A gradient list at position u in [0, 1] (mergekit's piecewise-linear rule)."""
    if not all(_is_number(v) for v in values):
        return values[int(u * (len(values) - 1))]
    x = u * (len(values) - 1)
    i0 = int(x)
    i1 = min(len(values) - 1, i0 + 1)
    frac = x - i0
    return (1 - frac) * float(values[i0]) + frac * float(values[i1])


def resolve_setting(setting: Setting | None, tensor_name: str, u: float) -> Scalar | None:
    """One setting for one tensor at layer position u; None when a filter list has no match."""
    if setting is None:
        return None
    if isinstance(setting, Conditional):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, Conditional) for e in setting):
            for cond in setting:
                if cond.filter in (None, "*") or cond.filter in tensor_name:
                    return resolve_setting(cond.value, tensor_name, u)
            return None
        return interpolate(setting, u)
    return setting


def resolve(scopes: list[Parameters | None], name: str, tensor_name: str, u: float) -> Scalar | None:
    """The first non-None value of parameter `name` over scopes in precedence order."""
    for scope in scopes:
        if scope and name in scope:
            value = resolve_setting(scope[name], tensor_name, u)
            if value is not None:
                return value
    return None
