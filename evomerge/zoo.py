"""Tiny offline model families for demos and tests (no hub downloads).

For now: a random Llama base and "experts" = base + Gaussian noise. They merge for real, but they know
nothing; the trained skill zoo replaces them as the demo's models.
"""

from __future__ import annotations

from pathlib import Path

import torch


def make_random_llama(
    path: Path,
    seed: int,
    *,
    base: Path | None = None,
    scale: float = 0.05,
    vocab: int = 64,
    hidden: int = 32,
    layers: int = 4,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Save a random tiny LlamaForCausalLM; with `base`, an expert = base + scale * N(0, 1) on every weight."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(config)
    ref = (
        LlamaForCausalLM.from_pretrained(base, dtype=torch.float32).state_dict() if base is not None else None
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(noise * 0.1 if ref is None else ref[name] + scale * noise)
    model.to(dtype).save_pretrained(path)
    return path


def make_random_family(root: Path, n_experts: int = 3, **kw) -> dict[str, Path]:
    """{'base': root/base, 'e0': root/e0, ...}: a base and n experts near it."""
    family = {"base": make_random_llama(root / "base", 0, **kw)}
    for i in range(n_experts):
        family[f"e{i}"] = make_random_llama(root / f"e{i}", i + 1, base=family["base"], **kw)
    return family
