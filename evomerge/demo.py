"""`make demo`: the zoo (cached), a search over it, and an honest comparison on the held-out test split.

The search optimizes the validation split (`zoo_search`); the table compares, on the test split (`zoo`),
the base, every expert, the best hand-tuned task-arithmetic merge (lambda picked on validation, as a user
would) and the search's best candidate. Last, the best candidate is exported (`evomerge export`) to
RUN_DIR/best_model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

LAMBDAS = (0.3, 0.5, 0.7, 1.0)


def task_arithmetic(base: str, experts: list[str], lam: float) -> Any:
    from evomerge.merge.mergekit_io import recipe_from_dict

    return recipe_from_dict({
        "merge_method": "task_arithmetic", "base_model": base, "parameters": {"lambda": lam},
        "models": [{"model": e, "parameters": {"weight": 1.0}} for e in experts],
    })  # fmt: skip


def compare_on_test(
    base: str, experts: list[str], best_recipe: Any
) -> tuple[list[str], list[tuple[str, dict]]]:
    """Rows (label, {task: exact match}) on the test split: base, experts, tuned TA, search best."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluate.lmeval import LMEvalSpec
    from evomerge.merge.engine import ResidentPool, apply_in_place
    from evomerge.references import locate

    torch.set_num_threads(2)
    test = LMEvalSpec(tasks=("zoo",), batch_size=128).build()
    val = LMEvalSpec(tasks=("zoo_search",), batch_size=128).build()
    tokenizer = AutoTokenizer.from_pretrained(locate(base))
    model = AutoModelForCausalLM.from_pretrained(locate(base), dtype=torch.float32).eval()
    pool = ResidentPool.from_refs([*experts, base])
    rows = []
    for label, path in [("base", base)] + [(Path(e).name, e) for e in experts]:
        single = AutoModelForCausalLM.from_pretrained(locate(path), dtype=torch.float32).eval()
        rows.append((label, test.evaluate(single, tokenizer).scores))
    tuned = []
    for lam in LAMBDAS:
        apply_in_place(task_arithmetic(base, experts, lam), pool, model)
        tuned.append((sum(val.evaluate(model, tokenizer).scores.values()), lam))
    lam = max(tuned)[1]
    apply_in_place(task_arithmetic(base, experts, lam), pool, model)
    rows.append(
        (f"task arithmetic, lambda {lam} (tuned on validation)", test.evaluate(model, tokenizer).scores)
    )
    apply_in_place(best_recipe, pool, model)
    rows.append(("evomerge search best", test.evaluate(model, tokenizer).scores))
    return test.task_names, rows


def export_best(run_dir: Path) -> Any:
    """The search's best candidate as a Hugging Face model dir in RUN_DIR/best_model (the demo's last step)."""
    from evomerge.export import export

    return export(run_dir, run_dir / "best_model", pick="best", force=True)
