"""Loader of the zoo tasks' bundled data, referenced from the YAMLs as `!function utils.load_zoo_split`.

lm-eval imports this file by path (next to the YAMLs), so it only uses the standard library and datasets
and finds the data relative to itself: the tasks work offline and from any current directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

DATA_DIR = Path(__file__).resolve().parent / "data"


def read_rows(skill: str, split: str) -> list[dict[str, str]]:
    """Rows {"prompt", "answer"} of data/{skill}_{split}.jsonl, in file order."""
    path = DATA_DIR / f"{skill}_{split}.jsonl"
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_zoo_split(skill: str, split: str, **_: object) -> datasets.DatasetDict:
    """lm-eval `custom_dataset`: called with the task's metadata and `dataset_kwargs` (skill, split)."""
    return datasets.DatasetDict({split: datasets.Dataset.from_list(read_rows(skill, split))})
