"""Fault injection for the reliability tests (tests/test_reliability.py, docs/reliability.md).

`EVOMERGE_FAULT=<point>:<n>` makes the process SIGKILL itself the n-th time it reaches `<point>` (counted
from 1 in this process): a crash at a named moment, which a random delay cannot hit reliably. Points:
- `ask`: the strategy has proposed candidates, the journal does not hold them yet;
- `journal_write`: half of a journal line is on disk (a torn last line), the rest never comes.
Unset (always, outside tests), `fault_point` is one global read.

The evaluators below misbehave on purpose; use them as `evaluator: {type: function, function:
"evomerge.faults:<name>"}`. Which candidates misbehave depends on the recipe alone (a hash), so a run
replays, and `once` faults remember in `marks` (a directory shared by the workers) that they already fired.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_spec = os.environ.get("EVOMERGE_FAULT", "")
_PLAN: tuple[str, int] | None = None
if _spec:
    _point, _, _n = _spec.partition(":")
    _PLAN = (_point, int(_n or 1))
_hits: dict[str, int] = {}


def fault_point(name: str, before: Callable[[], Any] | None = None) -> None:
    """Die here (after `before()`) when EVOMERGE_FAULT names this point and this is its n-th visit."""
    if _PLAN is None or _PLAN[0] != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == _PLAN[1]:
        if before is not None:
            before()
        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------------------------ evaluators


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
    `raise` (RuntimeError), `hang` (sleep an hour), `nan` (q0 = NaN), `inf`, `missing` (no q1), `shape`
    (q0 a list). With `marks`, a fault fires only on a recipe's first attempt (the retry succeeds)."""
    from evomerge.evaluate.synthetic import quadratic

    time.sleep(seconds)
    scores: dict[str, Any] = quadratic(recipe)
    if _fraction(recipe) >= fraction or (marks is not None and not _first_time(recipe, marks)):
        return scores
    if mode == "raise":
        raise RuntimeError("injected evaluator fault")
    if mode == "hang":
        time.sleep(3600)
    if mode == "nan":
        scores["q0"] = math.nan
    elif mode == "inf":
        scores["q1"] = -math.inf
    elif mode == "missing":
        del scores["q1"]
    elif mode == "shape":
        scores["q0"] = [scores["q0"], 0.0]
    return scores
