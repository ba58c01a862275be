"""Tiny checkpoints built in tmp dirs (no downloads); see evomerge.zoo."""

from evomerge.zoo import make_random_family as make_pool
from evomerge.zoo import make_random_llama as make_llama

__all__ = ["make_llama", "make_pool"]


def journal_records(run_dir):
    """(events, asked candidates in ask order, result events by id) of a run's journal, read without repair."""
    from evomerge.runtime.journal import read_journal

    events = read_journal(run_dir / "journal.jsonl", repair=False)
    asked = [c for e in events if e["event"] == "ask" for c in e["candidates"]]
    return events, asked, {e["id"]: e for e in events if e["event"] == "result"}
