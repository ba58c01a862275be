"""`evomerge sync RUN_DIR`: make the store match the journal, idempotently (also what a resumed run's
tracker does first)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from evomerge.errors import one_line
from evomerge.tracking.record import Record, load_record
from evomerge.tracking.state import write_state
from evomerge.tracking.store import Store, TrackingError, default_uri


def sync(run_dir: str | Path, *, uri: str | None = None) -> dict[str, Any]:
    """Make the tracking store match the run's journal: parent and children created where missing, wrong or
    missing metrics, tags and names fixed, duplicate children removed, artifacts written when anything
    changed or some are missing. Idempotent: a second call changes nothing. `uri`: another store than the
    run's own (its config's `tracking.uri`, else `sqlite:///RUN_DIR/mlflow.db`)."""
    run_dir = Path(run_dir)
    config, record = load_record(run_dir, finish=False)  # a live run fixes r itself, from its 10th result
    uri = uri or config.tracking.uri or default_uri(run_dir)
    try:
        store = Store(uri, run_dir, config, record)
        store.attach(fresh=False)
        report = sync_store(store, record, config.tracking.children)
    except TrackingError:
        raise
    except Exception as e:  # noqa: BLE001 - any store failure is one line for the user
        raise TrackingError(f"tracking store {uri}: {one_line(e)}") from None
    write_state(
        run_dir,
        uri=uri,
        needs_sync=False,
        experiment_id=store.experiment_id,
        parent_run_id=store.parent_id,
    )
    return report


def child_ids(record: Record, children: str, ids: Iterable[str]) -> list[str]:
    """The candidates that get child runs: all, or (`children: front`) those ever on the front so far."""
    if children == "all":
        return list(ids)
    record.ever_front |= record.front()
    return [c for c in ids if c in record.ever_front]


def sync_store(store: Store, record: Record, children: str = "all") -> dict[str, Any]:
    created = updated = 0
    for cid in child_ids(record, children, record.candidates):
        outcome = store.push_child(cid)
        created += outcome == 1
        updated += outcome == 2
    metrics = store.push_parent()
    changed = bool(created or updated or metrics or store.removed)
    if changed or not store.has_artifacts():
        store.upload(record)
    if record.ended:
        store.set_parent_status("FINISHED")
    return {
        "uri": store.uri,
        "experiment_id": store.experiment_id,
        "parent_run_id": store.parent_id,
        "children": len(record.candidates),
        "created": created,
        "updated": updated,
        "removed": store.removed,
        "parent_metrics": metrics,
        "changed": changed,
    }
