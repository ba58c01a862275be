"""`tokenizer_source` (base, union, a model) and the `tokenizer:` block against mergekit 0.1.5.

A tiny family with the zoo's character tokenizer (72 tokens): a base, an expert, two "instruct" models that add
ChatML tokens (`<|im_start|>`, `<|im_end|>`) with their own embedding and LM-head rows, one that adds them in
the other order, a model without a tokenizer and a base whose BPE tokenizer has two entries past its
embedding rows. Each case runs mergekit in-process and evomerge on the same YAML: the same tensors (vocabulary
rows bit-identical, the rest within 1e-5 as every parity test), the same config, and the same tokenizer
(rebuilt tokenizers: the same files byte for byte; copied ones: the same vocabulary and added tokens).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import run_mergekit
from safetensors.torch import load_file, save_file

from evomerge.errors import ConfigError, ShapeMismatchError
from evomerge.merge.engine import ResidentPool, apply_in_place, merge_to_dir
from evomerge.merge.mergekit_io import recipe_from_dict
from evomerge.zoo import make_random_llama, make_tokenizer

CHAT = ["<|im_start|>", "<|im_end|>"]
VOCAB = ("model.embed_tokens.weight", "lm_head.weight")
TOL = 1e-5
LOADER_KEYS = {"is_local", "local_files_only"}  # what transformers' loader adds when mergekit re-saves


def _add_rows(path: Path, n: int, seed: int) -> None:
    """Append n random rows to the embedding and LM head (a model trained with n added tokens)."""
    tensors = load_file(path / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    for name in VOCAB:
        extra = torch.randn(n, tensors[name].shape[1], generator=gen) * 0.1
        tensors[name] = torch.cat([tensors[name], extra])
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["vocab_size"] += n
    (path / "config.json").write_text(json.dumps(config))


def _bpe_tokenizer(extra: list[str]):
    """The zoo vocabulary as a BPE model (no merges), with `extra` special tokens added after it."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from evomerge.zoo import SPECIAL_TOKENS
    from evomerge.zoo import VOCAB as ZOO_VOCAB

    tok = Tokenizer(models.BPE(vocab=dict(ZOO_VOCAB), merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": extra})
    return fast


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tok_family")
    paths: dict[str, Path] = {"base": make_random_llama(root / "base", 0, vocab=72)}
    for seed, name in enumerate(["e0", "inst", "inst2", "swapped", "bare"], 1):
        paths[name] = make_random_llama(root / name, seed, base=paths["base"], vocab=72)
    for seed, name in enumerate(["inst", "inst2", "swapped"], 10):
        _add_rows(paths[name], 2, seed)
    added = {"inst": CHAT, "inst2": CHAT, "swapped": CHAT[::-1]}
    for name in ("base", "e0", "inst", "inst2", "swapped"):
        tok = make_tokenizer()
        if name in added:
            tok.add_special_tokens({"additional_special_tokens": added[name]})
        tok.save_pretrained(paths[name])
    # a base shipped with an instruct tokenizer but not resized: 74 tokenizer entries, 72 embedding rows
    paths["bpe_base"] = root / "bpe_base"
    shutil.copytree(paths["base"], paths["bpe_base"])
    _bpe_tokenizer(CHAT).save_pretrained(paths["bpe_base"])
    # the same with the zoo's word-level tokenizer, which mergekit (and evomerge) cannot trim
    paths["wl_base"] = root / "wl_base"
    shutil.copytree(paths["base"], paths["wl_base"])
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": CHAT})
    tok.save_pretrained(paths["wl_base"])
    return {k: str(v) for k, v in paths.items()}


def _models(p: dict[str, str], *entries: tuple[str, float]) -> list[dict[str, Any]]:
    return [{"model": p[name], "parameters": {"weight": w}} for name, w in entries]


def _ta(p: dict[str, str], *experts: str, base: str = "base", **extra: Any) -> dict[str, Any]:
    weights = (0.5, 0.7, 0.3)
    return {
        "merge_method": "task_arithmetic",
        "base_model": p[base],
        "models": _models(p, *zip(experts, weights)),
        "dtype": "float32",
        **extra,
    }


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def _tokenizer_config(path: Path) -> dict[str, Any]:
    return {
        k: v
        for k, v in json.loads((path / "tokenizer_config.json").read_text()).items()
        if k not in LOADER_KEYS
    }


def _compare(
    config: dict[str, Any], tmp_path: Path, *, rebuilt: bool, ignore: tuple[str, ...] = ()
) -> tuple[Path, Path]:
    """Both tools on one config: same tensors, config and tokenizer. `rebuilt`: evomerge wrote the tokenizer
    (union, added tokens) rather than copying a source's files; `ignore`: tokenizer_config.json keys that
    may differ."""
    from transformers import AutoTokenizer

    mk = run_mergekit(config, tmp_path / "mk")
    evo = merge_to_dir(recipe_from_dict(config), tmp_path / "evo")
    a, b = _tensors(mk), _tensors(evo)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].shape == b[name].shape and a[name].dtype == b[name].dtype, name
        if name in VOCAB:
            assert torch.equal(a[name], b[name]), name  # gathered rows, sums in mergekit's order: exact
        else:
            assert float((a[name] - b[name]).abs().max()) <= TOL, name
    assert json.loads((mk / "config.json").read_text()) == json.loads((evo / "config.json").read_text())
    assert (mk / "tokenizer.json").read_bytes() == (evo / "tokenizer.json").read_bytes()
    if rebuilt and not ignore:
        assert (mk / "tokenizer_config.json").read_bytes() == (evo / "tokenizer_config.json").read_bytes()
    else:
        drop = lambda cfg: {k: v for k, v in cfg.items() if k not in ignore}  # noqa: E731
        assert drop(_tokenizer_config(mk)) == drop(_tokenizer_config(evo))
    tok_a, tok_b = AutoTokenizer.from_pretrained(mk), AutoTokenizer.from_pretrained(evo)
    assert tok_a.get_vocab() == tok_b.get_vocab()
    assert tok_a.added_tokens_decoder == tok_b.added_tokens_decoder
    return mk, evo


def _ids(path: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path).get_vocab()


def _rows(path: str | Path, name: str = "model.embed_tokens.weight") -> torch.Tensor:
    return _tensors(Path(path))[name]


# ------------------------------------------------------------------------------------------------ parity


def test_union_adds_the_chat_tokens(family, tmp_path):
    """base + expert + instruct: the union has the chat tokens at 72, 73; the models lacking them take the
    instruct model's rows (the only model with them), so the merge keeps the instruct rows there."""
    _, evo = _compare(_ta(family, "e0", "inst", tokenizer_source="union"), tmp_path, rebuilt=True)
    ids = _ids(evo)
    assert [ids[t] for t in CHAT] == [72, 73]
    out, inst = _rows(evo), _rows(family["inst"])
    # task arithmetic: base + 0.5 (e0 - base) + 0.7 (inst - base); every model's row 72 is inst's
    torch.testing.assert_close(out[72:], inst[72:])


def test_union_averages_when_several_models_have_a_token(family, tmp_path):
    """Two instruct models have the chat tokens and the base lacks them: the rows of the models that lack
    them are the mean of the two instruct models' rows."""
    _compare(_ta(family, "inst", "inst2", "e0", tokenizer_source="union"), tmp_path, rebuilt=True)


def test_base_drops_added_tokens(family, tmp_path):
    """`tokenizer_source: base`: the base's 72 tokens; the instruct model's chat rows are dropped."""
    _, evo = _compare(_ta(family, "e0", "inst", tokenizer_source="base"), tmp_path, rebuilt=False)
    assert _rows(evo).shape == (72, 32)
    assert (evo / "tokenizer.json").read_bytes() == (Path(family["base"]) / "tokenizer.json").read_bytes()


@pytest.mark.parametrize(
    ("source", "experts"),
    [
        ("inst", ("e0", "inst", "swapped")),
        ("swapped", ("e0", "inst", "swapped")),
        ("swapped", ("e0", "inst")),
    ],
    ids=["inst", "swapped", "outside-the-merge"],
)
def test_a_models_tokenizer(family, source, experts, tmp_path):
    """`tokenizer_source: <model>`: that model's ids; `swapped` has the chat tokens in the other order, so
    every other model's chat rows are permuted by token, not copied by id. As in mergekit, the tokenizer
    may come from a model that is not merged."""
    config = _ta(family, *experts, tokenizer_source=family[source])
    _, evo = _compare(config, tmp_path, rebuilt=False)
    assert (evo / "tokenizer.json").read_bytes() == (Path(family[source]) / "tokenizer.json").read_bytes()
    assert _ids(evo)["<|im_start|>"] == (72 if source == "inst" else 73)


def test_tokenizer_block_tokens_and_padding(family, tmp_path):
    """Every `tokens:` source kind, `force`, a new token and `pad_to_multiple_of` (75 tokens -> 80 rows)."""
    p = family
    config = _ta(p, "e0", "inst")
    config["tokenizer"] = {
        "source": "union",
        "tokens": {
            "<|im_start|>": {"source": p["inst"]},
            "<|im_end|>": {
                "source": {"kind": "model_token", "model": p["inst"], "token": "</s>"},
                "force": True,
            },
            "w": {"source": p["e0"], "force": True},
            "<new>": {"source": {"kind": "zero"}},
            "<s>": {"source": {"kind": "model_token", "model": p["base"], "token_id": 2}, "force": True},
        },
        "pad_to_multiple_of": 8,
    }
    _, evo = _compare(config, tmp_path, rebuilt=True)
    ids = _ids(evo)
    assert len(ids) == 75 and ids["<new>"] == 74
    out, inst, e0 = _rows(evo), _rows(p["inst"]), _rows(p["e0"])
    assert out.shape == (80, 32)
    torch.testing.assert_close(out[ids["<|im_end|>"]], inst[2])  # every model takes inst's </s> row
    torch.testing.assert_close(out[ids["w"]], e0[ids["w"]])
    assert not out[ids["<new>"]].any()


def test_tokenizer_block_defaults_to_union(family, tmp_path):
    """No `source`: union. A token entry without a source takes the automatic rule (zeros for a token no model
    has); mergekit raises NotImplementedError there, so it runs the explicit `{kind: zero}` equivalent."""
    zero = {"source": {"kind": "zero"}}
    config = _ta(family, "e0", "inst", tokenizer={"tokens": {"<x>": zero, "<s>": {}}})
    run_mergekit(config, tmp_path / "mk")
    evo = merge_to_dir(
        recipe_from_dict(_ta(family, "e0", "inst", tokenizer={"tokens": {"<x>": {}, "<s>": {}}})),
        tmp_path / "evo",
    )
    assert (tmp_path / "mk" / "tokenizer.json").read_bytes() == (evo / "tokenizer.json").read_bytes()
    a, b = _tensors(tmp_path / "mk"), _tensors(evo)
    assert all(torch.equal(a[n], b[n]) for n in VOCAB)
    assert _ids(evo)["<x>"] == 74 and not _rows(evo)[74].any()


def test_base_tokenizer_trimmed_to_its_embedding_rows(family, tmp_path):
    """A BPE base tokenizer with entries past vocab_size drops them (mergekit's stripped base tokenizer);
    the union takes the chat tokens back from the instruct model."""
    config = _ta(family, "e0", "inst", base="bpe_base", tokenizer_source="union")
    _, evo = _compare(config, tmp_path, rebuilt=True)
    assert [_ids(evo)[t] for t in CHAT] == [72, 73]
    # `base`: the trimmed tokenizer. mergekit keeps the dropped tokens in `extra_special_tokens`, which
    # transformers adds back on load at ids 72, 73 (past the 72 rows); evomerge unlists them.
    config = _ta(family, "inst", base="bpe_base", tokenizer_source="base")
    mk, evo = (
        run_mergekit(config, tmp_path / "mk2"),
        merge_to_dir(recipe_from_dict(config), tmp_path / "evo2"),
    )
    a, b = _tensors(mk), _tensors(evo)
    assert all(torch.equal(a[n], b[n]) for n in VOCAB) and b[VOCAB[0]].shape == (72, 32)
    assert (mk / "tokenizer.json").read_bytes() == (evo / "tokenizer.json").read_bytes()
    assert len(_ids(mk)) == 74 and len(_ids(evo)) == 72
    assert not _tokenizer_config(evo).get("extra_special_tokens")


def test_model_without_tokenizer_takes_the_bases(family, tmp_path):
    _compare(_ta(family, "bare", "inst", tokenizer_source="union"), tmp_path, rebuilt=True)


def test_slices_use_each_slices_models(family, tmp_path):
    """A frankenmerge: the embedding comes from the first slice's models only, the LM head from the last's; a
    token none of them has gets zero rows (as mergekit). Without a base_model mergekit takes the base
    tokenizer from an arbitrary model (a set): same vocabulary either way, but inst's lists its chat tokens
    in `extra_special_tokens`."""
    p = family
    config = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": p["base"], "layer_range": [0, 2]}]},
            {"sources": [{"model": p["inst"], "layer_range": [2, 4]}]},
        ],
        "tokenizer_source": "union",
        "dtype": "float32",
    }
    _, evo = _compare(config, tmp_path, rebuilt=True, ignore=("extra_special_tokens",))
    assert not _rows(evo)[72:].any()
    torch.testing.assert_close(_rows(evo, "lm_head.weight"), _rows(p["inst"], "lm_head.weight"))


def test_different_vocabularies_need_a_tokenizer_setting(family, tmp_path):
    """Without tokenizer_source the sizes differ: the error says how to align them."""
    with pytest.raises(ShapeMismatchError, match="tokenizer_source"):
        merge_to_dir(recipe_from_dict(_ta(family, "e0", "inst")), tmp_path / "out")


def test_in_place_matches_the_streamed_merge(family, tmp_path):
    """A resident target with the output vocabulary's rows: apply_in_place gives the streamed tensors."""
    from transformers import LlamaForCausalLM

    recipe = recipe_from_dict(_ta(family, "e0", "inst", tokenizer_source="union"))
    out = merge_to_dir(recipe, tmp_path / "out")
    model = LlamaForCausalLM.from_pretrained(family["inst"], dtype=torch.float32)
    apply_in_place(recipe, ResidentPool.from_refs(recipe.referenced_models()), model)
    streamed = _tensors(out)
    for name, t in model.state_dict().items():
        assert torch.equal(t, streamed[name]), name
    # a search's target is the base (72 rows): the union's 74 rows are a one-line shape error
    base = LlamaForCausalLM.from_pretrained(family["base"], dtype=torch.float32)
    with pytest.raises(ShapeMismatchError, match=r"target model shape \(72, 32\), merge gives \(74, 32\)"):
        apply_in_place(recipe, ResidentPool.from_refs(recipe.referenced_models()), base)


# ------------------------------------------------------------------------------------------------ errors


def _bad(family: dict[str, str]) -> dict[str, tuple[dict[str, Any], str]]:
    p = family
    ta = _ta(p, "e0", "inst")
    return {
        "source-not-a-model": (ta | {"tokenizer_source": str(Path(p["base"]).parent / "nope")}, "nope has no tokenizer"),
        "source-without-tokenizer": (ta | {"tokenizer_source": p["bare"]}, "bare has no tokenizer"),
        "token-model-outside-merge": (ta | {"tokenizer": {"tokens": {"<x>": {"source": p["swapped"]}}}}, "not a model of the merge"),
        "token-model-lacks-token": (ta | {"tokenizer": {"tokens": {"<|im_end|>": {"source": p["e0"]}}}}, "has no token"),
        "model-token-unknown": (ta | {"tokenizer": {"tokens": {"<x>": {"source": {"kind": "model_token", "model": p["e0"], "token": "<nope>"}}}}}, "has no token '<nope>'"),
        "model-token-id-range": (ta | {"tokenizer": {"tokens": {"<x>": {"source": {"kind": "model_token", "model": p["e0"], "token_id": 72}}}}}, "token_id 72"),
        "model-token-both": (ta | {"tokenizer": {"tokens": {"<x>": {"source": {"kind": "model_token", "model": p["e0"], "token": "a", "token_id": 1}}}}}, "exactly one"),
        "unknown-kind": (ta | {"tokenizer": {"tokens": {"<x>": {"source": {"kind": "mean"}}}}}, "kind: zero"),
        "force-without-source": (ta | {"tokenizer": {"tokens": {"<x>": {"force": True}}}}, "needs a source"),
        "both-settings": (ta | {"tokenizer_source": "union", "tokenizer": {"source": "base"}}, "not both"),
        "bad-padding": (ta | {"tokenizer": {"pad_to_multiple_of": 0}}, "positive"),
        "unknown-key": (ta | {"tokenizer": {"source": "union", "pad_to": 8}}, "pad_to"),
        "base-without-tokenizer": (_ta(p, "e0", base="bare", tokenizer_source="base"), "has no tokenizer"),
        "word-level-trim": (_ta(p, "inst", base="wl_base", tokenizer_source="union"), "only BPE"),
    }  # fmt: skip


BAD = [
    "source-not-a-model", "source-without-tokenizer", "token-model-outside-merge", "token-model-lacks-token", "model-token-unknown",
    "model-token-id-range", "model-token-both", "unknown-kind", "force-without-source", "both-settings",
    "bad-padding", "unknown-key", "base-without-tokenizer", "word-level-trim",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_bad_settings_are_one_line_errors(family, case, tmp_path):
    config, words = _bad(family)[case]
    with pytest.raises(ConfigError, match=words) as err:
        merge_to_dir(recipe_from_dict(config), tmp_path / "out")
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temp dir
