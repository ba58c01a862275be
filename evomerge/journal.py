"""The run journal: an append-only JSONL file, the source of truth of a run.

One line per event, flushed and fsynced before the driver acts on it:
- `start` / `resume`: a driver session began (config hash, seed, version);
- `ask`: the strategy was asked for n candidates (the candidates, with genomes and recipes);
- `result`: a candidate's final result (scores, objectives, per-sample scores, status, attempts);
- `tell`: the strategy was told these ids, in this order;
- `fidelity` (reduced-fidelity runs): item counts per task, the sources' per-item scores for estimators;
- `rung` (racing): a candidate's scores on one slice of items and the decision (promote / stop / done);
- `rescore`: a candidate's scores on every item after the search (the winner's-curse guard);
- `end`: the budget was reached.

A driver killed mid-write leaves a torn last line: `read` drops it (with a warning) and truncates the file
back to the last complete line, so the event simply did not happen and the resumed run redoes it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.faults import fault_point

log = logging.getLogger(__name__)


class JournalError(EvomergeError):
    pass


class Journal:
    """Appends events, each written whole (a kill leaves at most a torn last line) and fsynced: at once, or, in a
    `grouped()` block, at the next `sync()` (the search calls it before it acts outside the driver: before a
    dispatch and before it waits), one fsync for the many events a batch of results brings."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - kept open for the run
        self._grouped = False
        self._unsynced = False

    def append(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, separators=(",", ":"), allow_nan=False).encode() + b"\n"
        fault_point("journal_write", lambda: self._file.write(line[: len(line) // 2]))  # tests only
        self._file.write(line)
        self._unsynced = True
        if not self._grouped:
            self.sync()

    def sync(self) -> None:
        if self._unsynced:
            os.fsync(self._file.fileno())
            self._unsynced = False

    @contextlib.contextmanager
    def grouped(self) -> Iterator[None]:
        self._grouped = True
        try:
            yield
        finally:
            self._grouped = False
            self.sync()

    def close(self) -> None:
        self.sync()
        self._file.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_journal(path: str | Path, *, repair: bool = True) -> list[dict[str, Any]]:
    """All complete events. A torn final line is dropped (and cut from the file when `repair`); a bad line
    anywhere else means the file was edited or corrupted: an error naming the line."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    events, good_end = [], 0
    lines = raw.split(b"\n")
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        if last and not line:
            break
        try:
            if last:  # no trailing newline: the write of this line did not finish
                raise ValueError("no newline")
            events.append(json.loads(line))
            good_end += len(line) + 1
        except ValueError:
            if last or (i == len(lines) - 2 and not lines[-1]):
                log.warning(
                    "%s: dropping a torn last line (%d bytes) left by an interrupted write", path, len(line)
                )
                if repair:
                    with open(path, "r+b") as f:
                        f.truncate(good_end)
                        os.fsync(f.fileno())
                break
            raise JournalError(
                f"{path}: line {i + 1} is not valid JSON (the journal was modified or corrupted)"
            ) from None
    return events


def apply_rescore(result: dict[str, Any], rescore: dict[str, Any]) -> dict[str, Any]:
    """The result as reported after the winner's-curse guard: full-item scores, the search's own in `estimate`."""
    fidelity = {**result.get("fidelity", {}), "exact": True, "rescored": True}
    estimate = {"scores": result["scores"], "objectives": result["objectives"]}
    return {**result, "scores": rescore["scores"], "objectives": rescore["objectives"], "fidelity": fidelity,
            "estimate": estimate}  # fmt: skip


def final_results(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each candidate's result as reported: its first `result` event, with a later `rescore` applied."""
    results: dict[str, dict[str, Any]] = {}
    for e in events:
        if e["event"] == "result":
            results.setdefault(e["id"], e)
        elif e["event"] == "rescore" and e["id"] in results:
            results[e["id"]] = apply_rescore(results[e["id"]], e)
    return results


def pinned_models(events: list[dict[str, Any]]) -> tuple[str, list[str]] | None:
    """(base, sources) as the run's `start` event recorded them (pinned to commits and absolute paths), or
    None: no start yet, or a journal written before models were pinned."""
    start = next((e for e in events if e["event"] == "start"), None)
    if start is None or "models" not in start:
        return None
    return start["models"]["base"], list(start["models"]["sources"])
