"""Evaluators that misbehave on purpose, for the reliability tests (tests/test_reliability.py,
docs/reliability.md): use them as `evaluator: {type: function, function: "evomerge.evaluate.faulty:<name>"}`.
Which candidates misbehave depends on the recipe alone (a hash), so a run replays, and `once` faults remember
in `marks` (a directory shared by the workers) that they already fired."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from evomerge.evaluate.synthetic import quadratic


def _fraction(recipe: Any) -> float:
    """A number in [0, 1) fixed by the recipe, models named by their directory's name only: which recipes fail
    must not depend on where a test's temporary models happen to live (pytest-NN)."""
    text = json.dumps(recipe.to_dict(), sort_keys=True, default=str)
    for ref in recipe.referenced_models():
        text = text.replace(json.dumps(str(ref))[1:-1], Path(ref).name)
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 16**8


def _first_time(recipe: Any, marks: str) -> bool:
    """True the first time any worker asks for this recipe (an atomic O_EXCL file in `marks`)."""
    text = json.dumps(recipe.to_dict(), sort_keys=True, default=str)
    path = Path(marks) / hashlib.sha256(text.encode()).hexdigest()[:16]
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def faulty(
    recipe: Any,
    mode: str = "raise",
    fraction: float = 0.25,
    marks: str | None = None,
    seconds: float = 0.0,
    **_ignored: Any,
) -> dict[str, Any]:
    """The quadratic objectives of `evomerge.evaluate.synthetic`, except for a `fraction` of the recipes:
    `raise` (RuntimeError), `hang` (sleep an hour), `exit` (the process dies), `nan` (q0 = NaN), `inf`,
    `missing` (no q1), `shape` (q0 a list). With `marks`, a fault fires only on a recipe's first attempt (the
    retry succeeds)."""
    time.sleep(seconds)
    scores: dict[str, Any] = quadratic(recipe)
    if _fraction(recipe) >= fraction or (marks is not None and not _first_time(recipe, marks)):
        return scores
    if mode == "raise":
        raise RuntimeError("injected evaluator fault")
    if mode == "hang":
        time.sleep(3600)
    if mode == "exit":  # the worker process dies (Ray restarts it)
        os._exit(1)
    if mode == "nan":
        scores["q0"] = math.nan
    elif mode == "inf":
        scores["q1"] = -math.inf
    elif mode == "missing":
        del scores["q1"]
    elif mode == "shape":
        scores["q0"] = [scores["q0"], 0.0]
    return scores
