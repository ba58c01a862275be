"""The one writer of a model directory's weights: safetensors shards planned from names, shapes and dtypes, then
written one tensor at a time (each shard's header first, then every tensor as it is computed), so memory holds one
tensor, never the model. `evomerge merge`, export and model-space members all write through it.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evomerge.checkpoints import SAFETENSORS_DTYPES

DTYPE_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
ONE_SHARD = 1 << 62  # max_shard_bytes for a directory that must hold one model.safetensors
# What a model directory carries beside its weights: tokenizer, vocab and generation files, chat templates.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")  # fmt: skip


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(specs: Sequence[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive groups of at most `max_bytes` (a larger tensor gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    """transformers' names: one `model.safetensors`, or `model-0000i-of-0000n.safetensors`."""
    return (
        ["model.safetensors"]
        if n == 1
        else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    )


def write_shard(
    file: Path, specs: Sequence[TensorSpec], produce: Callable[[TensorSpec], torch.Tensor]
) -> None:
    """A safetensors file written header first, then each tensor as `produce` computes it."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": DTYPE_CODES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}  # fmt: skip
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for spec in specs:
            t = produce(spec).contiguous().cpu()
            assert tuple(t.shape) == spec.shape and t.dtype == spec.dtype, spec.name
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def write_weights(out: Path, specs: Sequence[TensorSpec], produce: Callable[[TensorSpec], torch.Tensor],
                  max_shard_bytes: int) -> None:  # fmt: skip
    """Every tensor of `specs`, in order, into `out` (an existing directory): shards, and their index when there
    are several."""
    shards = plan_shards(specs, max_shard_bytes)
    files = shard_names(len(shards))
    for file, group in zip(files, shards):
        write_shard(out / file, group, produce)
    if len(files) > 1:
        weight_map = {s.name: f for f, group in zip(files, shards) for s in group}
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def copy_files(src: Path, out: Path, names: Iterable[str]) -> None:
    """The files of `names` that `src` has, copied into `out`."""
    for name in names:
        if (src / name).exists():
            shutil.copy2(src / name, out / name)
