"""The pre-search demo: build the tiny models a merge YAML names, merge them, and check the merged model."""

from __future__ import annotations

from pathlib import Path

import torch

from evomerge.merge.recipe import Recipe
from evomerge.zoo import make_random_llama


def build_missing_models(recipe: Recipe, seed: int = 0) -> list[str]:
    """Create every model path the recipe references that does not exist yet: the base first, then
    experts near it. Returns the refs that were built."""
    refs = recipe.referenced_models()
    base = Path(recipe.base_model or refs[0])
    built = []
    if not base.exists():
        make_random_llama(base, seed)
        built.append(str(base))
    for i, ref in enumerate(refs):
        if not Path(ref).exists():
            make_random_llama(Path(ref), seed + i + 1, base=base)
            built.append(ref)
    return built


@torch.no_grad()
def score_models(models: dict[str, Path], seed: int = 0) -> dict[str, tuple[float, float]]:
    """Per model: next-token loss on a fixed random batch, and the L2 distance of its weights to the last
    model of `models` (the merge)."""
    from transformers import AutoModelForCausalLM

    loaded = {
        name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for name, path in models.items()
    }
    merged = list(loaded.values())[-1].state_dict()
    vocab = next(iter(loaded.values())).config.vocab_size
    tokens = torch.randint(0, vocab, (8, 32), generator=torch.Generator().manual_seed(seed))
    out = {}
    for name, model in loaded.items():
        loss = model(input_ids=tokens, labels=tokens).loss.item()
        dist = sum(((p - merged[n]) ** 2).sum() for n, p in model.state_dict().items()) ** 0.5
        out[name] = (loss, float(dist))
    return out
