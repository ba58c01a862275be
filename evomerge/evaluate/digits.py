"""The M2N2 digits setting (ALGORITHMS.md 4.3): data split, the 64-256-10 MLP, its flat parameter
vector, an evaluator and the "pre-trained halves" seeds.

    spec = DigitsSpec(split="train")                 # plain data: travels to Ray workers
    evaluator = spec.build()                         # once per worker: loads and places the data
    result = evaluator.evaluate(model)               # per candidate: one batched forward pass
    result.scores["digits"], result.samples["digits"]   # accuracy, 0/1 per example in dataset order

Data: sklearn `load_digits` (1797 images of 8x8), pixel values 0..16 *not* rescaled, the first
int(0.8 * 1797) = 1437 rows train, the last 360 test, no shuffling, as the reference
(SakanaAI/natural_niches `data.py`) does.

Flat parameter vector (reference `model.py`), D = 19,210:

    [ W1 (64 x 256, row-major) | b1 (256) | W2 (256 x 10, row-major) | b2 (10) ]
      0 .. 16383                 16384..    16640 .. 19199            19200 .. 19209

`DigitsMLP` holds exactly these four tensors as parameters `w1, b1, w2, b2` (in that registration
order, reference shapes), computing `relu(x @ w1 + b1) @ w2 + b2`: its parameters flattened in module
order *are* the reference vector, so a split point over the flat order means the same thing here as in
the reference. `save_digits_checkpoint` writes a model as a small model directory (`config.json` with
`model_type: evomerge_digits` + `model.safetensors`) that the merge engine and workers read like any
other source.

This module owns the digits data and the evaluator (the model itself is `evomerge.digits_mlp`); it knows
nothing about strategies or workers.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from evomerge.digits_mlp import MODEL_TYPE, NUM_PARAMS, OUTPUT_DIM, DigitsMLP
from evomerge.evaluate.base import Evaluation, EvaluationError

TRAIN_FRACTION = 0.8
TASK = "digits"


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - sklearn is a declared dependency
        raise EvaluationError(
            "the digits evaluator needs scikit-learn (pip install 'scikit-learn>=1.3')"
        ) from e
    images, labels = load_digits(return_X_y=True)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_digits_split() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`(x_train, y_train, x_test, y_test)`: float32 pixels 0..16 (N x 64) and int64 labels, the
    reference's fixed split: first 80% (1437) train, last 20% (360) test, in dataset order."""
    images, labels = _digits_arrays()
    cut = int(len(images) * TRAIN_FRACTION)
    x = torch.tensor(images, dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.int64)
    return x[:cut].clone(), y[:cut].clone(), x[cut:].clone(), y[cut:].clone()


def flatten_params(model: DigitsMLP) -> Tensor:
    """The model's parameters as one reference-layout vector of length 19,210 (a copy, detached)."""
    with torch.no_grad():
        return torch.cat([p.reshape(-1) for p in model.parameters()]).clone()


def load_flat_params(model: DigitsMLP, vec: Tensor) -> DigitsMLP:
    """Copy a reference-layout vector into `model` in place (cast to its dtype and device)."""
    if vec.dim() != 1 or vec.numel() != NUM_PARAMS:
        raise EvaluationError(
            f"digits MLP parameter vector must have shape ({NUM_PARAMS},), got {tuple(vec.shape)}"
        )
    with torch.no_grad():
        offset = 0
        for p in model.parameters():
            p.copy_(vec[offset : offset + p.numel()].view(p.shape))
            offset += p.numel()
    return model


def save_digits_checkpoint(model: DigitsMLP | Tensor, out: str | Path) -> Path:
    """Write a DigitsMLP (or a reference-layout flat vector) as a model directory the engine can read."""
    from safetensors.torch import save_file

    if isinstance(model, Tensor):
        model = load_flat_params(DigitsMLP(), model.detach().to("cpu", torch.float32))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().to("cpu").contiguous().clone() for name, p in model.named_parameters()}
    save_file(tensors, str(out / "model.safetensors"))
    config = {"model_type": MODEL_TYPE, "architectures": ["DigitsMLP"], "num_parameters": NUM_PARAMS}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


@dataclass(frozen=True)
class DigitsSpec:
    """Picklable description of the digits evaluator: which split, and where to put the data."""

    split: Literal["train", "test"] = "train"
    device: str = "cpu"
    report_test: bool = False  # also score `digits_test` (test accuracy; not a counted forward pass)

    def __post_init__(self) -> None:
        if self.split not in ("train", "test"):
            raise EvaluationError(f"digits split must be 'train' or 'test', got {self.split!r}")

    def build(self) -> DigitsEvaluator:
        return DigitsEvaluator(self)


class DigitsEvaluator:
    """Accuracy of a (N, 64) -> (N, 10) logits module on one split of the digits data.

    One batched forward over the whole split counts as ONE evaluation (`forward_passes=1`), as one
    child evaluation does in the M2N2 budget (`total_forward_passes` = 50,000 children). Only the data
    is held; the model is read as it is at each call. Predictions are `argmax` over logits, ties going
    to the lowest class index (as `jnp.argmax` in the reference; an all-zero model predicts 0).
    """

    def __init__(self, spec: DigitsSpec) -> None:
        self.spec = spec
        x_train, y_train, x_test, y_test = load_digits_split()
        x, y = (x_train, y_train) if spec.split == "train" else (x_test, y_test)
        self._x = x.to(spec.device)
        self._y = y.to(spec.device)
        self._test = (x_test.to(spec.device), y_test.to(spec.device)) if spec.report_test else None

    def evaluate(self, model: nn.Module, tokenizer: object = None) -> Evaluation:
        start = time.perf_counter()
        param = next(model.parameters(), None)
        device = param.device if param is not None else self._x.device
        x = self._x.to(device=device, dtype=param.dtype if param is not None else torch.float32)
        with torch.no_grad():
            logits = model(x)
        n = self._y.numel()
        if not isinstance(logits, Tensor) or tuple(logits.shape) != (n, OUTPUT_DIM):
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise EvaluationError(f"digits model must map ({n}, 64) inputs to ({n}, 10) logits, got {got}")
        correct = (logits.argmax(dim=1) == self._y.to(device)).cpu().numpy().astype(np.float64)
        scores = {TASK: float(correct.mean())}
        if self._test is not None:
            with torch.no_grad():
                test_logits = model(self._test[0].to(device=device, dtype=x.dtype))
            scores[f"{TASK}_test"] = float(
                (test_logits.argmax(dim=1) == self._test[1].to(device)).float().mean()
            )
        return Evaluation(
            scores=scores,
            samples={TASK: correct},
            forward_passes=1,
            seconds=time.perf_counter() - start,
            device=str(device),
        )


def train_digits_mlp(
    digits: set[int] | None,
    steps: int = 10,
    lr: float = 3e-3,
    seed: int = 42,
    *,
    init_std: float = 0.01,
) -> DigitsMLP:
    """A DigitsMLP trained on the train examples whose label is in `digits` (all if None), as the
    reference's pre-trained halves (`get_pre_trained_models`): flat init N(0, init_std^2), then Adam
    (lr 3e-3) on the full-batch mean cross-entropy for `steps` steps. CPU, seeded by `seed`."""
    x, y, _, _ = load_digits_split()
    if digits is not None:
        bad = sorted(d for d in digits if d not in range(OUTPUT_DIM))
        if bad or not digits:
            raise EvaluationError(f"digits must be a non-empty subset of 0..9, got {sorted(digits)}")
        mask = torch.isin(y, torch.tensor(sorted(digits)))
        x, y = x[mask], y[mask]
    gen = torch.Generator().manual_seed(seed)
    model = load_flat_params(DigitsMLP(), torch.randn(NUM_PARAMS, generator=gen) * init_std)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model
