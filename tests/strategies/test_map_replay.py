"""Every MAP journal of experiments/map_front replays, in a fresh process, to the candidates it recorded (what
`evomerge resume` does): the surrogate fits are bit-reproducible (`evomerge.strategies.levenberg`)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
JOURNALS = sorted((ROOT / "experiments" / "map_front" / "journals").glob("*/journal.jsonl"))

REPLAY = """
import sys
from pathlib import Path

from evomerge.config import load_config
from evomerge.journal import pinned_models, read_journal
from evomerge.runtime.run import build_strategy, objectives_of
from evomerge.runtime.search import Objectives, replay
from evomerge.space import build_space

for run in map(Path, sys.argv[1:]):
    config = load_config(run / "config.yaml")
    events = read_journal(run / "journal.jsonl", repair=False)
    base, sources = pinned_models(events)  # as the run pinned them: no model is read
    objectives = Objectives(objectives_of(config))
    strategy = build_strategy(config, build_space(config, base, sources), objectives.items)
    state = replay(events, strategy, objectives)  # raises ResumeError at the first candidate that differs
    print(run.name, len(state.candidates), "candidates replayed")
"""


def _replay(runs: list[Path]) -> None:
    out = subprocess.run(
        [sys.executable, "-c", REPLAY, *map(str, runs)], capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == len(runs) and all("candidates replayed" in line for line in lines), out.stdout


def test_the_journal_that_diverged_under_curve_fit_replays():
    """map_s2 is the run whose replay diverged at its first front point when the surrogates were fitted by
    scipy's curve_fit (MINPACK's trajectory depended on the last bits of BLAS); one journal keeps make test short."""
    _replay([ROOT / "experiments" / "map_front" / "journals" / "map_s2"])


@pytest.mark.slow  # 9 journals, ~1 min
def test_every_map_front_journal_replays_in_a_fresh_process():
    assert len(JOURNALS) >= 9, "experiments/map_front/run.py keeps each MAP run's journal"
    _replay([j.parent for j in JOURNALS])
