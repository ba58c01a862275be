"""Open Hugging Face model directories lazily and check that a set of them can be merged.

A `Checkpoint` lists tensor names, shapes and dtypes from the safetensors headers alone (no tensor data is
read) and reads one tensor at a time. Sharded checkpoints use `model.safetensors.index.json`. Pickle
checkpoints (.bin/.pt) can execute code when loaded: they are refused unless the caller opts in, and even
then loaded with `torch.load(weights_only=True)`.

A PEFT LoRA adapter is a source too (`LoraCheckpoint`): its tensors are the base's plus the dense delta
B @ A * alpha / r (alpha / sqrt(r) with rsLoRA) of every adapted module.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from evomerge.errors import CheckpointError, ShapeMismatchError
from evomerge.references import locate, parts

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
VOCAB_TENSOR = re.compile(r"(embed_tokens|lm_head|wte|word_embeddings|embed_out|output)\.weight$")


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str
    offset: int = -1  # absolute byte offset of the data in a safetensors file (-1: not safetensors)
    nbytes: int = 0


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header and check that the file is as long as the header says."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{file}: not a safetensors file (only {len(raw)} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise CheckpointError(
                    f"{file}: corrupt safetensors header (header length {n} > file size {size})"
                )
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (not a JSON object)")
    infos, end = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, stop = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError, IndexError):
            raise CheckpointError(f"{file}: corrupt safetensors entry for tensor {name!r}") from None
        count = 1
        for d in shape:
            count *= d
        if stop - begin != count * dtype.itemsize or begin < 0:
            raise CheckpointError(
                f"{file}: corrupt safetensors entry for tensor {name!r} (size does not match shape)"
            )
        end = max(end, stop)
        infos[name] = TensorInfo(shape, dtype, file.name, 8 + n + begin, stop - begin)
    if 8 + n + end != size:
        raise CheckpointError(
            f"{file}: truncated or corrupt: header describes {8 + n + end} bytes, file has {size}"
        )
    return infos


class Checkpoint:
    """Lazy view of one HF model directory (config.json + safetensors, single or sharded)."""

    def __init__(self, path: str | Path, *, allow_pickle: bool = False) -> None:
        self.path = locate(str(path), allow_pickle=allow_pickle)  # a hub id: its snapshot in the hub cache
        self.allow_pickle = allow_pickle
        if not self.path.is_dir():
            raise CheckpointError(
                f"{self.path}: model directory not found (nor a hub id org/name[@revision])"
            )
        self._handles: dict[str, Any] = {}
        self._pickled: dict[str, dict[str, torch.Tensor]] = {}
        _ = self.tensors  # fail early on missing or corrupt weight files

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r})"

    @cached_property
    def config(self) -> dict[str, Any]:
        file = self.path / "config.json"
        if not file.exists():
            return {}
        try:
            return json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{file}: invalid JSON ({e})") from None

    def _weight_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: invalid index ({e})") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.path / f).exists()]
            if missing:
                raise CheckpointError(f"{index}: shard {missing[0]} is missing")
            return [self.path / f for f in files]
        files = sorted(self.path.glob("*.safetensors"))
        if files:
            return files
        pickled = sorted(p for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
        if pickled:
            if not self.allow_pickle:
                raise CheckpointError(
                    f"{self.path}: only pickle checkpoints ({pickled[0].name}); pickle can run code when loaded, "
                    "so it is refused. Convert to safetensors, or pass --allow-pickle to load it with weights_only=True"
                )
            return pickled
        raise CheckpointError(
            f"{self.path}: no weights found (*.safetensors or model.safetensors.index.json)"
        )

    @cached_property
    def tensors(self) -> dict[str, TensorInfo]:
        """Name -> shape, dtype, file; from headers only (pickle files are loaded, memory-mapped)."""
        infos: dict[str, TensorInfo] = {}
        for file in self._weight_files():
            if file.suffix == ".safetensors":
                infos.update(read_safetensors_header(file))
            else:
                for name, t in self._load_pickle(file).items():
                    infos[name] = TensorInfo(tuple(t.shape), t.dtype, file.name)
        return infos

    def _load_pickle(self, file: Path) -> dict[str, torch.Tensor]:
        if file.name not in self._pickled:
            try:
                data = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises many types for bad pickles
                raise CheckpointError(
                    f"{file}: cannot load with weights_only=True ({type(e).__name__}: {e})"
                ) from None
            if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
                raise CheckpointError(f"{file}: not a state dict of tensors")
            self._pickled[file.name] = data
        return self._pickled[file.name]

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """One tensor, in its stored dtype, on `device`."""
        info = self._info(name)
        if info.file in self._pickled:
            return self._pickled[info.file][name].to(device)
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        self._pread(info, name, buf)
        tensor = (
            buf.view(info.dtype).view(info.shape)
            if info.nbytes
            else torch.empty(info.shape, dtype=info.dtype)
        )
        return tensor.to(device)

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """`out.copy_(read(name))`, but straight from the file into `out` when it is a contiguous CPU tensor of the
        stored dtype and shape: no intermediate buffer (half the memory traffic of a read and a copy)."""
        info = self._info(name)
        direct = (info.file not in self._pickled and out.device.type == "cpu" and out.dtype == info.dtype
                  and tuple(out.shape) == info.shape and out.is_contiguous() and info.nbytes > 0)  # fmt: skip
        if not direct:
            out.copy_(self.read(name, out.device))
            return
        self._pread(info, name, out.view(-1).view(torch.uint8))

    def _info(self, name: str) -> TensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        return info

    def _pread(self, info: TensorInfo, name: str, buf: torch.Tensor) -> None:
        """The tensor's bytes into the uint8 tensor `buf`: a plain positional read, not mmap, so resident memory
        holds only the tensors in use, never the mapped files (and two threads may read at once)."""
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = open(self.path / info.file, "rb", buffering=0)  # noqa: SIM115
        view, done = memoryview(buf.numpy()), 0
        while done < info.nbytes:
            got = os.preadv(handle.fileno(), [view[done:]], info.offset + done)
            if got <= 0:
                raise CheckpointError(f"{self.path / info.file}: unexpected end of file reading {name}")
            done += got

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "unknown")]
        return str(archs[0])

    @property
    def num_layers(self) -> int | None:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if key in self.config:
                return int(self.config[key])
        return None


class LoraCheckpoint:
    """A PEFT LoRA adapter applied to a base checkpoint, seen as a dense checkpoint.

    Supports lora_A/lora_B (Linear) and lora_embedding_A/B (Embedding), rsLoRA, rank/alpha patterns,
    fan_in_fan_out, and full tensors saved via modules_to_save. DoRA adapters are refused.
    """

    def __init__(self, base: Checkpoint, adapter_dir: str | Path) -> None:
        self.base = base
        self.path = locate(str(adapter_dir))
        cfg_file = self.path / "adapter_config.json"
        if not cfg_file.exists():
            raise CheckpointError(f"{self.path}: not a LoRA adapter (no adapter_config.json)")
        self.adapter_config = json.loads(cfg_file.read_text())
        if self.adapter_config.get("use_dora"):
            raise CheckpointError(
                f"{self.path}: DoRA adapters are not supported (magnitude vectors are not a dense delta)"
            )
        self._adapter = Checkpoint(self.path)
        self._pairs, self._replaced = self._index()

    def __repr__(self) -> str:
        return f"LoraCheckpoint({str(self.base.path)!r}+{str(self.path)!r})"

    def _index(self) -> tuple[dict[str, tuple[str, str, str]], dict[str, str]]:
        """Target tensor -> (A key, B key, module name); target tensor -> full replacement key."""
        pairs: dict[str, tuple[str, str, str]] = {}
        replaced: dict[str, str] = {}
        pattern = re.compile(
            r"^(?:base_model\.model\.)?(.*)\.lora_(embedding_)?A(?:\.default)?(?:\.weight)?$"
        )
        for key in self._adapter.tensors:
            m = pattern.match(key)
            if m:
                module, emb = m.group(1), m.group(2) or ""
                b_key = key.replace(f"lora_{emb}A", f"lora_{emb}B")
                if b_key not in self._adapter.tensors:
                    raise CheckpointError(f"{self.path}: {key} has no matching lora_{emb}B")
                target = f"{module}.weight"
                if target not in self.base.tensors:
                    raise CheckpointError(
                        f"{self.path}: adapter targets {target}, which base {self.base.path} does not have "
                        "(adapter made for another base model?)"
                    )
                pairs[target] = (key, b_key, module)
            elif ".lora_" not in key:
                target = re.sub(r"^base_model\.model\.", "", key).replace(".modules_to_save.default", "")
                if target not in self.base.tensors:
                    raise CheckpointError(
                        f"{self.path}: adapter tensor {key} matches nothing in base {self.base.path}"
                    )
                replaced[target] = key
        if not pairs and not replaced:
            raise CheckpointError(f"{self.path}: adapter has no LoRA tensors")
        return pairs, replaced

    def _scale(self, module: str, rank: int) -> float:
        alpha = self.adapter_config.get("lora_alpha", rank)
        for key, value in (self.adapter_config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?{key}$", module):
                alpha = value
                break
        return alpha / rank**0.5 if self.adapter_config.get("use_rslora") else alpha / rank

    def delta(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor | None:
        """The dense fp32 delta of one base tensor, or None when the adapter does not touch it."""
        if name not in self._pairs:
            return None
        a_key, b_key, module = self._pairs[name]
        a = self._adapter.read(a_key, device).float()
        b = self._adapter.read(b_key, device).float()
        delta = (b @ a) * self._scale(module, rank=a.shape[0])
        base_shape = self.base.tensors[name].shape
        if "lora_embedding" in a_key or self.adapter_config.get("fan_in_fan_out"):
            delta = delta.T
        if tuple(delta.shape) != tuple(base_shape):
            raise ShapeMismatchError(
                f"{self.path}: LoRA delta for {name} has shape {tuple(delta.shape)}, base has {tuple(base_shape)} "
                "(adapter made for another base model?)"
            )
        return delta

    @property
    def config(self) -> dict[str, Any]:
        return self.base.config

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self.base.tensors

    @property
    def names(self) -> list[str]:
        return self.base.names

    @property
    def architecture(self) -> str:
        return self.base.architecture

    @property
    def num_layers(self) -> int | None:
        return self.base.num_layers

    def read(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        if name in self._replaced:
            return self._adapter.read(self._replaced[name], device)
        base = self.base.read(name, device)
        delta = self.delta(name, device)
        return base if delta is None else (base.float() + delta).to(base.dtype)

    def read_into(self, name: str, out: torch.Tensor) -> None:
        out.copy_(self.read(name, out.device))


Source = Checkpoint | LoraCheckpoint


def open_source(ref: str, *, base: str | None = None, allow_pickle: bool = False) -> Source:
    """Open a model reference: `model`, `model+adapter` (mergekit syntax) or a bare adapter (applied to `base`,
    the recipe's base model); each a local directory or a hub id `org/name[@revision]`."""
    if len(split := parts(ref)) == 2:
        model, adapter = split
        return LoraCheckpoint(Checkpoint(model, allow_pickle=allow_pickle), adapter)
    path = locate(ref, allow_pickle=allow_pickle)
    if (path / "adapter_config.json").exists():
        if base is None:
            raise CheckpointError(f"{ref}: a LoRA adapter needs a base_model to apply to")
        return LoraCheckpoint(Checkpoint(base, allow_pickle=allow_pickle), path)
    return Checkpoint(path, allow_pickle=allow_pickle)


def check_architectures(sources: dict[str, Source]) -> None:
    """All sources must be the same architecture (config `architectures[0]`, else model_type)."""
    archs = {ref: src.architecture for ref, src in sources.items()}
    if len(set(archs.values())) > 1:
        listing = ", ".join(f"{ref}: {a}" for ref, a in archs.items())
        raise ShapeMismatchError(f"sources have different architectures ({listing})")


def common_vocab_rows(name: str, shapes: dict[str, tuple[int, ...]], truncate: bool) -> int | None:
    """For embedding/LM-head tensors whose vocabulary sizes differ: the common prefix size when truncation
    is allowed, else a clear error. None when the shapes already agree."""
    distinct = set(shapes.values())
    if len(distinct) == 1:
        return None
    listing = ", ".join(f"{ref}: {tuple(s)}" for ref, s in shapes.items())
    trailing = {s[1:] for s in distinct}
    if VOCAB_TENSOR.search(name) and len(trailing) == 1:
        if truncate:
            return min(s[0] for s in distinct)
        raise ShapeMismatchError(
            f"{name}: vocabulary sizes differ ({listing}); the tokenizers differ. Set tokenizer_source (base, "
            "union or a model) to align the rows by token, or, if the token ids of the common prefix mean the same, "
            "pass --truncate-vocab (mergekit's --unsafe-truncate-embeddings)"
        )
    raise ShapeMismatchError(f"{name}: shapes differ ({listing})")
