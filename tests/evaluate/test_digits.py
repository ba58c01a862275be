"""The M2N2 digits setting: fixed split, reference flat layout, evaluator contract, pre-trained halves."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from evomerge.digits_mlp import NUM_PARAMS, DigitsMLP
from evomerge.evaluate.base import EvaluationError
from evomerge.evaluate.digits import (
    DigitsSpec,
    flatten_params,
    load_digits_split,
    load_flat_params,
    train_digits_mlp,
)


@pytest.fixture(scope="module")
def low_half() -> DigitsMLP:
    return train_digits_mlp({0, 1, 2, 3, 4}, steps=10, seed=42)


def _random_model(seed: int) -> DigitsMLP:
    vec = torch.randn(NUM_PARAMS, generator=torch.Generator().manual_seed(seed)) * 0.05
    return load_flat_params(DigitsMLP(), vec)


def test_split_is_first_1437_train_last_360_test_unshuffled_unscaled():
    x_train, y_train, x_test, y_test = load_digits_split()
    images, labels = load_digits(return_X_y=True)
    assert x_train.shape == (1437, 64) and x_test.shape == (360, 64)
    assert y_train.shape == (1437,) and y_test.shape == (360,)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    np.testing.assert_array_equal(x_train.numpy(), images[:1437].astype(np.float32))
    np.testing.assert_array_equal(y_train.numpy(), labels[:1437])
    np.testing.assert_array_equal(x_test.numpy(), images[1437:].astype(np.float32))
    np.testing.assert_array_equal(y_test.numpy(), labels[1437:])
    assert x_train.max().item() == 16.0 and x_train.min().item() == 0.0


def test_split_tensors_are_fresh_copies():
    x_train, *_ = load_digits_split()
    x_train.zero_()
    assert load_digits_split()[0].max().item() == 16.0


def test_flat_vector_has_19210_entries_and_round_trips():
    model = DigitsMLP()
    assert NUM_PARAMS == 19_210 == sum(p.numel() for p in model.parameters())
    vec = torch.randn(NUM_PARAMS, generator=torch.Generator().manual_seed(0))
    out = flatten_params(load_flat_params(model, vec))
    assert out.shape == (19_210,)
    torch.testing.assert_close(out, vec, rtol=0, atol=0)


def test_flat_vector_uses_reference_order_w1_in_by_out_row_major():
    vec = torch.arange(NUM_PARAMS, dtype=torch.float32)  # exact in fp32 (< 2**24)
    model = load_flat_params(DigitsMLP(), vec)
    i, j, k = 5, 200, 7  # input pixel, hidden unit, class
    assert model.w1[i, j].item() == i * 256 + j  # reference W1[i, j]
    assert model.b1[j].item() == 64 * 256 + j
    assert model.w2[j, k].item() == 64 * 256 + 256 + j * 10 + k  # reference W2[j, k]
    assert model.b2[k].item() == 64 * 256 + 256 + 256 * 10 + k
    assert model.b2[-1].item() == NUM_PARAMS - 1


def test_forward_matches_reference_formula_on_flat_vector():
    vec = torch.randn(NUM_PARAMS, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.05
    model = load_flat_params(DigitsMLP().double(), vec)
    x = load_digits_split()[0][:50].double()
    w1, b1 = vec[:16384].view(64, 256), vec[16384:16640]
    w2, b2 = vec[16640:19200].view(256, 10), vec[19200:]
    expected = torch.relu(x @ w1 + b1) @ w2 + b2
    torch.testing.assert_close(model(x), expected)


def test_load_flat_params_rejects_wrong_length():
    with pytest.raises(EvaluationError, match=r"\(19210,\).*\(100,\)"):
        load_flat_params(DigitsMLP(), torch.zeros(100))


def test_samples_are_per_example_correctness_in_dataset_order_and_average_to_score():
    model = _random_model(2)
    evaluation = DigitsSpec("train").build().evaluate(model)
    samples = evaluation.samples["digits"]
    x, y, _, _ = load_digits_split()
    with torch.no_grad():
        expected = (model(x).argmax(1) == y).numpy()
    assert samples.shape == (1437,)
    np.testing.assert_array_equal(samples, expected.astype(np.float64))
    assert set(np.unique(samples)) <= {0.0, 1.0}
    assert evaluation.scores["digits"] == pytest.approx(samples.mean(), abs=0)
    assert evaluation.forward_passes == 1
    assert evaluation.device == "cpu" and evaluation.seconds >= 0
    assert evaluation.sample_matrix_row().shape == (1437,)


def test_test_split_evaluates_360_examples():
    evaluation = DigitsSpec("test").build().evaluate(_random_model(3))
    assert evaluation.samples["digits"].shape == (360,)


def test_all_zero_model_predicts_class_zero():
    model = load_flat_params(DigitsMLP(), torch.zeros(NUM_PARAMS))
    y = load_digits_split()[1].numpy()
    evaluation = DigitsSpec().build().evaluate(model)
    np.testing.assert_array_equal(evaluation.samples["digits"], (y == 0).astype(np.float64))


def test_in_place_weight_change_between_calls_is_seen(low_half):
    model = DigitsMLP()
    load_flat_params(model, flatten_params(low_half))
    evaluator = DigitsSpec().build()
    before = evaluator.evaluate(model)
    load_flat_params(model, torch.zeros(NUM_PARAMS))  # in place, as a worker does
    after = evaluator.evaluate(model)
    assert before.scores["digits"] != after.scores["digits"]
    assert not np.array_equal(before.samples["digits"], after.samples["digits"])
    load_flat_params(model, flatten_params(low_half))
    again = evaluator.evaluate(model)
    np.testing.assert_array_equal(again.samples["digits"], before.samples["digits"])


def test_same_model_twice_gives_identical_results():
    model = _random_model(4)
    evaluator = DigitsSpec().build()
    a, b = evaluator.evaluate(model), evaluator.evaluate(model)
    assert a.scores == b.scores
    np.testing.assert_array_equal(a.samples["digits"], b.samples["digits"])


def test_half_model_knows_its_digits_and_not_the_others(low_half):
    y = load_digits_split()[1].numpy()
    samples = DigitsSpec().build().evaluate(low_half).samples["digits"]
    own, other = samples[y < 5].mean(), samples[y >= 5].mean()
    assert own > 0.9  # chance is 0.1
    assert other < 0.1


def test_training_is_seeded():
    a = flatten_params(train_digits_mlp({5, 6, 7, 8, 9}, steps=2, seed=7))
    b = flatten_params(train_digits_mlp({5, 6, 7, 8, 9}, steps=2, seed=7))
    c = flatten_params(train_digits_mlp({5, 6, 7, 8, 9}, steps=2, seed=8))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


def test_training_rejects_labels_outside_0_to_9():
    with pytest.raises(EvaluationError, match=r"0\.\.9.*\[3, 12\]"):
        train_digits_mlp({3, 12})


def test_spec_survives_pickling_and_builds_after():
    spec = DigitsSpec(split="test", device="cpu")
    restored = pickle.loads(pickle.dumps(spec))
    assert restored == spec
    model = _random_model(5)
    np.testing.assert_array_equal(
        restored.build().evaluate(model).samples["digits"],
        spec.build().evaluate(model).samples["digits"],
    )


def test_unknown_split_is_an_error():
    with pytest.raises(EvaluationError, match="'valid'"):
        DigitsSpec(split="valid")  # type: ignore[arg-type]


def test_model_with_wrong_output_shape_is_an_error():
    with pytest.raises(EvaluationError, match=r"\(1437, 10\).*\(1437, 5\)"):
        DigitsSpec().build().evaluate(torch.nn.Linear(64, 5))
