"""The M2N2 digits model (ALGORITHMS.md 4.3): 64 -> 256 (ReLU) -> 10, and how its model directory is
recognised. A model architecture, like a transformers model class: the merge engine's in-place target, the
digits evaluator and the tests all build it, so it sits below them (`evomerge.evaluate.digits` has the data,
the evaluator and the flat-vector helpers)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

INPUT_DIM = 64
HIDDEN_DIM = 256
OUTPUT_DIM = 10
NUM_PARAMS = (INPUT_DIM + 1) * HIDDEN_DIM + (HIDDEN_DIM + 1) * OUTPUT_DIM  # 19,210
MODEL_TYPE = "evomerge_digits"  # config.json's model_type of a digits model directory


class DigitsMLP(nn.Module):
    """64 -> 256 (ReLU) -> 10 logits, parameters in the reference layout (`evomerge.evaluate.digits` describes it)."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.zeros(INPUT_DIM, HIDDEN_DIM))
        self.b1 = nn.Parameter(torch.zeros(HIDDEN_DIM))
        self.w2 = nn.Parameter(torch.zeros(HIDDEN_DIM, OUTPUT_DIM))
        self.b2 = nn.Parameter(torch.zeros(OUTPUT_DIM))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x @ self.w1 + self.b1) @ self.w2 + self.b2


def is_digits_checkpoint(path: str | Path) -> bool:
    file = Path(path) / "config.json"
    return file.exists() and json.loads(file.read_text()).get("model_type") == MODEL_TYPE
