import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from evomerge.errors import ConfigError
from evomerge.merge.engine import merge_to_dir, open_recipe_sources, plan
from evomerge.merge.mergekit_io import dump_recipe_yaml, recipe_from_dict
from evomerge.merge.methods import METHODS
from evomerge.space import SPACES, LayerwiseSpace, TaskVectorSpace

HYP = settings(max_examples=40, deadline=None, derandomize=True)
BASE, E = "/m/base", ["/m/e0", "/m/e1", "/m/e2"]

CONFIGS = {
    "dare_ties_g2": lambda: LayerwiseSpace("dare_ties", BASE, E, 4, 2),
    "ties_g1": lambda: LayerwiseSpace("ties", BASE, E[:2], 4, 1, fixed={"normalize": False}),
    "ties_filters": lambda: LayerwiseSpace("ties", BASE, E[:2], 4, 2, filters=("self_attn", "mlp")),
    "della_g4": lambda: LayerwiseSpace("della", BASE, E, 4, 4),
    "breadcrumbs_weight_only": lambda: LayerwiseSpace("breadcrumbs", BASE, E, 4, 2, params=("weight",)),
    "linear_with_base": lambda: LayerwiseSpace("linear", BASE, E[:2], 4, 2),
    "slerp_g4": lambda: LayerwiseSpace("slerp", BASE, E[:1], 4, 4),
    "nuslerp": lambda: LayerwiseSpace("nuslerp", None, E[:2], 4, 1),
    "sce": lambda: LayerwiseSpace("sce", BASE, E, 4, 2),
    "task_vector": lambda: TaskVectorSpace(BASE, E, low=-0.5, high=1.5),
}


def _point(space, u):
    return space.lower + np.asarray(u) * (space.upper - space.lower)


def _load_dir(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ---------------------------------------------------------------------------------- names and bounds


def test_layerwise_names_are_readable_and_bounds_match_shapes():
    space = LayerwiseSpace("dare_ties", BASE, E, 4, 2)
    assert space.names[:3] == ("layers.0-1/weight/e0", "layers.0-1/density/e0", "layers.0-1/weight/e1")
    assert "layers.0-1/lambda" in space.names and "layers.2-3/density/e2" in space.names
    assert len(set(space.names)) == space.dim == space.lower.shape[0] == space.upper.shape[0]
    assert np.all(space.lower < space.upper)


def test_single_layer_groups_and_filters_appear_in_names():
    assert LayerwiseSpace("slerp", BASE, E[:1], 4, 4).names == (
        "layers.0/t",
        "layers.1/t",
        "layers.2/t",
        "layers.3/t",
    )
    space = LayerwiseSpace(
        "ties", BASE, E[:1], 4, 1, filters=("self_attn", "mlp"), params=("density",), fixed={"weight": 1.0}
    )
    assert space.names == (
        "layers.0-3/self_attn/density/e0",
        "layers.0-3/mlp/density/e0",
        "layers.0-3/*/density/e0",
    )


def test_labels_from_a_mapping_and_duplicate_directory_names():
    assert LayerwiseSpace("linear", None, {"math": "/a/x", "code": "/b/y"}, 2).names == (
        "layers.0-1/weight/math",
        "layers.0-1/weight/code",
    )
    assert LayerwiseSpace("linear", None, ["/a/model", "/b/model"], 2).labels == ("model#0", "model#1")


def test_bounds_come_from_the_method_registry():
    space = LayerwiseSpace("della", BASE, E, 4, 2)
    for name, lo, hi in zip(space.names, space.lower, space.upper):
        param = METHODS.get("della").param(name.split("/")[1])
        assert (lo, hi) == param.search, name


@pytest.mark.parametrize("method", METHODS.names())
def test_every_search_range_lies_inside_the_valid_range(method):
    for p in METHODS.get(method).params:
        if p.search is not None:
            lo, hi = p.search
            assert lo < hi, p.name
            assert p.low is None or p.low <= lo, p.name
            assert p.high is None or hi <= p.high, p.name


@pytest.mark.parametrize(
    "method,n_sources,base",
    [("linear", 3, None), ("linear", 2, BASE), ("task_arithmetic", 3, BASE), ("ties", 3, BASE),
     ("dare_ties", 2, BASE), ("breadcrumbs_ties", 3, BASE), ("della_linear", 3, BASE), ("sce", 3, BASE),
     ("slerp", 1, BASE), ("nuslerp", 2, BASE), ("multislerp", 3, None), ("tsv_m", 2, BASE)],
)  # fmt: skip
@pytest.mark.parametrize("groups,filters", [(1, ()), (2, ()), (4, ("self_attn", "mlp"))])
def test_genome_dimension_is_groups_models_filters_params(method, n_sources, base, groups, filters):
    space = LayerwiseSpace(method, base, E[:n_sources], 4, groups, filters=filters)
    m = METHODS.get(method)
    per_source = sum(1 for p in m.params if p.search and p.per_source)
    shared = sum(1 for p in m.params if p.search and not p.per_source)
    models = n_sources + (base is not None and m.base == "input")  # an input method merges the base too
    sets = len(filters) + 1
    assert space.dim == groups * models * sets * per_source + groups * sets * shared


def test_typical_genome_sizes():
    # mergekit-evolve: dare_ties, 3 models, 32 layers one group per layer, weight + density
    assert LayerwiseSpace("dare_ties", BASE, E, 32, 32, params=("weight", "density")).dim == 32 * 3 * 2
    assert LayerwiseSpace("dare_ties", BASE, E, 32, 8).dim == 8 * 3 * 2 + 8  # + lambda per group
    assert LayerwiseSpace("slerp", BASE, E[:1], 32, 4).dim == 4
    assert TaskVectorSpace(BASE, E).dim == 3


def test_initial_is_mergekit_evolve_x0():
    space = LayerwiseSpace("ties", BASE, E, 4, 2)
    x = dict(zip(space.names, space.initial()))
    assert x["layers.0-1/weight/e0"] == pytest.approx(1 / 3)
    assert x["layers.2-3/density/e2"] == 1.0 and x["layers.0-1/lambda"] == 1.0
    space = LayerwiseSpace("della", BASE, E, 4)
    della = dict(zip(space.names, space.initial()))
    assert della["layers.0-3/epsilon/e0"] == 0.1  # default 0.15 clipped into the search box


# ---------------------------------------------------------------------------------- decode / encode


@pytest.mark.parametrize("config", CONFIGS)
@HYP
@given(data=st.data())
def test_decode_encode_round_trip(config, data):
    space = CONFIGS[config]()
    u = data.draw(st.lists(st.floats(0, 1), min_size=space.dim, max_size=space.dim))
    x = _point(space, u)
    recipe = space.decode(x)
    np.testing.assert_array_equal(space.encode(recipe), x)
    assert space.decode(space.encode(recipe)) == recipe


@pytest.mark.parametrize("config", CONFIGS)
def test_decode_survives_a_yaml_round_trip(config):
    space = CONFIGS[config]()
    recipe = space.decode(space.sample(np.random.default_rng(0)))
    again = recipe_from_dict(yaml.safe_load(dump_recipe_yaml(recipe)))
    assert again == recipe
    np.testing.assert_array_equal(space.encode(again), space.encode(recipe))


@pytest.mark.parametrize("config", CONFIGS)
def test_decode_clips_out_of_box_genomes(config):
    space = CONFIGS[config]()
    assert space.decode(space.upper + 5) == space.decode(space.upper)
    assert space.decode(space.lower - 5) == space.decode(space.lower)
    x = space.initial()
    x[0] = space.upper[0] + 1
    np.testing.assert_array_equal(space.encode(space.decode(x)), space.clip(x))


def test_decode_rejects_nan_and_wrong_length_naming_the_gene():
    space = LayerwiseSpace("ties", BASE, E, 4, 2)
    x = space.initial()
    x[3] = np.nan
    with pytest.raises(ConfigError, match="layers.0-1/density/e1"):
        space.decode(x)
    with pytest.raises(ConfigError, match=r"expects \(14,\)"):
        space.decode(np.zeros(3))


def test_layer_groups_map_to_layer_ranges_and_base_is_listed_last():
    space = LayerwiseSpace("dare_ties", BASE, E[:2], 6, 3)
    x = _point(space, np.arange(space.dim) / space.dim)
    recipe = space.decode(x)
    assert recipe.base_model == BASE and recipe.models is None and len(recipe.slices) == 3
    values = dict(zip(space.names, x))
    for s, (a, b) in zip(recipe.slices, [(0, 2), (2, 4), (4, 6)]):
        assert [src.model for src in s.sources] == [*E[:2], BASE] and s.base_model == BASE
        assert all(src.layer_range == (a, b) for src in s.sources)
        assert s.sources[-1].parameters is None
        assert s.sources[1].parameters == {
            "weight": values[f"layers.{a}-{b - 1}/weight/e1"],
            "density": values[f"layers.{a}-{b - 1}/density/e1"],
        }
        assert s.parameters == {"lambda": values[f"layers.{a}-{b - 1}/lambda"]}


def test_filters_decode_to_conditional_lists_with_a_default():
    space = LayerwiseSpace(
        "ties", BASE, E[:1], 4, 1, filters=("self_attn", "mlp"), params=("density",), fixed={"weight": 1.0}
    )
    recipe = space.decode(np.array([0.2, 0.3, 0.4]))
    assert recipe.to_dict()["slices"][0]["sources"][0]["parameters"] == {
        "density": [{"filter": "self_attn", "value": 0.2}, {"filter": "mlp", "value": 0.3}, {"value": 0.4}]
    }


def test_fixed_goes_to_top_level_parameters():
    recipe = LayerwiseSpace("ties", BASE, E, 4, fixed={"normalize": True, "int8_mask": True}).decode(
        np.full(7, 0.5)
    )
    assert recipe.parameters == {"normalize": True, "int8_mask": True}


def test_encode_reads_a_hand_written_models_recipe_and_gradients_at_group_centres():
    space = LayerwiseSpace("ties", BASE, E[:2], 4, 2)
    recipe = recipe_from_dict(
        {
            "merge_method": "ties",
            "base_model": BASE,
            "models": [
                {"model": E[0], "parameters": {"weight": [0.0, 0.6], "density": 0.5}},
                {"model": E[1], "parameters": {"weight": 0.7}},
            ],
            "parameters": {"lambda": 0.9},
        }
    )
    x = dict(zip(space.names, space.encode(recipe)))
    # 4 layers, u = j/3: group 0 centre j = 0.5 -> u = 1/6, group 1 centre j = 2.5 -> u = 5/6
    assert x["layers.0-1/weight/e0"] == pytest.approx(0.1) and x["layers.2-3/weight/e0"] == pytest.approx(0.5)
    assert x["layers.0-1/density/e1"] == 1.0  # method default
    assert x["layers.2-3/weight/e1"] == 0.7 and x["layers.2-3/lambda"] == 0.9


def test_encode_clips_out_of_box_values_and_logs_them(caplog):
    space = LayerwiseSpace("task_arithmetic", BASE, E[:1], 4)
    recipe = recipe_from_dict(
        {"merge_method": "task_arithmetic", "base_model": BASE, "models": [{"model": E[0], "parameters": {"weight": 2.0}}],
         "parameters": {"lambda": 0.1}}
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="evomerge.space.layerwise"):
        x = space.encode(recipe)
    np.testing.assert_array_equal(x, [1.0, 0.5])
    assert "layers.0-3/weight/e0 2 -> 1" in caplog.text and "layers.0-3/lambda 0.1 -> 0.5" in caplog.text


@pytest.mark.parametrize(
    "change,match",
    [
        ({"merge_method": "dare_ties"}, "method 'dare_ties'"),
        ({"models": [{"model": E[0], "parameters": {"weight": 1.0}}]}, "missing /m/e1"),
        ({"base_model": "/m/other"}, "not in the space /m/other"),
        ({"models": None, "slices": [{"sources": [{"model": m, "layer_range": [0, 2]} for m in (*E[:2], BASE)]}]},
         "2 layers"),
        ({"models": None, "slices": [{"sources": [{"model": m, "layer_range": [2, 4]} for m in (*E[:2], BASE)]}]},
         "keeps every layer in place"),
        ({"models": [{"model": E[0], "parameters": {"weight": 1.0}}, {"model": E[1]}]}, "no 'weight'"),
    ],
)  # fmt: skip
def test_encode_rejects_recipes_of_another_shape(change, match):
    space = LayerwiseSpace("ties", BASE, E[:2], 4, 2)
    data = {"merge_method": "ties", "base_model": BASE,
            "models": [{"model": m, "parameters": {"weight": 0.5}} for m in E[:2]], **change}  # fmt: skip
    with pytest.raises(ConfigError, match=match):
        space.encode(recipe_from_dict({k: v for k, v in data.items() if v is not None}))


# ---------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_layers": 4, "layer_groups": 3}, "layer_groups 3 does not divide num_layers 4"),
        ({"num_layers": 4, "layer_groups": 0}, "layer_groups must be a positive integer"),
        ({"params": ("densty",)}, "no parameter 'densty'"),
        ({"params": ("normalize",)}, "'normalize' of method 'ties' has no search range"),
        ({"params": ()}, "no parameter of method 'ties' to search"),
        ({"method": "model_stock"}, "'model_stock' has no searchable parameters"),
        ({"method": "karcher", "base": None}, "'karcher' has no searchable parameters"),
        ({"method": "tiez"}, "Did you mean 'ties'"),
        ({"base": None}, "'ties' needs a base model"),
        ({"base": E[0]}, "also listed among the sources"),
        ({"method": "slerp"}, "'slerp' takes exactly 1 non-base models \\(got 3\\)"),
        ({"method": "model_stock", "sources": E[:1]}, "model_stock"),
        ({"fixed": {"rescal": "l1"}}, "no parameter 'rescal'"),
        ({"fixed": {"lambda": 1.0}}, "'lambda' is searched"),
        ({"fixed": {"normalize": "maybe"}}, "normalize"),
        ({"params": ("density",)}, "'weight' of method 'ties' is required"),
        ({"filters": ("mlp", "mlp")}, "lists a filter twice"),
        ({"filters": ("*",)}, "filters"),
        ({"sources": []}, "at least one model"),
        ({"sources": [E[0], E[0]]}, "listed twice"),
    ],
)
def test_bad_layerwise_config_is_a_config_error_naming_the_culprit(kwargs, match):
    args = {"method": "ties", "base": BASE, "sources": E, "num_layers": 4, **kwargs}
    with pytest.raises(ConfigError, match=match):
        LayerwiseSpace(**args)


# ---------------------------------------------------------------------------------- through the engine


def _pool_space(pool, method, n, groups=1, **kw):
    base = str(pool["base"])
    return LayerwiseSpace(method, base, [str(pool[f"e{i}"]) for i in range(n)], 4, groups, **kw)


@pytest.mark.parametrize(
    "method,n,groups,kw",
    [("ties", 3, 2, {}), ("dare_ties", 2, 4, {"filters": ("self_attn", "mlp")}), ("slerp", 1, 2, {}),
     ("linear", 2, 1, {}), ("nuslerp", 2, 2, {}), ("della", 2, 1, {}), ("sce", 3, 2, {})],
)  # fmt: skip
def test_decoded_recipes_plan_through_the_engine(pool, method, n, groups, kw):
    space = _pool_space(pool, method, n, groups, **kw)
    recipe = space.decode(space.initial())
    p = plan(recipe, open_recipe_sources(recipe))
    assert p.config["num_hidden_layers"] == 4
    assert {j.name for j in p.jobs} == set(open_recipe_sources(recipe)[str(pool["base"])].tensors)


def test_planned_parameters_follow_layer_groups_and_filters(pool):
    space = _pool_space(
        pool, "ties", 2, 2, filters=("self_attn", "mlp"), params=("density",), fixed={"weight": 1.0}
    )
    x = np.linspace(0.2, 0.9, space.dim)
    values = dict(zip(space.names, x))
    jobs = {j.name: j for j in plan(space.decode(x), open_recipe_sources(space.decode(x))).jobs}
    for layer, group in [(0, "layers.0-1"), (1, "layers.0-1"), (2, "layers.2-3"), (3, "layers.2-3")]:
        for tensor, filt in [("self_attn.q_proj.weight", "self_attn"), ("mlp.up_proj.weight", "mlp"),
                             ("input_layernorm.weight", "*")]:  # fmt: skip
            want = tuple(values[f"{group}/{filt}/density/e{i}"] for i in range(2))
            assert jobs[f"model.layers.{layer}.{tensor}"].per_source["density"] == want


def test_merged_layerwise_equals_hand_written_models_recipe(tmp_path, pool):
    space = _pool_space(pool, "ties", 2, 1)
    values = {"weight/e0": 0.8, "density/e0": 0.5, "weight/e1": 0.3, "density/e1": 0.7, "lambda": 0.9}
    x = np.array([values[n.split("/", 1)[1]] for n in space.names])
    hand = recipe_from_dict(
        {
            "merge_method": "ties",
            "base_model": str(pool["base"]),
            "models": [
                {"model": str(pool["e0"]), "parameters": {"weight": 0.8, "density": 0.5}},
                {"model": str(pool["e1"]), "parameters": {"weight": 0.3, "density": 0.7}},
            ],
            "parameters": {"lambda": 0.9},
        }
    )
    np.testing.assert_array_equal(space.encode(hand), x)
    decoded = _load_dir(merge_to_dir(space.decode(x), tmp_path / "decoded"))
    _assert_same_tensors(decoded, _load_dir(merge_to_dir(hand, tmp_path / "hand")))


def test_merged_layer_groups_splice_per_group_merges(tmp_path, pool):
    """Two groups = layers 0-1 of a merge with group 0's values, layers 2-3 of one with group 1's."""
    space = _pool_space(pool, "dare_ties", 2, 2)
    x = np.array([0.9, 0.4, 0.2, 0.8, 1.1, 0.3, 0.6, 0.5, 1.0, 0.7])
    grouped = _load_dir(merge_to_dir(space.decode(x), tmp_path / "grouped"))
    whole = LayerwiseSpace(space.method, space.base, space.models, 4, 1)
    first = _load_dir(merge_to_dir(whole.decode(x[:5]), tmp_path / "first"))
    second = _load_dir(merge_to_dir(whole.decode(x[5:]), tmp_path / "second"))
    for name, t in grouped.items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        from_first = layer in (0, 1) or (layer is None and "embed" in name)
        assert torch.equal(t, (first if from_first else second)[name]), name


def test_merged_slerp_equals_hand_written(tmp_path, pool):
    space = _pool_space(pool, "slerp", 1, 1)
    hand = recipe_from_dict(
        {"merge_method": "slerp", "base_model": str(pool["base"]), "models": [{"model": str(pool["e0"])}],
         "parameters": {"t": 0.3}}
    )  # fmt: skip
    np.testing.assert_array_equal(space.encode(hand), [0.3])
    decoded = _load_dir(merge_to_dir(space.decode(np.array([0.3])), tmp_path / "decoded"))
    _assert_same_tensors(decoded, _load_dir(merge_to_dir(hand, tmp_path / "hand")))


# ---------------------------------------------------------------------------------- task vectors


def test_task_vector_decode_is_task_arithmetic_with_unit_lambda():
    space = TaskVectorSpace(BASE, E)
    assert space.names == ("weight/e0", "weight/e1", "weight/e2")
    recipe = space.decode(np.array([0.1, 0.5, 2.0]))
    assert recipe.to_dict() == {
        "merge_method": "task_arithmetic",
        "base_model": BASE,
        "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(E, (0.1, 0.5, 1.0))],
        "parameters": {"lambda": 1.0, "normalize": False},
    }


def test_task_vector_encode_folds_lambda_and_rejects_normalize_and_gradients():
    space = TaskVectorSpace(BASE, E[:2], low=-1, high=1)

    def recipe(params, w0=0.4):
        return recipe_from_dict(
            {"merge_method": "task_arithmetic", "base_model": BASE, "parameters": params,
             "models": [{"model": E[0], "parameters": {"weight": w0}}, {"model": E[1], "parameters": {"weight": -0.6}}]}
        )  # fmt: skip

    np.testing.assert_allclose(space.encode(recipe({"lambda": 0.5})), [0.2, -0.3])
    with pytest.raises(ConfigError, match="normalize: true"):
        space.encode(recipe({"normalize": True}))
    with pytest.raises(ConfigError, match="single number"):
        space.encode(recipe({}, w0=[0.1, 0.2]))
    with pytest.raises(ConfigError, match="task_arithmetic"):
        space.encode(recipe_from_dict({**recipe({}).to_dict(), "merge_method": "ties"}))


def test_task_vector_merge_equals_layerwise_task_arithmetic(tmp_path, pool):
    refs = [str(pool["e0"]), str(pool["e1"])]
    tv = TaskVectorSpace(pool["base"], refs)
    lw = LayerwiseSpace("task_arithmetic", str(pool["base"]), refs, 4, params=("weight",))
    x = np.array([0.25, 0.6])
    _assert_same_tensors(
        _load_dir(merge_to_dir(tv.decode(x), tmp_path / "tv")),
        _load_dir(merge_to_dir(lw.decode(x), tmp_path / "lw")),
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [({"low": 1.0, "high": 0.0}, "low < high"), ({"base": None}, "needs a base"),
     ({"sources": [BASE]}, "also listed"), ({"high": float("inf")}, "finite")],
)  # fmt: skip
def test_bad_task_vector_config_is_a_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TaskVectorSpace(**{"base": BASE, "sources": E, **kwargs})


# ---------------------------------------------------------------------------------- registry


def test_spaces_registry_names_both_spaces():
    assert SPACES.get("layerwise") is LayerwiseSpace and SPACES.get("task_vector") is TaskVectorSpace
    with pytest.raises(ConfigError, match="Did you mean 'layerwise'"):
        SPACES.get("layerwse")


def test_importing_spaces_does_not_import_torch():
    code = "import sys, evomerge.space; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
