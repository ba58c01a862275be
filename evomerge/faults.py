"""Fault injection for the reliability tests (tests/test_reliability.py, docs/reliability.md).

`EVOMERGE_FAULT=<point>:<n>` makes the process SIGKILL itself the n-th time it reaches `<point>` (counted
from 1 in this process): a crash at a named moment, which a random delay cannot hit reliably. Points:
- `ask`: the strategy has proposed candidates, the journal does not hold them yet;
- `journal_write`: half of a journal line is on disk (a torn last line), the rest never comes.
Unset (always, outside tests), `fault_point` is one global read.

Evaluators that misbehave on purpose are in `evomerge.evaluate.faulty`.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
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
