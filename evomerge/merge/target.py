"""The model a worker merges into: a Hugging Face causal LM, or evomerge's digits MLP (M2N2's toy setting).

`load_target` builds it with the base's weights on a device; `meta_target` builds the same module on the
meta device (no memory), which is all the driver needs to know the flat parameter order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from evomerge.references import locate


def _is_digits(path: str | Path) -> bool:
    from evomerge.digits_mlp import is_digits_checkpoint

    return is_digits_checkpoint(path)


def load_target(path: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, Any]:
    """(model in fp32 on `device`, eval mode; its tokenizer, or None for the digits MLP)."""
    path = locate(str(path))
    if _is_digits(path):
        from safetensors.torch import load_file

        from evomerge.digits_mlp import DigitsMLP

        model = DigitsMLP()
        model.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
        return model.to(device).eval(), None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=False)
    return model.to(device).eval(), AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def meta_target(path: str | Path) -> torch.nn.Module:
    path = locate(str(path))
    if _is_digits(path):
        from evomerge.digits_mlp import DigitsMLP

        with torch.device("meta"):
            return DigitsMLP()
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)  # never code from a checkpoint
        return AutoModelForCausalLM.from_config(config, trust_remote_code=False)
