"""LMEvalEvaluator on tiny in-memory models and task files written in tmp dirs (no downloads)."""

import json
import pickle

import numpy as np
import pytest
import torch
from helpers import mc_task_yaml
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from evomerge.evaluate.base import EvaluationError
from evomerge.evaluate.lmeval import LMEvalSpec

CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 =?\n")

MC_YAML = mc_task_yaml("dev_mc", "load_mc", "test_split: test")
GEN_YAML = """task: dev_rev
custom_dataset: !function utils.load_rev
output_type: generate_until
test_split: test
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
UTILS = """import json
from pathlib import Path

import datasets


def _rows(name):
    path = Path(__file__).parent / "data" / name
    return [json.loads(line) for line in path.read_text().splitlines()]


def load_mc(**kwargs):
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(_rows("mc.jsonl"))})


def load_rev(**kwargs):
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(_rows("rev.jsonl"))})
"""


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    (root / "data").mkdir()
    (root / "mc.yaml").write_text(MC_YAML)
    (root / "rev.yaml").write_text(GEN_YAML)
    (root / "utils.py").write_text(UTILS)
    rng = np.random.default_rng(0)
    with open(root / "data" / "mc.jsonl", "w") as f:
        for _ in range(60):
            word = "".join(rng.choice(list("abcdef"), 3))
            choices = ["".join(rng.choice(list("abcdef"), 3)) for _ in range(3)] + [word]
            f.write(json.dumps({"prompt": f"copy {word}=", "choices": choices, "label": 3}) + "\n")
    with open(root / "data" / "rev.jsonl", "w") as f:
        for _ in range(40):
            word = "".join(rng.choice(list("abcdef"), 4))
            f.write(json.dumps({"prompt": f"rev {word}=", "answer": word[::-1]}) + "\n")
    return root


def char_tokenizer(pad: bool = True) -> PreTrainedTokenizerFast:
    vocab = {c: i for i, c in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *CHARS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    special = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
    if pad:
        special["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=tk, padding_side="left", **special)


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(CHARS) + 4, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def mc(tasks_dir):
    return LMEvalSpec(tasks=("dev_mc",), include_path=str(tasks_dir), batch_size=16).build()


def test_per_sample_scores_average_to_the_aggregate(mc):
    result = mc.evaluate(tiny_model(), char_tokenizer())
    per_sample = result.samples["dev_mc"]
    assert per_sample.shape == (60,)
    assert set(np.unique(per_sample)) <= {0.0, 1.0}
    assert 0 < result.scores["dev_mc"] < 1  # a random model: some right, some wrong
    assert result.scores["dev_mc"] == pytest.approx(per_sample.mean())
    assert result.forward_passes == 60 * 4  # one log-likelihood request per choice


def test_same_model_twice_gives_identical_scores(mc):
    model, tok = tiny_model(), char_tokenizer()
    a, b = mc.evaluate(model, tok), mc.evaluate(model, tok)
    assert a.scores == b.scores
    assert np.array_equal(a.samples["dev_mc"], b.samples["dev_mc"])


def test_in_place_weight_change_changes_the_result(mc):
    model, tok = tiny_model(), char_tokenizer()
    before = mc.evaluate(model, tok).samples["dev_mc"]
    with torch.no_grad():
        for p, q in zip(model.parameters(), tiny_model(seed=7).parameters()):
            p.copy_(q)
    after = mc.evaluate(model, tok).samples["dev_mc"]
    assert not np.array_equal(before, after)
    fresh = mc.evaluate(tiny_model(seed=7), char_tokenizer()).samples["dev_mc"]
    assert np.array_equal(after, fresh)  # nothing stale from the first weights


def test_generate_until_task_scores_exact_match(tasks_dir):
    ev = LMEvalSpec(tasks=("dev_rev",), include_path=str(tasks_dir)).build()
    result = ev.evaluate(tiny_model(), char_tokenizer())
    assert result.samples["dev_rev"].shape == (40,)
    assert result.forward_passes == 40
    assert result.scores["dev_rev"] == pytest.approx(result.samples["dev_rev"].mean())


def test_subsample_is_fixed_and_seeded(tasks_dir):
    def picked(seed):
        ev = LMEvalSpec(tasks=("dev_mc",), include_path=str(tasks_dir), subsample=10, seed=seed).build()
        return [doc["prompt"] for _, doc in ev.runs[0].docs]

    assert len(picked(1)) == 10
    assert picked(1) == picked(1)
    assert picked(1) != picked(2)


def test_limit_takes_the_first_documents(tasks_dir):
    ev = LMEvalSpec(tasks=("dev_mc",), include_path=str(tasks_dir), limit=5).build()
    result = ev.evaluate(tiny_model(), char_tokenizer())
    assert result.samples["dev_mc"].shape == (5,)


def test_spec_is_picklable(tasks_dir):
    spec = LMEvalSpec(tasks=("dev_mc", "dev_rev"), include_path=str(tasks_dir))
    ev = pickle.loads(pickle.dumps(spec)).build()
    assert ev.task_names == ["dev_mc", "dev_rev"]


def test_unknown_task_is_a_clear_error(tasks_dir):
    with pytest.raises(EvaluationError, match="unknown lm-eval task 'dev_mcc'.*dev_mc"):
        LMEvalSpec(tasks=("dev_mcc",), include_path=str(tasks_dir)).build()


def test_missing_data_file_is_a_clear_error(tasks_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "mc.yaml").write_text(MC_YAML.replace("dev_mc", "dev_missing"))
    (broken / "utils.py").write_text(UTILS)
    with pytest.raises(EvaluationError, match="dev_missing.*could not be loaded.*mc.jsonl"):
        LMEvalSpec(tasks=("dev_missing",), include_path=str(broken)).build()


def test_tokenizer_without_pad_token_is_a_clear_error(mc):
    with pytest.raises(EvaluationError, match="no pad token"):
        mc.evaluate(tiny_model(), char_tokenizer(pad=False))


def test_limit_and_subsample_are_exclusive(tasks_dir):
    with pytest.raises(EvaluationError, match="either limit or subsample"):
        LMEvalSpec(tasks=("dev_mc",), include_path=str(tasks_dir), limit=3, subsample=3).build()


@pytest.mark.slow  # lm-eval indexes its ~10,000 task files first (~28 s)
def test_standard_task_without_local_data_says_so(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EvaluationError, match="arc_easy: data could not be loaded.*local Hugging Face cache"):
        LMEvalSpec(tasks=("arc_easy",)).build()


# --- items: evaluate only chosen documents ----------------------------------------------------------------


@pytest.fixture(scope="module")
def both(tasks_dir):
    return LMEvalSpec(tasks=("dev_mc", "dev_rev"), include_path=str(tasks_dir), batch_size=16).build()


def test_task_sizes_are_documents_per_task_in_task_order(both, tasks_dir):
    assert list(both.task_sizes.items()) == [("dev_mc", 60), ("dev_rev", 40)]
    limited = LMEvalSpec(tasks=("dev_mc",), include_path=str(tasks_dir), limit=5).build()
    assert limited.task_sizes == {"dev_mc": 5}


def test_selected_items_score_as_in_the_full_run_in_the_given_order(both):
    model, tok = tiny_model(), char_tokenizer()
    full = both.evaluate(model, tok)
    items = {"dev_mc": [41, 3, 17, 0, 59, 8], "dev_rev": [39, 2, 11]}
    part = both.evaluate(model, tok, items=items)
    assert list(part.scores) == list(part.samples) == ["dev_mc", "dev_rev"]
    for task, positions in items.items():
        assert np.array_equal(part.samples[task], full.samples[task][positions])
        assert part.scores[task] == pytest.approx(full.samples[task][positions].mean())
    assert part.forward_passes == 6 * 4 + 3  # 4 choices per mc document, 1 generation per rev document


def test_a_task_left_out_of_items_is_not_evaluated(both):
    model, tok = tiny_model(), char_tokenizer()
    full = both.evaluate(model, tok)
    part = both.evaluate(model, tok, items={"dev_rev": np.arange(40)[::-1]})
    assert list(part.scores) == ["dev_rev"] and list(part.samples) == ["dev_rev"]
    assert part.forward_passes == 40
    assert np.array_equal(part.samples["dev_rev"], full.samples["dev_rev"][::-1])
    assert part.scores["dev_rev"] == pytest.approx(full.scores["dev_rev"])


def test_items_none_is_the_full_evaluation(both):
    model, tok = tiny_model(), char_tokenizer()
    default = both.evaluate(model, tok)
    explicit = both.evaluate(model, tok, items=None)
    every = both.evaluate(model, tok, items={t: range(n) for t, n in both.task_sizes.items()})
    assert default.forward_passes == explicit.forward_passes == every.forward_passes == 60 * 4 + 40
    for other in (explicit, every):
        assert other.scores == default.scores
        assert all(np.array_equal(other.samples[t], default.samples[t]) for t in default.samples)


def test_consecutive_selections_do_not_see_each_others_responses(both):
    model, tok = tiny_model(), char_tokenizer()
    first = both.evaluate(model, tok, items={"dev_mc": [0, 1, 2, 3], "dev_rev": [0, 1]})
    with torch.no_grad():  # new weights: stale responses of the first call would now be wrong
        for p, q in zip(model.parameters(), tiny_model(seed=7).parameters()):
            p.copy_(q)
    second = both.evaluate(model, tok, items={"dev_mc": [2, 3, 4, 5], "dev_rev": [1, 2]})
    fresh = both.evaluate(tiny_model(seed=7), char_tokenizer())
    assert np.array_equal(second.samples["dev_mc"], fresh.samples["dev_mc"][[2, 3, 4, 5]])
    assert np.array_equal(second.samples["dev_rev"], fresh.samples["dev_rev"][[1, 2]])
    assert second.forward_passes == first.forward_passes == 4 * 4 + 2


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ({"dev_mc": [0, 60]}, "dev_mc: item positions \\[60\\] out of range 0..59"),
        ({"dev_rev": [-1]}, "dev_rev: item positions \\[-1\\] out of range"),
        ({"dev_mc": [3, 1, 3]}, "dev_mc: duplicated item positions \\[3\\]"),
        ({"dev_rev": []}, "dev_rev: empty item selection"),
        ({"dev_rev": [0.5]}, "dev_rev: item positions must be integers"),
        ({"dev_nope": [0]}, "unknown tasks \\['dev_nope'\\]"),
    ],
)
def test_bad_items_are_a_clear_error(both, items, message):
    with pytest.raises(EvaluationError, match=message):
        both.evaluate(tiny_model(), char_tokenizer(), items=items)
