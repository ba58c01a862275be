"""CallableSpec: 'module:function' or a function object, picklable, results validated."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from evomerge.evaluate.base import EvaluationError
from evomerge.evaluate.callable import CallableSpec

REF = f"{__name__}:{{}}"  # this module, importable by name in the running process


def weight_sum(model, tokenizer, scale=1.0):
    return {"sum": scale * float(sum(p.detach().sum() for p in model.parameters()))}


def structured(model, tokenizer):
    return {
        "scores": {"acc": np.float32(0.5), "n": 4},
        "samples": {"acc": torch.tensor([1.0, 0.0, 1.0, 0.0])},
        "forward_passes": 3,
    }


def echo(model, tokenizer, result):
    return result


@pytest.fixture
def model():
    layer = torch.nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.bias.fill_(0.5)
    return layer


def test_module_function_string_is_imported_and_called_with_kwargs(model):
    evaluation = CallableSpec(REF.format("weight_sum"), {"scale": 2.0}).build().evaluate(model)
    assert evaluation.scores == {"sum": 5.0}
    assert evaluation.samples == {}
    assert evaluation.forward_passes == 1
    assert evaluation.seconds >= 0 and evaluation.device == "cpu"


def test_function_object_is_called(model):
    assert CallableSpec(weight_sum).build().evaluate(model).scores == {"sum": 2.5}


def test_tokenizer_is_passed_through(model):
    def with_tok(model, tokenizer):
        return {"len": len(tokenizer)}

    assert CallableSpec(with_tok).build().evaluate(model, "abc").scores == {"len": 3.0}


def test_in_place_weight_change_is_seen(model):
    evaluator = CallableSpec(weight_sum).build()
    before = evaluator.evaluate(model).scores["sum"]
    with torch.no_grad():
        model.bias.fill_(-0.5)
    assert evaluator.evaluate(model).scores["sum"] == before - 1.0


def test_structured_result_gives_samples_and_forward_passes(model):
    evaluation = CallableSpec(structured).build().evaluate(model)
    assert evaluation.scores == {"acc": 0.5, "n": 4.0}
    assert all(type(v) is float for v in evaluation.scores.values())
    np.testing.assert_array_equal(evaluation.samples["acc"], [1.0, 0.0, 1.0, 0.0])
    assert evaluation.samples["acc"].dtype == np.float64
    assert evaluation.forward_passes == 3


@pytest.mark.parametrize("fn", [REF.format("weight_sum"), weight_sum])
def test_spec_survives_pickling_and_builds_after(model, fn):
    spec = CallableSpec(fn, {"scale": 3.0})
    restored = pickle.loads(pickle.dumps(spec))
    assert restored.build().evaluate(model).scores == {"sum": 7.5}


@pytest.mark.parametrize(
    ("result", "message"),
    [
        ({"acc": float("nan")}, r"'acc' is not finite \(nan\)"),
        ({"acc": math.inf}, r"'acc' is not finite \(inf\)"),
        ({"acc": "0.5"}, r"'acc' must be a real number, got str '0.5'"),
        ({"acc": None}, r"'acc' must be a real number, got NoneType"),
        ({"acc": True}, r"'acc' must be a real number, got bool"),
        ({"acc": [0.5]}, r"'acc' must be a real number, got list"),
        ([0.5], r"returned list; expected a dict"),
        (0.5, r"returned float; expected a dict"),
        (None, r"returned NoneType; expected a dict"),
        ({}, r"returned no scores"),
        ({"scores": {}}, r"returned no scores"),
        ({"scores": {"acc": 1.0}, "extra": 1}, r"unknown keys \['extra'\]"),
        ({"scores": {"acc": float("nan")}}, r"'acc' is not finite"),
        ({"scores": {"acc": 1.0}, "samples": {"other": [1.0]}}, r"task 'other' which has no score"),
        ({"scores": {"acc": 1.0}, "samples": {"acc": [1.0, np.nan]}}, r"'acc'.*non-finite.*index 1"),
        ({"scores": {"acc": 1.0}, "samples": {"acc": [[1.0]]}}, r"'acc' must be 1-D, got shape \(1, 1\)"),
        ({"scores": {"acc": 1.0}, "samples": {"acc": ["x"]}}, r"'acc' are not numeric"),
        ({"scores": {"acc": 1.0}, "samples": [1.0]}, r"'samples' must be a dict"),
        ({"scores": {"acc": 1.0}, "forward_passes": -1}, r"forward_passes must be a non-negative int"),
        ({1: 0.5}, r"task names must be non-empty strings, got 1"),
    ],
)
def test_bad_results_raise_evaluation_error_naming_the_problem(model, result, message):
    evaluator = CallableSpec(echo, {"result": result}).build()
    with pytest.raises(EvaluationError, match=message) as info:
        evaluator.evaluate(model)
    assert "echo" in str(info.value)  # names the evaluator


def test_scalar_tensors_and_numpy_scalars_are_accepted(model):
    result = {"a": torch.tensor(0.25), "b": np.float64(0.5), "c": np.array(1), "d": 2}
    scores = CallableSpec(echo, {"result": result}).build().evaluate(model).scores
    assert scores == {"a": 0.25, "b": 0.5, "c": 1.0, "d": 2.0}


def test_unknown_module_raises_naming_it():
    spec = CallableSpec("evomerge_no_such_module:fitness")  # constructing is cheap: import in build()
    with pytest.raises(EvaluationError, match=r"'evomerge_no_such_module:fitness'.*cannot import"):
        spec.build()


def test_unknown_function_raises_naming_it():
    with pytest.raises(EvaluationError, match=r"'evomerge.evaluate.digits:nope'.*no attribute 'nope'"):
        CallableSpec("evomerge.evaluate.digits:nope").build()


def test_non_callable_attribute_raises():
    with pytest.raises(EvaluationError, match=r"'evomerge.evaluate.digits:NUM_PARAMS'.*int is not callable"):
        CallableSpec("evomerge.evaluate.digits:NUM_PARAMS").build()


@pytest.mark.parametrize("ref", ["no_colon", ":fn", "mod:", ""])
def test_malformed_reference_raises_at_construction(ref):
    with pytest.raises(EvaluationError, match="expected 'module:function'"):
        CallableSpec(ref)


def test_non_callable_fn_raises():
    with pytest.raises(EvaluationError, match="got int"):
        CallableSpec(3)  # type: ignore[arg-type]
