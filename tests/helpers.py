"""Tiny checkpoints built in tmp dirs (no downloads); see evomerge.zoo."""

from evomerge.zoo import make_random_family as make_pool
from evomerge.zoo import make_random_llama as make_llama

__all__ = ["make_llama", "make_pool", "run_mergekit"]


def run_mergekit(config, out, seed=None):
    """mergekit 0.1.5's own merge of a config dict into `out`, in-process; restores the RNG states its seeding
    touches (the comparisons must not change what later tests draw)."""
    import random

    import numpy as np
    import torch
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=seed)
        run_merge(MergeConfiguration.model_validate(config), str(out), options=options)
    random.setstate(py_state)
    np.random.set_state(np_state)
    return out


def journal_records(run_dir):
    """(events, asked candidates in ask order, result events by id) of a run's journal, read without repair."""
    from evomerge.runtime.journal import read_journal

    events = read_journal(run_dir / "journal.jsonl", repair=False)
    asked = [c for e in events if e["event"] == "ask" for c in e["candidates"]]
    return events, asked, {e["id"]: e for e in events if e["event"] == "result"}
