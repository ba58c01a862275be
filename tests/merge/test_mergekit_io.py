"""mergekit YAML <-> Recipe: exact round trips, mergekit accepts what we write, bad keys are named."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from mergekit.config import MergeConfiguration

from evomerge.errors import ConfigError
from evomerge.merge.mergekit_io import (
    dump_mergekit_yaml,
    dump_recipe_yaml,
    load_recipe,
    recipe_from_dict,
    recipe_to_mergekit_dict,
)
from evomerge.merge.recipe import Recipe

CONFIGS = {
    "ties-models-gradients-filters": """
        models:
          - model: mistralai/Mistral-7B-v0.1
            # no parameters necessary for the base model
          - model: OpenPipe/mistral-ft-optimized-1218
            parameters:
              density: [1, 0.7, 0.1]
              weight: 1.0
          - model: mlabonne/NeuralHermes-2.5-Mistral-7B
            parameters:
              density: 0.5
              weight: [0, 0.3, 0.7, 1]
          - model: ./local/expert
            parameters:
              weight:
                - filter: mlp
                  value: 0.2
                - value: 1.0
              density:
                - filter: self_attn
                  value: [0.3, 0.9]
                - value: 0.5
        merge_method: ties
        base_model: mistralai/Mistral-7B-v0.1
        parameters:
          normalize: true
          lambda: 0.9
          int8_mask: true
        dtype: float16
    """,
    "slerp-slices": """
        slices:
          - sources:
              - model: OpenPipe/mistral-ft-optimized-1218
                layer_range: [0, 32]
              - model: mlabonne/NeuralHermes-2.5-Mistral-7B
                layer_range: [0, 32]
        merge_method: slerp
        base_model: OpenPipe/mistral-ft-optimized-1218
        parameters:
          t:
            - filter: self_attn
              value: [0, 0.5, 0.3, 0.7, 1]
            - filter: mlp
              value: [1, 0.5, 0.7, 0.3, 0]
            - value: 0.5
        dtype: bfloat16
    """,
    "passthrough-frankenmerge": """
        slices:
          - sources:
            - model: ./a
              layer_range: [0, 24]
          - sources:
            - model: ./b
              layer_range: [8, 32]
              parameters:
                scale:
                  - filter: o_proj
                    value: 0.0
                  - value: 1.0
        merge_method: passthrough
        dtype: bfloat16
        out_dtype: float16
        tokenizer_source: ./b
    """,
    "slices-slice-base-and-parameters": """
        merge_method: dare_ties
        base_model: ./base
        slices:
          - sources:
              - model: ./base
                layer_range: [0, 16]
              - model: ./x
                layer_range: [0, 16]
                parameters: {weight: 0.6, density: [0.2, 0.8]}
            parameters:
              rescale: false
          - sources:
              - model: ./y
                layer_range: [16, 32]
              - model: ./base
                layer_range: [16, 32]
            base_model: ./y
            parameters:
              weight: 0.5
              density: 0.4
        parameters:
          normalize: false
        tokenizer_source: base
        chat_template: chatml
        dtype: float32
        out_dtype: bfloat16
    """,
    "della-strings-and-sci-notation": """
        models:
          - model: ./e0
            parameters: {weight: 0.5, density: 0.55, epsilon: 0.05}
          - model: ./e1
            parameters: {weight: 0.5, density: 0.55, epsilon: 1e-2}
        merge_method: della_linear
        base_model: ./base
        parameters:
          lambda: 1.1
          rescale: true
        tokenizer_source: ./e1
        chat_template: "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        dtype: bfloat16
    """,
    "nuslerp-no-base": """
        models:
          - model: ./a
            parameters:
              weight: 0.3
          - model: ./b
            parameters:
              weight: 0.7
        merge_method: nuslerp
        parameters:
          nuslerp_flatten: false
          nuslerp_row_wise: true
        chat_template: auto
    """,
    "union-tokenizer-block": """
        models:
          - model: ./instruct
            parameters: {weight: 0.6}
          - model: ./code
            parameters: {weight: 0.4}
        merge_method: task_arithmetic
        base_model: ./base
        tokenizer:
          source: union
          tokens:
            <|im_start|>:
              source: ./instruct
            <|im_end|>:
              source: {kind: model_token, model: ./instruct, token: </s>}
              force: true
            <tool>:
              source: {kind: zero}
            <x>: {}
          pad_to_multiple_of: 64
        chat_template: chatml
    """,
    "model_stock-lora": """
        models:
          - model: ./e0
          - model: ./e1+./adapters/lora1
          - model: ./e2
        merge_method: model_stock
        base_model: ./base
        parameters:
          filter_wise: false
        tokenizer_source: base
    """,
}


def _typed(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _typed(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_typed(v) for v in x]
    return (type(x).__name__, x)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "merge.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_is_exact(name, tmp_path):
    text = textwrap.dedent(CONFIGS[name])
    recipe = load_recipe(_write(tmp_path, text))
    assert recipe_to_mergekit_dict(recipe) == yaml.safe_load(text)
    # value types survive too (YAML's string "1e-2" stays a string, 1 an int, 1.0 a float, true a bool)
    assert _typed(recipe_to_mergekit_dict(recipe)) == _typed(yaml.safe_load(text))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_dump_reloads_to_the_same_recipe(name, tmp_path):
    recipe = load_recipe(_write(tmp_path, CONFIGS[name]))
    dumped = dump_mergekit_yaml(recipe)
    again = recipe_from_dict(yaml.safe_load(dumped))
    assert again == recipe
    assert again.content_hash() == recipe.content_hash()
    assert recipe_from_dict(yaml.safe_load(dump_recipe_yaml(recipe))) == recipe


@pytest.mark.parametrize("name", list(CONFIGS))
def test_mergekit_accepts_our_yaml(name, tmp_path):
    recipe = load_recipe(_write(tmp_path, CONFIGS[name]))
    dumped = yaml.safe_load(dump_mergekit_yaml(recipe))
    config = MergeConfiguration.model_validate(dumped)
    # mergekit parses our YAML to exactly what it parses from the original
    assert config == MergeConfiguration.model_validate(yaml.safe_load(textwrap.dedent(CONFIGS[name])))
    assert config.merge_method == recipe.merge_method


def test_random_seed_is_kept_apart_from_mergekit_keys():
    data = yaml.safe_load(textwrap.dedent(CONFIGS["della-strings-and-sci-notation"])) | {"random_seed": 42}
    recipe = recipe_from_dict(data)
    assert recipe.random_seed == 42
    mk = recipe_to_mergekit_dict(recipe)
    assert "random_seed" not in mk
    text = dump_mergekit_yaml(recipe)
    assert "random_seed: 42" not in text and "42" in text.splitlines()[0]  # a comment, not a key
    MergeConfiguration.model_validate(yaml.safe_load(text))
    assert recipe_from_dict(yaml.safe_load(dump_recipe_yaml(recipe))).random_seed == 42


def test_evomerge_only_method_is_not_exported():
    recipe = Recipe.model_validate(
        {"merge_method": "tsv_m", "base_model": "./b", "models": [{"model": "./a"}, {"model": "./c"}]}
    )
    with pytest.raises(ConfigError, match="tsv_m"):
        recipe_to_mergekit_dict(recipe)
    assert recipe_from_dict(yaml.safe_load(dump_recipe_yaml(recipe))) == recipe


# ----------------------------------------------------------------------------------------- errors


BASE = {"merge_method": "linear", "models": [{"model": "./a", "parameters": {"weight": 1.0}}]}
SLICES = {
    "merge_method": "passthrough",
    "slices": [{"sources": [{"model": "./a", "layer_range": [0, 4]}]}],
}


@pytest.mark.parametrize(
    ("data", "key"),
    [
        (BASE | {"merge_methd": "ties"}, "merge_methd"),
        (BASE | {"random_sed": 1}, "random_sed"),
        ({**BASE, "models": [{"model": "./a", "weight": 0.5}]}, "weight"),
        ({**BASE, "models": [{"model": "./a", "parameter": {"weight": 0.5}}]}, "parameter"),
        ({**SLICES, "slices": [{"sources": SLICES["slices"][0]["sources"], "residual_weight": 0.5}]}, "residual_weight"),
        ({**SLICES, "slices": [{"sources": [{"model": "./a", "layer_range": [0, 4], "layers": 4}]}]}, "layers"),
        ({**BASE, "parameters": {"weight": [{"filter": "mlp", "vaule": 0.2}]}}, "vaule"),
    ],
    ids=["top", "top-seed", "model", "model-parameters", "slice", "slice-source", "filter-entry"],
)  # fmt: skip
def test_unknown_key_is_named(data, key, tmp_path):
    with pytest.raises(ConfigError, match=key) as err:
        recipe_from_dict(data, "merge.yaml")
    assert "merge.yaml" in str(err.value)
    # the same through a file
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=key):
        load_recipe(path)


def test_unknown_method_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"'tie'.*Did you mean 'ties'\?"):
        recipe_from_dict(BASE | {"merge_method": "tie"})
    with pytest.raises(ConfigError, match=r"Did you mean 'dare_ties'\?"):
        recipe_from_dict(BASE | {"merge_method": "dare_tie"})
    with pytest.raises(ConfigError, match="frobnicate"):
        recipe_from_dict(BASE | {"merge_method": "frobnicate"})


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"merge_method": "linear", "modules": {"text_decoder": {"models": [{"model": "./a"}]}}}, "modules"),
        (BASE | {"tokenizer": {"source": "union"}, "tokenizer_source": "union"}, "not both"),
        (BASE | {"tokenizer": {"tokens": {"<x>": {"source": {"kind": "mean"}}}}}, "kind: zero"),
        ({"merge_method": "linear"}, "models"),
        (BASE | {"slices": SLICES["slices"]}, "models"),
        (BASE | {"models": []}, "empty"),
        ({**SLICES, "slices": [{"sources": [{"model": "./a", "layer_range": [4, 2]}]}]}, "layer_range"),
        ({**SLICES, "slices": [{"sources": [{"model": "./a", "layer_range": [0, 4]}, {"model": "./b", "layer_range": [0, 2]}]}]}, "same number of layers"),
    ],
    ids=["modules", "tokenizer-both", "token-kind", "no-models", "models-and-slices", "empty-models", "reversed-range", "ragged-slice"],
)  # fmt: skip
def test_unsupported_or_malformed_is_clear(data, words):
    with pytest.raises(ConfigError, match=words):
        recipe_from_dict(data)


def test_bad_yaml_and_missing_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("merge_method: ties\nmodels:\n  - model: a\n   bad: [\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: invalid YAML at line \d+"):
        load_recipe(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_recipe(tmp_path / "missing.yaml")
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_recipe(path)
