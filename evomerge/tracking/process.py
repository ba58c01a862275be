"""The tracking process (started by `MLflowTracker`): follow the journal, push to the store every
`flush_seconds`, refresh the artifacts; on failure, say so once and leave `needs_sync` for `evomerge sync`."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from evomerge.config import Objective, RunConfig
from evomerge.errors import one_line
from evomerge.tracking.record import Record, journal_objectives
from evomerge.tracking.redact import redact_url
from evomerge.tracking.state import write_state
from evomerge.tracking.store import Store
from evomerge.tracking.sync import child_ids

log = logging.getLogger(__name__)


class _Follower:
    """The journal's complete lines as they are appended (a line still being written waits for its newline)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.partial = path, 0, b""

    def read(self) -> list[dict[str, Any]]:
        try:
            size = self.path.stat().st_size
        except OSError:
            return []
        if size <= self.offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read(size - self.offset)
        self.offset += len(chunk)
        *lines, self.partial = (self.partial + chunk).split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]


class _Tracking:
    """The tracking process: follow the journal, push to the store, refresh the artifacts."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.run_dir = Path(spec["run_dir"])
        self.uri = spec["uri"]
        self.config = RunConfig.model_validate(spec["config"])
        self.flush_seconds = float(spec["flush_seconds"])
        self.artifact_every, self.artifact_seconds = (
            int(spec["artifact_every"]),
            float(spec["artifact_seconds"]),
        )
        self.resumed = bool(spec["resumed"])
        self.spec_models = spec.get("models")
        self.follower = _Follower(self.run_dir / "journal.jsonl")
        events = self.follower.read()
        objectives = spec["objectives"]
        objectives = (
            [Objective(**o) for o in objectives]
            if objectives is not None
            else journal_objectives(self.config, events)
        )
        self.record = Record(objectives, strategy=self.config.strategy.name, gene_names=spec["gene_names"])
        for ev in events:
            self.record.apply(ev)
        self.store: Store | None = None
        self.needs_sync = False
        self.wake = threading.Event()
        self.end_seen = self.close_seen = self.eof = False
        write_state(self.run_dir, uri=self.uri, needs_sync=False, gene_names=spec["gene_names"])

    def listen(self) -> None:
        """Control lines from the driver: `end` (the search is over), `close`; EOF: the driver is gone."""
        for raw in sys.stdin:
            line = raw.strip()
            self.end_seen |= line == "end"
            self.close_seen |= line == "close"
            self.wake.set()
        self.eof = True
        self.wake.set()

    def fail(self, e: BaseException) -> None:
        if not self.needs_sync:
            log.warning(
                "MLflow tracking to %s stopped (%s); the search goes on; bring the store up to date "
                "later with `evomerge sync %s`",
                redact_url(self.uri),
                one_line(e),
                self.run_dir,
            )
        self.needs_sync = True
        write_state(self.run_dir, needs_sync=True)

    def run(self) -> int:
        threading.Thread(target=self.listen, name="evomerge-control", daemon=True).start()
        record = self.record
        try:
            self.store = Store(self.uri, self.run_dir, self.config, record, models=self.spec_models)
            self.store.attach(fresh=not self.resumed)
            write_state(
                self.run_dir, experiment_id=self.store.experiment_id, parent_run_id=self.store.parent_id
            )
            self.store.set_parent_status("RUNNING")
        except Exception as e:  # noqa: BLE001 - tracking must never stop the search
            self.fail(e)
        with contextlib.suppress(ImportError):  # now, not in the final flush that the driver waits for
            import matplotlib.backends.backend_agg  # noqa: F401
        dirty: set[str] = set(record.candidates)
        front: set[str] = set()
        last_upload, uploaded_at = -1, time.monotonic()
        while True:
            final = self.end_seen or self.close_seen or self.eof
            for ev in self.follower.read():
                record.apply(ev)
                if ev.get("event") == "ask":
                    dirty.update(c["id"] for c in ev["candidates"])
                elif ev.get("event") in ("result", "rescore"):
                    dirty.add(ev["id"])
            if final:
                record.finish()
            new_front = record.front()
            dirty |= front ^ new_front
            front = set(new_front)
            if not self.needs_sync:
                try:
                    last_upload, uploaded_at = self.flush(dirty, final, last_upload, uploaded_at)
                except Exception as e:  # noqa: BLE001
                    self.fail(e)
            if final:
                if not self.needs_sync:
                    write_state(self.run_dir, needs_sync=False)
                return 3 if self.needs_sync else 0
            self.wake.wait(self.flush_seconds)
            self.wake.clear()

    def flush(self, dirty: set[str], final: bool, last_upload: int, uploaded_at: float) -> tuple[int, float]:
        store, record = self.store, self.record
        assert store is not None
        for cid in sorted(
            child_ids(record, self.config.tracking.children, dirty),
            key=lambda c: (record.steps.get(c, 1 << 30), c),
        ):
            store.push_child(cid)
        dirty.clear()
        store.push_parent()
        n = len(record.results)
        due = n - last_upload >= self.artifact_every or (
            n > last_upload and time.monotonic() - uploaded_at >= self.artifact_seconds
        )
        if due or (final and n != last_upload):
            store.upload(record)
            last_upload, uploaded_at = n, time.monotonic()
        if final:
            if record.ended:
                status = "FINISHED"
            else:  # the session ended before the budget: interrupted (or failed, when the driver said close)
                status = "FAILED" if self.close_seen and not self.end_seen else "KILLED"
            store.set_parent_status(status)
        return last_upload, uploaded_at


def serve(spec: dict[str, Any]) -> None:
    """The tracking process (`MLflowTracker` starts it with `_BOOT`): follow the journal until told to stop."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        tracking = _Tracking(spec)
    except Exception as e:  # noqa: BLE001
        log.warning(
            "MLflow tracking not started (%s); run `evomerge sync %s` later",
            one_line(e),
            spec.get("run_dir"),
        )
        write_state(Path(spec["run_dir"]), needs_sync=True)
        sys.exit(3)
    code = tracking.run()
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)  # everything is committed; skip tearing down ~3000 modules (0.5 s)
