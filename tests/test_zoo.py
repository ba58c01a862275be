"""The trained demo zoo (evomerge.zoo) and its bundled lm-eval tasks (evomerge/evaluate/tasks/zoo)."""

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from evomerge import zoo as zoo_mod
from evomerge.cli import app
from evomerge.zoo import (
    BOS,
    CHARS,
    HARD_LENGTHS,
    SKILLS,
    SPLIT_SIZES,
    TASK_SPLIT_SIZES,
    ZooSettings,
    build_zoo,
    greedy_exact_match,
    load_zoo,
    open_zoo,
    split_of,
    write_task_data,
)

TASK_DIR = Path(zoo_mod.__file__).parent / "evaluate" / "tasks" / "zoo"
DATA_DIR = TASK_DIR / "data"


def _rows(skill, split):
    return [json.loads(line) for line in (DATA_DIR / f"{skill}_{split}.jsonl").read_text().splitlines()]


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32
    ).eval(), AutoTokenizer.from_pretrained(path)


# --- task data (no zoo needed) ---------------------------------------------------------------------------


def test_task_data_is_deterministic_and_matches_the_bundled_files(tmp_path):
    first = write_task_data(tmp_path / "a", seed=0)
    second = write_task_data(tmp_path / "b", seed=0)
    assert [p.name for p in first] == [p.name for p in second]
    assert sorted(p.name for p in first) == sorted(p.name for p in DATA_DIR.glob("*.jsonl"))
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes()
        assert a.read_bytes() == (DATA_DIR / a.name).read_bytes(), (
            f"{a.name}: regenerate with write_task_data"
        )
    other = write_task_data(tmp_path / "c", seed=1)
    assert other[0].read_bytes() != first[0].read_bytes()


def test_splits_are_disjoint_held_out_and_correct():
    for name, skill in SKILLS.items():
        seen = {}
        for split, n in SPLIT_SIZES.items():
            rows = _rows(name, split)
            prompts = [r["prompt"] for r in rows]
            assert len(rows) == n and len(set(prompts)) == n
            for r in rows:
                x = r["prompt"].removeprefix(f"{name}:").removesuffix("=")
                assert HARD_LENGTHS[0] <= len(x) <= HARD_LENGTHS[1]
                assert skill.fn(x) == r["answer"]
                assert split_of(r["prompt"]) == split  # the rule training samples are filtered by
            seen[split] = set(prompts)
        assert not seen["validation"] & seen["test"]


def test_training_samples_never_hit_held_out_prompts():
    import random

    held_out = {r["prompt"] for name in SKILLS for split in SPLIT_SIZES for r in _rows(name, split)}
    rng = random.Random(0)
    for skill in SKILLS.values():
        for _ in range(3000):
            prompt, _answer = zoo_mod._skill_example(rng, skill, HARD_LENGTHS)
            assert prompt not in held_out


def test_task_yamls_cover_every_skill_and_leave_room_for_the_longest_answer():
    template = yaml.load((TASK_DIR / "_zoo_template.yaml").read_text(), Loader=yaml.BaseLoader)
    longest = max(len(r["answer"]) for name in SKILLS for split in SPLIT_SIZES for r in _rows(name, split))
    assert int(template["generation_kwargs"]["max_gen_toks"]) == longest + 1
    groups = {g: yaml.safe_load((TASK_DIR / f"{g}.yaml").read_text())["task"] for g in ("zoo", "zoo_search")}
    assert groups == {"zoo": [f"zoo_{s}" for s in SKILLS], "zoo_search": [f"zoo_{s}_search" for s in SKILLS]}
    for s in SKILLS:
        for task, split in ((f"zoo_{s}", "test"), (f"zoo_{s}_search", "validation")):
            cfg = yaml.load((TASK_DIR / f"{task}.yaml").read_text(), Loader=yaml.BaseLoader)
            assert cfg["task"] == task and cfg["dataset_kwargs"] == {"skill": s, "split": split}


def test_search_split_is_large_disjoint_and_drawn_from_the_validation_bucket():
    assert TASK_SPLIT_SIZES == {**SPLIT_SIZES, "search": 1000}
    for name, skill in SKILLS.items():
        prompts = [r["prompt"] for r in _rows(name, "search")]
        assert len(prompts) == len(set(prompts)) == 1000
        for r in _rows(name, "search"):
            x = r["prompt"].removeprefix(f"{name}:").removesuffix("=")
            assert HARD_LENGTHS[0] <= len(x) <= HARD_LENGTHS[1] and skill.fn(x) == r["answer"]
        assert all(split_of(p) == "validation" for p in prompts)  # never training, never test
        others = {r["prompt"] for split in SPLIT_SIZES for r in _rows(name, split)}
        assert not set(prompts) & others


def test_search_split_is_deterministic_and_only_adds_files(tmp_path):
    written = {p.name: p for p in write_task_data(tmp_path, seed=0)}
    for name in SKILLS:
        path = written[f"{name}_search.jsonl"]
        assert path.read_bytes() == (DATA_DIR / path.name).read_bytes()
    alone = zoo_mod.task_data(0, {"search": 1000})  # same rows without asking for the other splits
    assert all(alone[name]["search"] == _rows(name, "search") for name in SKILLS)
    seed1 = zoo_mod.task_data(1, TASK_SPLIT_SIZES)
    for name in SKILLS:
        assert not {r["prompt"] for r in seed1[name]["search"]} & {
            r["prompt"] for r in seed1[name]["validation"]
        }


def test_training_samples_never_hit_search_prompts():
    import random

    search = {r["prompt"] for name in SKILLS for r in _rows(name, "search")}
    rng = random.Random(1)
    for skill in SKILLS.values():
        for _ in range(3000):
            assert zoo_mod._skill_example(rng, skill, HARD_LENGTHS)[0] not in search


def test_search1k_tasks_read_the_search_split():
    group = yaml.safe_load((TASK_DIR / "zoo_search1k.yaml").read_text())
    assert group["group"] == "zoo_search1k" and group["task"] == [f"zoo_{s}_search1k" for s in SKILLS]
    for s in SKILLS:
        cfg = yaml.load((TASK_DIR / f"zoo_{s}_search1k.yaml").read_text(), Loader=yaml.BaseLoader)
        assert cfg["task"] == f"zoo_{s}_search1k" and cfg["validation_split"] == "search"
        assert cfg["dataset_kwargs"] == {"skill": s, "split": "search"}


def test_lm_eval_builds_the_search1k_documents_in_file_order():
    from evomerge.evaluate.lmeval import LMEvalSpec

    ev = LMEvalSpec(tasks=("zoo_search1k",)).build()
    assert ev.task_names == [f"zoo_{s}_search1k" for s in SKILLS]
    for s, run in zip(SKILLS, ev.runs):
        assert [doc["prompt"] for _, doc in run.docs] == [r["prompt"] for r in _rows(s, "search")]


def test_tokenizer_round_trips_every_character(tmp_path):
    from transformers import AutoTokenizer

    zoo_mod.make_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert (tok.padding_side, tok.pad_token, tok.bos_token, tok.eos_token) == ("left", "<pad>", "<s>", "</s>")
    for text in (CHARS, "rev:abc=cba", " a\nb ", "sort:90210=", "Zz:=+-"):
        ids = tok(text)["input_ids"]
        assert ids == [BOS, *zoo_mod.encode(text)]
        assert tok.decode(ids, skip_special_tokens=True) == text
    batch = tok(["up:ab=", "shift:abcd="], padding="longest")
    assert batch["input_ids"][0][:5] == [tok.pad_token_id] * 5 and batch["attention_mask"][0][:5] == [0] * 5


# --- the zoo ----------------------------------------------------------------------------------------------


@pytest.mark.slow  # the trained zoo (~3.5 min to build)
def test_zoo_layout_and_reuse(zoo):
    assert list(zoo) == ["base", *(f"expert_{s}" for s in SKILLS)]
    root = zoo["base"].parent
    for path in zoo.values():
        assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
            p.name for p in path.iterdir()
        }
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    start = time.perf_counter()
    again = build_zoo(root, seed=0)
    assert time.perf_counter() - start < 1.0
    assert again == zoo


@pytest.mark.slow  # the trained zoo (~3.5 min to build)
def test_zoo_is_not_reused_when_incomplete_or_different(zoo, tmp_path):
    copy = tmp_path / "zoo"
    shutil.copytree(zoo["base"].parent, copy)
    assert load_zoo(copy, seed=0) is not None
    assert load_zoo(copy, seed=1) is None
    assert load_zoo(copy, seed=0, settings=ZooSettings(expert_steps=10)) is None
    shutil.rmtree(copy / "expert_up")
    assert load_zoo(copy, seed=0) is None
    (copy / "zoo.json").unlink()
    assert load_zoo(copy, seed=0) is None


def test_open_zoo_uses_a_zoo_built_with_any_settings_and_refuses_an_incomplete_one(quick_zoo, tmp_path):
    root = quick_zoo["base"].parent
    start = time.perf_counter()
    assert open_zoo(root) == quick_zoo  # as built: the tools pointed at it do not retrain it
    assert time.perf_counter() - start < 1.0
    assert load_zoo(root, seed=0) is None  # not the default settings
    copy = tmp_path / "zoo"
    shutil.copytree(root, copy)
    shutil.rmtree(copy / "expert_up")
    assert open_zoo(copy) is None
    assert open_zoo(tmp_path / "nothing") is None


@pytest.mark.slow  # the trained zoo (~3.5 min to build)
def test_zoo_scores_experts_specialise_and_task_arithmetic_beats_each(zoo):
    root = zoo["base"].parent
    report = json.loads((root / "SCORES.json").read_text())
    scores = report["scores"]
    assert (root / "SCORES.md").read_text().count("\n| ") == len(scores) + 1
    merged = next(v for k, v in scores.items() if k.startswith("task arithmetic"))
    for skill in SKILLS:
        row = scores[f"expert_{skill}"]
        assert row[skill] >= 90.0, (skill, row)
        assert all(row[other] <= 50.0 for other in SKILLS if other != skill), (skill, row)
        assert merged["avg"] > row["avg"], (merged, row)


@pytest.mark.slow  # the trained zoo (~3.5 min to build)
def test_greedy_exact_match_scores_the_bundled_test_split(zoo):
    model, tok = _load(zoo["expert_sort"])
    rows = _rows("sort", "test")
    hits = greedy_exact_match(model, tok, [r["prompt"] for r in rows], [r["answer"] for r in rows])
    assert hits.shape == (len(rows),) and set(np.unique(hits)) <= {0.0, 1.0}
    scores = json.loads((zoo["base"].parent / "SCORES.json").read_text())["scores"]
    assert 100 * hits.mean() == pytest.approx(scores["expert_sort"]["sort"])
    # order of the prompts does not matter; a too short budget fails everything
    perm = np.random.default_rng(0).permutation(len(rows))
    shuffled = greedy_exact_match(
        model, tok, [rows[i]["prompt"] for i in perm], [rows[i]["answer"] for i in perm]
    )
    assert np.array_equal(shuffled, hits[perm])
    assert (
        greedy_exact_match(model, tok, [rows[0]["prompt"]], [rows[0]["answer"]], max_new_tokens=2).sum() == 0
    )


@pytest.mark.slow  # the trained zoo (~3.5 min to build)
def test_lm_eval_on_the_bundled_tasks_agrees_with_greedy_exact_match(zoo, tmp_path):
    """lm-eval itself (TaskManager + HFLM on the model object) gives the same per-sample exact match."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from evomerge.merge.engine import merge_to_dir
    from evomerge.merge.mergekit_io import recipe_from_dict

    merged = merge_to_dir(recipe_from_dict(zoo_mod.merge_recipe(zoo, 0.6)), tmp_path / "merged")
    model, tok = _load(merged)  # a merge: partial scores on every skill, so the comparison means something
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    result = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tok, batch_size=64),
        tasks=["zoo_search"],
        task_manager=manager,
        log_samples=True,
    )
    prompts, answers, theirs = [], [], []
    for skill in SKILLS:
        rows = _rows(skill, "validation")
        samples = sorted(result["samples"][f"zoo_{skill}_search"], key=lambda s: s["doc_id"])
        assert [s["arguments"][0][0] for s in samples] == [r["prompt"] for r in rows]
        prompts += [r["prompt"] for r in rows]
        answers += [r["answer"] for r in rows]
        theirs += [s["exact_match"] for s in samples]
    ours = greedy_exact_match(model, tok, prompts, answers, batch_size=64)
    assert np.array_equal(ours, np.array(theirs))
    assert 0.0 < ours.mean() < 1.0
    assert result["results"]["zoo_search"]["exact_match,none"] == pytest.approx(ours.mean())


@pytest.mark.slow  # the trained zoo (~3.5 min to build)
def test_cli_zoo_prints_the_scores_of_a_built_zoo(zoo):
    root = zoo["base"].parent
    result = CliRunner().invoke(app, ["zoo", "--out", str(root), "--seed", "0"])
    assert result.exit_code == 0, result.output
    assert "expert_rev" in result.output and "task arithmetic" in result.output
    assert "SCORES.md" in result.output
