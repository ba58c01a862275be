"""Instruct-model options of the lm-eval evaluator (chat template, multi-turn few-shot, system instruction,
gen_kwargs) against lm-eval's own `simple_evaluate`, on a zoo-architecture model with the zoo's tokenizer.

The model has random weights (a trained zoo takes minutes): its multiple-choice answers still depend on the
prompt, and its greedy continuations are deterministic strings, so equal per-sample scores and responses mean
equal requests. Its context is 256 positions (the zoo's 64 would truncate few-shot chat prompts in both).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import mc_task_yaml

from evomerge.config import ConfigError, parse_config
from evomerge.evaluate.base import EvaluationError
from evomerge.evaluate.lmeval import BUNDLED_TASKS, LMEvalSpec
from evomerge.runtime.run import evaluator_spec
from evomerge.zoo import CHAT_TEMPLATE, ZooSettings, _model_config, build_zoo, make_tokenizer

SYSTEM = "be exact"
GEN_KWARGS = {"max_gen_toks": 4}
LIMIT = 12
DATA = BUNDLED_TASKS / "zoo" / "data"

MC_YAML = mc_task_yaml("chat_rev_mc", "load", "validation_split: validation", "fewshot_split: train", "num_fewshot: 2",
                       'target_delimiter: ""', 'fewshot_delimiter: "\\n"')  # fmt: skip
UTILS = """import json
from pathlib import Path

import datasets


def load(**kwargs):
    rows = json.loads((Path(__file__).parent / "mc.json").read_text())
    return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in rows.items()})
"""


def _mc_rows(rows: list[dict], shift: int) -> list[dict]:
    """Four choices per prompt: its answer and the answers of the next three rows, the answer at `i % 4`."""
    out = []
    for i, row in enumerate(rows):
        others = [rows[(i + k) % len(rows)]["answer"] for k in (1, 2, 3)]
        choices = others[: (i + shift) % 4] + [row["answer"]] + others[(i + shift) % 4 :]
        out.append({"prompt": row["prompt"], "choices": choices, "label": (i + shift) % 4})
    return out


@pytest.fixture(scope="module")
def include(tmp_path_factory) -> Path:
    """A few-shot multiple-choice task over the zoo's reversal prompts (few-shot from the test split)."""
    root = tmp_path_factory.mktemp("chat_tasks")
    rows = {
        split: [json.loads(line) for line in (DATA / f"rev_{split}.jsonl").read_text().splitlines()][:40]
        for split in ("validation", "test")
    }
    mc = {"validation": _mc_rows(rows["validation"], 0), "train": _mc_rows(rows["test"], 1)}
    (root / "mc.json").write_text(json.dumps(mc))
    (root / "chat_rev_mc.yaml").write_text(MC_YAML)
    (root / "utils.py").write_text(UTILS)
    return root


@pytest.fixture(scope="module")
def zoo_pair(tmp_path_factory):
    """A random model of the zoo's architecture (context 256) and the zoo tokenizer as saved and loaded."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.set_num_threads(1)
    config = _model_config(ZooSettings())
    config.max_position_embeddings = 256
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger than the default init, so the prompt moves the choice scores
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.dim() > 1 else None
    path = tmp_path_factory.mktemp("tok")
    make_tokenizer().save_pretrained(path)
    return model, AutoTokenizer.from_pretrained(path)


def _config(include: Path, **options) -> dict:
    evaluator = {"type": "lmeval", "tasks": ["chat_rev_mc", "zoo_rev"], "include_path": str(include),
                 "limit": LIMIT, "batch_size": 16, **options}  # fmt: skip
    return {"models": {"zoo": "zoo"}, "evaluator": evaluator, "budget": {"candidates": 1}}


def _evaluator(include: Path, **options):
    return evaluator_spec(parse_config(_config(include, **options), "test")).build()


CHAT = {"apply_chat_template": True, "system_instruction": SYSTEM, "gen_kwargs": GEN_KWARGS}


def _lm_eval(model, tok, include: Path, **options) -> dict:
    """lm-eval's own simple_evaluate with the same options: {task: samples sorted by doc_id}."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(BUNDLED_TASKS), str(include)], include_defaults=False)
    result = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tok, batch_size=16),
        tasks=["chat_rev_mc", "zoo_rev"],
        task_manager=manager,
        limit=LIMIT,
        log_samples=True,
        bootstrap_iters=0,
        **options,
    )
    return {t: sorted(s, key=lambda x: x["doc_id"]) for t, s in result["samples"].items()}


def _requests(evaluator, task: str) -> list:
    run = next(r for r in evaluator.runs if r.name == task)
    return [[inst.args for inst in group] for group in run.groups]


def _responses(evaluator, task: str) -> list:
    run = next(r for r in evaluator.runs if r.name == task)
    return [[inst.resps for inst in group] for group in run.groups]


@pytest.mark.parametrize("multiturn", [True, False])
def test_chat_scores_and_requests_equal_lm_evals_own(zoo_pair, include, multiturn):
    model, tok = zoo_pair
    ours_ev = _evaluator(include, **CHAT, fewshot_as_multiturn=multiturn)
    ours = ours_ev.evaluate(model, tok)
    theirs = _lm_eval(model, tok, include, **CHAT, fewshot_as_multiturn=multiturn)

    for task, metric in (("chat_rev_mc", "acc"), ("zoo_rev", "exact_match")):
        assert np.array_equal(ours.samples[task], [s[metric] for s in theirs[task]])
        assert _requests(ours_ev, task) == [[tuple(a) for a in s["arguments"]] for s in theirs[task]]
    assert _responses(ours_ev, "zoo_rev") == [[s["resps"][0]] for s in theirs["zoo_rev"]]

    mc_ctx = _requests(ours_ev, "chat_rev_mc")[0][0][0]
    assert mc_ctx.startswith(f"system:{SYSTEM}\nuser:") and mc_ctx.endswith("\nassistant:")
    assert mc_ctx.count("assistant:") == (3 if multiturn else 1)  # two shots as turns, or in one user turn
    gen_args = _requests(ours_ev, "zoo_rev")[0][0]
    assert gen_args[1]["max_gen_toks"] == 4 and gen_args[1]["until"] == ["\n"]  # override + the task's own


def test_the_template_changes_the_scores(zoo_pair, include):
    model, tok = zoo_pair
    plain = _evaluator(include).evaluate(model, tok)
    chat = _evaluator(include, **CHAT).evaluate(model, tok)
    assert not np.array_equal(plain.samples["chat_rev_mc"], chat.samples["chat_rev_mc"])
    assert plain.forward_passes == chat.forward_passes == LIMIT * 4 + LIMIT


def test_plain_prompts_are_unchanged_by_the_zoo_template(zoo_pair, include):
    """The zoo tokenizer's template is used only when asked: plain requests are lm-eval's plain ones."""
    model, tok = zoo_pair
    assert tok.chat_template is not None
    ours_ev = _evaluator(include)
    ours = ours_ev.evaluate(model, tok)
    theirs = _lm_eval(model, tok, include, fewshot_as_multiturn=False)
    for task, metric in (("chat_rev_mc", "acc"), ("zoo_rev", "exact_match")):
        assert np.array_equal(ours.samples[task], [s[metric] for s in theirs[task]])
        assert _requests(ours_ev, task) == [[tuple(a) for a in s["arguments"]] for s in theirs[task]]
    first = json.loads((DATA / "rev_test.jsonl").read_text().splitlines()[0])
    assert _requests(ours_ev, "zoo_rev")[0][0][0] == first["prompt"]  # the bare prompt, no template


def test_item_selection_builds_the_chat_requests_once(zoo_pair, include):
    model, tok = zoo_pair
    full = _evaluator(include, **CHAT).evaluate(model, tok)
    ev = _evaluator(include, **CHAT)
    assert ev.task_sizes == {"chat_rev_mc": LIMIT, "zoo_rev": LIMIT}  # documents known before any request
    items = {"chat_rev_mc": [7, 0, 3], "zoo_rev": [11, 2]}
    part = ev.evaluate(model, tok, items=items)
    built = [id(i) for r in ev.runs for g in r.groups for i in g]
    again = ev.evaluate(model, tok, items=items)
    assert [id(i) for r in ev.runs for g in r.groups for i in g] == built  # not rebuilt per candidate
    for task, positions in items.items():
        assert np.array_equal(part.samples[task], full.samples[task][positions])
        assert np.array_equal(again.samples[task], part.samples[task])
    assert part.forward_passes == 3 * 4 + 2


def test_a_tokenizer_without_a_template_is_a_clear_error(zoo_pair, include):
    model, tok = zoo_pair
    bare = make_tokenizer()
    bare.chat_template = None
    with pytest.raises(EvaluationError, match="tokenizer has no chat template"):
        _evaluator(include, apply_chat_template=True).evaluate(model, bare)


def test_a_named_template_is_the_one_rendered(zoo_pair, include):
    """A name picks one of the tokenizer's named templates (lm-eval 0.4.13 only checks the name exists)."""
    model, _ = zoo_pair
    tok = make_tokenizer()
    tok.chat_template = {
        "default": CHAT_TEMPLATE,
        "terse": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }
    ev = _evaluator(include, apply_chat_template="terse", system_instruction=SYSTEM)
    ev.evaluate(model, tok, items={"zoo_rev": [0]})
    first = json.loads((DATA / "rev_test.jsonl").read_text().splitlines()[0])
    assert _requests(ev, "zoo_rev")[0][0][0] == SYSTEM + first["prompt"]
    with pytest.raises(EvaluationError, match="apply_chat_template: The specified chat template 'nope'"):
        _evaluator(include, apply_chat_template="nope").evaluate(model, tok)


def test_spec_checks_multiturn_needs_a_template():
    with pytest.raises(EvaluationError, match="fewshot_as_multiturn needs apply_chat_template"):
        LMEvalSpec(tasks=("zoo_rev",), fewshot_as_multiturn=True).build()


# --- the run config ---------------------------------------------------------------------------------------


def test_config_threads_the_options_into_the_spec(include):
    spec = evaluator_spec(parse_config(_config(include, **CHAT), "test"))
    assert (spec.apply_chat_template, spec.fewshot_as_multiturn, spec.system_instruction, spec.gen_kwargs) == (
        True, True, SYSTEM, GEN_KWARGS,
    )  # fmt: skip
    named = evaluator_spec(
        parse_config(_config(include, apply_chat_template="chatml", fewshot_as_multiturn=False), "t")
    )
    assert (named.apply_chat_template, named.fewshot_as_multiturn) == ("chatml", False)
    plain = evaluator_spec(parse_config(_config(include), "test"))
    assert (plain.apply_chat_template, plain.fewshot_as_multiturn, plain.system_instruction, plain.gen_kwargs) == (
        False, False, None, None,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("evaluator", "message"),
    [
        ({"fewshot_as_multiturn": True}, "fewshot_as_multiturn: needs apply_chat_template"),
        ({"apply_chat_template": " "}, "apply_chat_template: give true, or the name of a"),
        ({"type": "digits", "apply_chat_template": True}, "lm-eval options; the digits evaluator"),
        ({"gen_kwargs": "max_gen_toks=4"}, "gen_kwargs"),
    ],
)
def test_config_rejects_bad_chat_options(evaluator, message):
    data = {"models": {"zoo": "zoo"}, "evaluator": evaluator, "budget": {"candidates": 1}}
    with pytest.raises(ConfigError, match=message):
        parse_config(data, "test")


# --- the model card ---------------------------------------------------------------------------------------


def _card(tmp_path: Path, evaluator: dict) -> str:
    from evomerge.export import RecipeSummary, RunView
    from evomerge.model_card import CardInput, render_card

    config = parse_config({"name": "chat", "models": {"zoo": "zoo"}, "evaluator": evaluator,
                           "budget": {"candidates": 1}}, "test")  # fmt: skip
    result = {"status": "ok", "scores": {"zoo_rev": 0.5}, "objectives": [0.5]}
    view = RunView(tmp_path, config, ["zoo_rev"], ["maximize"], np.ones(1), {"c0": {"generation": 0}},
                   {"c0": result}, ["c0"])  # fmt: skip
    card = CardInput("c0", "candidate id given", tmp_path, view, RecipeSummary("linear", None, []), False,
                     "test", None, "evomerge export")  # fmt: skip
    return render_card(card)


def test_model_card_records_the_prompt_options(tmp_path):
    text = _card(tmp_path, {"tasks": ["zoo_rev"], "max_length": 48, **CHAT})
    meta = yaml.safe_load(text.split("---\n")[1])["evomerge"]["evaluator"]
    assert meta == {"type": "lmeval", "tasks": ["zoo_rev"], "apply_chat_template": True,
                    "chat_template": "tokenizer default", "fewshot_as_multiturn": True,
                    "system_instruction": SYSTEM, "gen_kwargs": GEN_KWARGS, "max_length": 48}  # fmt: skip
    assert "Prompts: the tokenizer's chat template, few-shot examples as multi-turn chat" in text
    assert f'system instruction "{SYSTEM}"' in text and 'generation kwargs {"max_gen_toks": 4}' in text

    named = _card(
        tmp_path, {"tasks": ["zoo_rev"], "apply_chat_template": "tool_use", "fewshot_as_multiturn": False}
    )
    meta = yaml.safe_load(named.split("---\n")[1])["evomerge"]["evaluator"]
    assert (meta["chat_template"], meta["fewshot_as_multiturn"]) == ("tool_use", False)
    assert "Prompts: chat template `tool_use`, few-shot examples in one user turn" in named

    plain = _card(tmp_path, {"tasks": ["zoo_rev"]})
    meta = yaml.safe_load(plain.split("---\n")[1])["evomerge"]["evaluator"]
    assert (meta["apply_chat_template"], meta["chat_template"], meta["system_instruction"]) == (
        False,
        None,
        None,
    )
    assert "Prompts: plain text (no chat template)." in plain


# --- the zoo tokenizer ------------------------------------------------------------------------------------


def test_a_cached_zoo_gains_the_template_and_keeps_everything_else(tmp_path):
    """A zoo cached before the template existed is not retrained: its models only gain chat_template.jinja."""
    from transformers import AutoTokenizer

    root = tmp_path / "zoo"
    digest = ZooSettings().digest(0)
    (root / "base").mkdir(parents=True)
    make_tokenizer().save_pretrained(root / "base")
    (root / "base" / "chat_template.jinja").unlink()  # as saved before the template
    (root / "base" / "model.safetensors").write_bytes(b"weights")
    (root / "base" / "zoo_model.json").write_text(json.dumps({"name": "base", "digest": digest}))
    (root / "zoo.json").write_text(json.dumps({"digest": digest, "models": {"base": "base"}}))
    before = {p.name: p.read_bytes() for p in (root / "base").iterdir()}

    assert build_zoo(root, seed=0) == {"base": root / "base"}
    after = {p.name: p.read_bytes() for p in (root / "base").iterdir()}
    assert set(after) - set(before) == {"chat_template.jinja"}
    assert all(
        after[name] == data for name, data in before.items()
    )  # weights and tokenizer files as they were
    assert AutoTokenizer.from_pretrained(root / "base").chat_template == CHAT_TEMPLATE
    assert not [p.name for p in root.rglob(".*")]  # no temp files left
    mtime = (root / "base" / "chat_template.jinja").stat().st_mtime_ns
    build_zoo(root, seed=0)
    assert (
        root / "base" / "chat_template.jinja"
    ).stat().st_mtime_ns == mtime  # current files are not rewritten


def test_a_run_whose_base_tokenizer_has_no_such_template_is_refused_before_anything_starts(tmp_path):
    """The driver reads the base tokenizer's files: no template (or not that name) is one line, before Ray."""
    import json

    import pytest

    from evomerge.config import parse_config
    from evomerge.errors import ConfigError
    from evomerge.runtime.run import chat_templates, check_chat_template

    base = tmp_path / "base"
    (base / "additional_chat_templates").mkdir(parents=True)
    (base / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))

    def config(choice):
        return parse_config({"models": {"base": str(base), "sources": [str(base)]}, "budget": {"candidates": 1},
                             "evaluator": {"type": "lmeval", "apply_chat_template": choice}}, "test")  # fmt: skip

    assert chat_templates(base) == set()
    with pytest.raises(ConfigError, match="it has none"):
        check_chat_template(config(True), str(base))
    (base / "chat_template.jinja").write_text("{{ messages }}")
    (base / "additional_chat_templates" / "tool_use.jinja").write_text("{{ messages }}")
    assert chat_templates(base) == {"default", "tool_use"}
    check_chat_template(config(True), str(base))
    check_chat_template(config("tool_use"), str(base))
    with pytest.raises(ConfigError, match="'rag' is not a chat template.*default, tool_use"):
        check_chat_template(config("rag"), str(base))
