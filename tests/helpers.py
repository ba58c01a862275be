"""Test helpers: tiny checkpoints built in tmp dirs (no downloads; see evomerge.zoo), mergekit's own merge,
journal reading, engine-test run configs, and subprocesses started (and killed) with their process group."""

from evomerge.zoo import make_random_family as make_pool
from evomerge.zoo import make_random_llama as make_llama

__all__ = [
    "evomerge_command",
    "free_ports",
    "journal_records",
    "kill_group",
    "make_llama",
    "make_pool",
    "mc_task_yaml",
    "run_config",
    "run_config_data",
    "run_mergekit",
    "spawn",
    "synthetic_evaluator",
    "Q0_Q1",
]


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
    from evomerge.journal import read_journal

    events = read_journal(run_dir / "journal.jsonl", repair=False)
    asked = [c for e in events if e["event"] == "ask" for c in e["candidates"]]
    return events, asked, {e["id"]: e for e in events if e["event"] == "result"}


def mc_task_yaml(task, loader, *settings):
    """lm-eval's YAML for a multiple-choice task over rows {prompt, choices, label} that `utils.<loader>` returns,
    scored by accuracy; `settings`: more YAML lines (its splits, few-shot settings)."""
    lines = [f"task: {task}", f"custom_dataset: !function utils.{loader}", "output_type: multiple_choice", *settings,
             'doc_to_text: "{{prompt}}"', 'doc_to_choice: "{{choices}}"', 'doc_to_target: "{{label}}"',
             "metric_list:", "  - metric: acc", "    aggregation: mean", "    higher_is_better: true",
             "metadata:", "  version: 1.0"]  # fmt: skip
    return "\n".join(lines) + "\n"


def run_config_data(name, run_dir, base, sources, *, space, strategy, evaluator=None, candidates, **extra):
    """A run config (a dict, as its YAML holds it) for an engine test: two workers on the CPU, tracking off,
    output in `run_dir`, the digits evaluator unless told; `extra` adds or replaces top-level keys."""
    return {
        "name": name,
        "models": {"base": str(base), "sources": [str(s) for s in sources]},
        "space": space,
        "strategy": strategy,
        "evaluator": evaluator or {"type": "digits"},
        "budget": {"candidates": candidates},
        "workers": {"count": 2},
        "tracking": {"enabled": False},
        "device": "cpu",
        "output": str(run_dir),
        **extra,
    }


def synthetic_evaluator(function="quadratic", module="evomerge.evaluate.synthetic", **kwargs):
    """A function evaluator (no model read) over the synthetic objectives q0, q1 (or a faulty one)."""
    return {"type": "function", "function": f"{module}:{function}", "kwargs": kwargs}


Q0_Q1 = [{"name": "q0"}, {"name": "q1"}]  # the synthetic evaluators' objectives


def run_config(*args, **kwargs):
    """`run_config_data(...)` parsed into a RunConfig."""
    from evomerge.config import parse_config

    return parse_config(run_config_data(*args, **kwargs), "test")


def free_ports(n=1):
    """`n` distinct free TCP ports on 127.0.0.1 (all bound at once while chosen, so no two are the same)."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def spawn(cmd, **kwargs):
    """A subprocess in a session of its own, so that `kill_group` also reaches what it starts (Ray's
    processes, MLflow's uvicorn workers)."""
    import subprocess

    return subprocess.Popen(cmd, start_new_session=True, **kwargs)


def evomerge_command(*args):
    """`python -m evomerge ARGS` with this interpreter."""
    import sys

    return [sys.executable, "-m", "evomerge", *map(str, args)]


def kill_group(proc, sig=None, timeout=None):
    """Send `sig` (SIGKILL) to the process group `spawn` started (already gone: fine), then reap its leader."""
    import contextlib
    import os
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig or signal.SIGKILL)
    proc.wait(timeout=timeout)
