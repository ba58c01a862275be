"""Formula tests for every merge method in evomerge/merge/methods.py.

Expected values come from hand calculation or from short independent reimplementations below (plain
Python loops / numpy in float64), never from the functions under test. Formulas: ALGORITHMS.md
sections 1 and 2; where it and mergekit 0.1.5 differ, mergekit 0.1.5 (see the module docstring).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.errors import ConfigError, MergeError
from evomerge.merge.methods import (
    METHODS,
    bernoulli_prune,
    breadcrumbs_prune,
    della_prune,
    magnitude_prune,
    rescale_to_norm,
    task_arithmetic_family,
    top_k_mask,
)

HYP = settings(max_examples=40, deadline=None, derandomize=True)


def run(name: str, base, tensors, *, seed: int | None = None, **params):
    """Call a registered method the way the engine does (stacked fp32 inputs, `gen`, lambda -> lambda_)."""
    method = METHODS.get(name)
    if "lambda" in params:
        params["lambda_"] = params.pop("lambda")
    for p in method.params:  # the engine fills every optional parameter with its validated default
        key = "lambda_" if p.name == "lambda" else p.name
        if key not in params and not p.required:
            value = p.validate(p.default, name)
            params[key] = (value,) * len(tensors) if p.per_source else value
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    base_t = None if base is None else torch.as_tensor(base, dtype=torch.float32)
    stacked = torch.stack([torch.as_tensor(t, dtype=torch.float32) for t in tensors])
    return method.fn(base_t, stacked, gen=gen, **params)


def t32(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float32)


def close(actual: torch.Tensor, expected, *, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    exp = torch.as_tensor(np.asarray(expected, dtype=np.float64))
    assert actual.shape == exp.shape, (actual.shape, exp.shape)
    torch.testing.assert_close(actual.double(), exp, atol=atol, rtol=rtol)


def sign(x: float) -> int:
    return int(x > 0) - int(x < 0)


# ------------------------------------------------------------------------- independent references


def ref_trim(delta: list[float], density: float) -> list[float]:
    """TIES trim, mergekit 0.1.5: d >= 1 keeps all, d <= 0 drops all, else the max(1, floor(d*n)) largest
    |x|; equal magnitudes keep the lower index."""
    n = len(delta)
    if density >= 1:
        return list(delta)
    if density <= 0:
        return [0.0] * n
    k = max(1, math.floor(density * n))
    keep = set(sorted(range(n), key=lambda j: (-abs(delta[j]), j))[:k])
    return [delta[j] if j in keep else 0.0 for j in range(n)]


def ref_breadcrumbs_trim(delta: list[float], density: float, gamma: float) -> list[float]:
    """Breadcrumbs band: ascending stable order of |x|, keep positions [n_bot, n_bot + floor(d*n))."""
    n = len(delta)
    if density >= 1:
        return list(delta)
    n_keep, n_top = math.floor(density * n), math.floor(gamma * n)
    n_bot = max(0, n - n_keep - n_top)
    keep = set(sorted(range(n), key=lambda j: (abs(delta[j]), j))[n_bot : n_bot + n_keep])
    return [delta[j] if j in keep else 0.0 for j in range(n)]


def ref_gta(
    base, experts, weights, *, densities=None, consensus=None, normalize=False, lam=1.0, trim=ref_trim
):
    """Task arithmetic / TIES per element with Python loops (ALGORITHMS.md 2.2 and 2.6)."""
    base = [float(v) for v in np.asarray(base, dtype=np.float64).ravel()]
    n = len(base)
    deltas = [[float(e) - b for e, b in zip(np.asarray(x, dtype=np.float64).ravel(), base)] for x in experts]
    if densities is not None:
        deltas = [trim(d, dens) for d, dens in zip(deltas, densities)]
    weighted = [[w * v for v in d] for d, w in zip(deltas, weights)]
    out = []
    for j in range(n):
        vals = [wd[j] for wd in weighted]
        if consensus is None:
            agree = [True] * len(vals)
            num = sum(vals)
            den = sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0
        else:
            votes = sum(vals) if consensus == "sum" else sum(sign(v) for v in vals)
            elected = 1 if votes >= 0 else -1
            agree = [sign(v) == elected for v in vals]
            num = sum(v for v, a in zip(vals, agree) if a)
            den = sum(w for w, a in zip(weights, agree) if a)
            den = den if den != 0 else 1.0
        out.append(base[j] + lam * (num / den if normalize else num))
    return np.array(out).reshape(np.asarray(experts[0]).shape)


def ref_slerp(t: float, v0, v1, threshold: float = 0.9995):
    """ALGORITHMS.md 2.3 in float64."""
    a, b = np.asarray(v0, np.float64), np.asarray(v1, np.float64)
    fa, fb = a.ravel(), b.ravel()
    na, nb = np.linalg.norm(fa), np.linalg.norm(fb)
    ua = fa / na if na > 1e-8 else fa
    ub = fb / nb if nb > 1e-8 else fb
    c = float(np.clip(ua @ ub, -1, 1))
    if abs(c) > threshold:
        return ((1 - t) * fa + t * fb).reshape(a.shape)
    om = math.acos(c)
    return ((math.sin((1 - t) * om) * fa + math.sin(t * om) * fb) / math.sin(om)).reshape(a.shape)


def ref_nuslerp_vec(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One NuSLERP vector pair (ALGORITHMS.md 2.4): norms clamped at 1e-7, lerp when colinear."""
    ua = a / max(np.linalg.norm(a), 1e-7)
    ub = b / max(np.linalg.norm(b), 1e-7)
    c = float(np.clip(ua @ ub, -1, 1))
    if 1 - c * c <= 1e-16:
        return (1 - t) * a + t * b
    om = math.acos(c)
    return (math.sin((1 - t) * om) * a + math.sin(t * om) * b) / math.sin(om)


def ref_multislerp(vectors, weights, *, normalize_weights=True, eps=1e-8):
    """Barycentric interpolation on the sphere: tangent space at the weighted mean direction."""
    x = np.asarray(vectors, np.float64).reshape(len(vectors), -1)
    w = np.asarray(weights, np.float64)
    if normalize_weights:
        w = w / w.sum()
    norms = np.linalg.norm(x, axis=1)
    units = x / (norms[:, None] + eps)
    mean = (units * w[:, None]).sum(0)
    mean = mean / np.linalg.norm(mean)
    tangent = np.zeros_like(mean)
    for i in range(len(x)):
        tangent += w[i] * (units[i] - (units[i] @ mean) * mean)
    tn = np.linalg.norm(tangent) + eps
    out = mean * math.cos(tn) + tangent * math.sin(tn) / tn
    return (out * (norms * w).sum()).reshape(np.asarray(vectors[0]).shape)


def ref_sce(base, experts, select_topk=1.0):
    """ALGORITHMS.md 2.10 in float64 with explicit loops."""
    b = np.asarray(base, np.float64).ravel()
    d = np.stack([np.asarray(e, np.float64).ravel() - b for e in experts])
    k_models, n = d.shape
    if select_topk < 1:
        if select_topk <= 0:
            d = d * 0
        else:
            var = d.var(0)
            k = math.floor(int(np.count_nonzero(var)) * select_topk)
            keep = sorted(range(n), key=lambda j: (-var[j], j))[:k]
            mask = np.zeros(n)
            mask[keep] = 1
            d = d * mask
    energy = (d**2).mean(1)
    c = energy / energy.sum() if abs(energy.sum()) >= 1e-6 else np.full(k_models, 1 / k_models)
    out = b.copy()
    for j in range(n):
        elected = 1 if d[:, j].sum() >= 0 else -1
        cw = [c[i] if sign(d[i, j]) == elected else 0.0 for i in range(k_models)]
        out[j] += sum(cw[i] * d[i, j] for i in range(k_models)) / max(sum(cw), 1e-6)
    return out.reshape(np.asarray(base).shape)


def ref_polar(m: np.ndarray) -> np.ndarray:
    p, _, qt = np.linalg.svd(m, full_matrices=False)
    return p @ qt


def ref_tsv_m(base, experts, alpha=1.0):
    """ALGORITHMS.md 2.16 in float64."""
    b = np.asarray(base, np.float64)
    deltas = [np.asarray(e, np.float64) - b for e in experts]
    n_tasks = len(deltas)
    k = min(b.shape)
    r = k // n_tasks
    u_bar, s_bar, vt_bar = np.zeros((b.shape[0], k)), np.zeros(k), np.zeros((k, b.shape[1]))
    for i, d in enumerate(deltas):
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        u_bar[:, i * r : (i + 1) * r] = u[:, :r]
        s_bar[i * r : (i + 1) * r] = s[:r]
        vt_bar[i * r : (i + 1) * r] = vt[:r]
    return b + alpha * ref_polar(u_bar) @ np.diag(s_bar) @ ref_polar(vt_bar)


def random_orthogonal(n: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q


# ------------------------------------------------------------------------------------------ registry


def test_registry_lists_exactly_the_methods_these_tests_cover():
    """A new method needs formula tests: here, or its own file (evo_merging: tests/merge/test_evo_merging.py)."""
    assert set(METHODS.names()) == {
        "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
        "della", "della_linear", "sce", "model_stock", "slerp", "nuslerp", "multislerp", "karcher",
        "passthrough", "tsv_m", "iso_c", "evo_merging",
    }  # fmt: skip


def test_random_methods_are_exactly_dare_and_della():
    assert {n for n in METHODS.names() if METHODS.get(n).random} == {
        "dare_ties",
        "dare_linear",
        "della",
        "della_linear",
    }


@pytest.mark.parametrize(
    ("name", "normalize", "rescale"),
    [
        ("task_arithmetic", False, False),
        ("ties", True, False),
        ("dare_ties", False, True),
        ("dare_linear", False, True),
        ("breadcrumbs", False, False),
        ("breadcrumbs_ties", False, False),
        ("della", True, True),
        ("della_linear", False, True),
    ],
)
def test_task_arithmetic_family_defaults_match_mergekit(name, normalize, rescale):
    method = METHODS.get(name)
    assert method.param("normalize").default is normalize
    assert method.param("rescale").default is rescale
    assert method.param("density").default == 1.0
    assert method.param("lambda").default == 1.0


# ------------------------------------------------------------------------------------- Param.validate


def test_param_validate_negative_density_raises_config_error_naming_the_parameter():
    with pytest.raises(ConfigError, match=r"models\[0\].*'density'"):
        METHODS.get("ties").param("density").validate(-0.1, "models[0]")


def test_param_validate_density_above_one_raises_config_error():
    with pytest.raises(ConfigError, match="density"):
        METHODS.get("dare_ties").param("density").validate(1.5, "here")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, "l1"),
        (False, "none"),
        ("true", "l1"),
        ("false", "none"),
        ("inverse_density", "inverse_density"),
    ],
)
def test_param_validate_rescale_maps_mergekit_booleans_to_modes(value, expected):
    assert METHODS.get("dare_linear").param("rescale").validate(value, "x") == expected


def test_param_validate_unknown_rescale_mode_raises_config_error():
    with pytest.raises(ConfigError, match="'rescale'"):
        METHODS.get("dare_linear").param("rescale").validate("l7", "x")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "abc", True])
def test_param_validate_rejects_non_finite_or_non_numeric_weight(value):
    with pytest.raises(ConfigError, match="'weight'"):
        METHODS.get("linear").param("weight").validate(value, "x")


def test_param_validate_bool_strings_and_int_coercion():
    assert METHODS.get("linear").param("normalize").validate("False", "x") is False
    assert METHODS.get("karcher").param("max_iter").validate(3.0, "x") == 3
    with pytest.raises(ConfigError, match="'max_iter'"):
        METHODS.get("karcher").param("max_iter").validate(0, "x")


# ---------------------------------------------------------------------------------------- top_k_mask


def test_top_k_mask_keeps_the_k_largest():
    mask = top_k_mask(t32([0.5, 3.0, -1.0, 2.0, 0.1]), 2)
    assert mask.tolist() == [False, True, False, True, False]


def test_top_k_mask_ties_keep_the_lower_flat_index():
    mask = top_k_mask(t32([1.0, 2.0, 1.0, 1.0, 2.0, 1.0]), 4)
    assert mask.tolist() == [True, True, True, False, True, False]


@pytest.mark.parametrize("k", [0, -3])
def test_top_k_mask_k_zero_or_negative_keeps_nothing(k):
    assert not top_k_mask(t32([1.0, 2.0, 3.0]), k).any()


@pytest.mark.parametrize("k", [3, 4, 100])
def test_top_k_mask_k_at_least_n_keeps_everything(k):
    assert top_k_mask(t32([1.0, 2.0, 3.0]), k).all()


@HYP
@given(st.lists(st.integers(0, 3), min_size=1, max_size=40), st.integers(0, 45))
def test_top_k_mask_equals_stable_descending_argsort(values, k):
    x = t32(values)
    expected = torch.zeros(len(values), dtype=torch.bool)
    expected[torch.argsort(-x, stable=True)[:k]] = True
    assert torch.equal(top_k_mask(x, k), expected)


@HYP
@given(st.lists(st.integers(0, 3), min_size=1, max_size=40), st.integers(-2, 45))
def test_lowest_m_mask_equals_stable_ascending_sort(values, m):
    from evomerge.merge.methods import lowest_m_mask

    x = t32(values)
    expected = torch.zeros(len(values), dtype=torch.bool)
    expected[torch.sort(x, stable=True).indices[: max(m, 0)]] = True
    assert torch.equal(lowest_m_mask(x, m), expected)


# ---------------------------------------------------------------------------------------- linear


def test_linear_normalized_is_weighted_mean():
    out = run("linear", None, [[1.0, 2.0], [3.0, -4.0], [0.0, 8.0]], weight=(1.0, 2.0, 1.0))
    close(out, [(1 + 6 + 0) / 4, (2 - 8 + 8) / 4])


def test_linear_unnormalized_is_weighted_sum():
    out = run("linear", None, [[1.0, 2.0], [3.0, -4.0]], weight=(0.5, 2.0), normalize=False)
    close(out, [0.5 + 6, 1 - 8])


def test_linear_weights_summing_to_zero_with_normalize_raises_merge_error():
    with pytest.raises(MergeError, match="normalize"):
        run("linear", None, [[1.0], [2.0]], weight=(1.0, -1.0))


def test_linear_weights_summing_to_zero_without_normalize_is_the_difference():
    close(run("linear", None, [[1.0], [3.0]], weight=(1.0, -1.0), normalize=False), [-2.0])


@pytest.mark.parametrize("hot", [0, 1, 2])
def test_linear_one_hot_weights_return_that_model(hot):
    models = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(hot))
    weight = tuple(1.0 if i == hot else 0.0 for i in range(3))
    assert torch.equal(run("linear", None, list(models), weight=weight), models[hot])


def test_linear_one_source_returns_it():
    x = [[1.5, -2.0], [0.25, 4.0]]
    close(run("linear", None, [x], weight=(0.3,)), x)


# ------------------------------------------------------------------------------- task arithmetic


def test_task_arithmetic_formula():
    base = [1.0, 0.0, -1.0]
    experts = [[2.0, 1.0, -1.0], [0.0, 3.0, 1.0]]
    out = run("task_arithmetic", base, experts, weight=(0.5, 2.0), lambda_=1.5)
    # tau1 = [1, 1, 0], tau2 = [-1, 3, 2]; 0.5 tau1 + 2 tau2 = [-1.5, 6.5, 4]
    close(out, [1 - 1.5 * 1.5, 0 + 1.5 * 6.5, -1 + 1.5 * 4])


def test_task_arithmetic_normalize_divides_by_weight_sum():
    out = run("task_arithmetic", [0.0, 0.0], [[2.0, 4.0], [4.0, 0.0]], weight=(1.0, 3.0), normalize=True)
    close(out, [(2 + 12) / 4, 4 / 4])


def test_task_arithmetic_normalize_with_zero_weight_sum_uses_divisor_one():
    out = run("task_arithmetic", [1.0], [[3.0], [2.0]], weight=(1.0, -1.0), normalize=True)
    close(out, [1.0 + (2.0 - 1.0)])


def test_task_arithmetic_negative_weight_negates_the_task():
    close(run("task_arithmetic", [1.0, 1.0], [[2.0, 0.0]], weight=(-1.0,)), [0.0, 2.0])


def test_task_arithmetic_without_sources_returns_base():
    base = torch.randn(3, 2)
    out = METHODS.get("task_arithmetic").fn(base, base.new_empty((0, 3, 2)), gen=None, weight=())
    assert torch.equal(out, base)


@HYP
@given(
    st.lists(st.floats(-10, 10, width=32), min_size=6, max_size=6),
    st.integers(1, 4),
    st.floats(-3, 3),
    st.booleans(),
)
def test_task_arithmetic_zero_weights_return_base(values, k, lam, normalize):
    base = t32(values).view(2, 3)
    experts = [base + torch.randn(2, 3, generator=torch.Generator().manual_seed(i)) for i in range(k)]
    out = run("task_arithmetic", base, experts, weight=(0.0,) * k, lambda_=lam, normalize=normalize)
    close(out, base.double().numpy(), atol=1e-6)


@HYP
@given(st.integers(0, 2**16), st.integers(2, 4), st.booleans())
def test_task_arithmetic_ignores_source_order(seed, k, normalize):
    g = torch.Generator().manual_seed(seed)
    base, experts = torch.randn(5, generator=g), torch.randn(k, 5, generator=g)
    weights = tuple(float(w) for w in torch.rand(k, generator=g) + 0.1)
    perm = torch.randperm(k, generator=g).tolist()
    a = run("task_arithmetic", base, list(experts), weight=weights, normalize=normalize)
    b = run(
        "task_arithmetic",
        base,
        [experts[i] for i in perm],
        weight=tuple(weights[i] for i in perm),
        normalize=normalize,
    )
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ TIES


def test_ties_hand_computed_trim_elect_disjoint_mean():
    base = [0.0, 0.0, 0.0, 0.0]
    experts = [[3.0, -1.0, 2.0, 0.5], [-4.0, 2.0, 1.0, 0.2], [1.0, 1.0, -0.5, -3.0]]
    out = run("ties", base, experts, weight=(1.0, 1.0, 1.0), density=(0.5, 0.5, 0.5), normalize=True)
    # trim (top 2 of 4): e1 -> [3, 0, 2, 0]; e2 -> [-4, 2, 0, 0]; e3 |x| = [1, 1, 0.5, 3] keeps index 3
    # and index 0 (the lower index of the tie at 1) -> [1, 0, 0, -3]
    # elect by sum: col0 3-4+1=0 -> +1; col1 0+2+0=2 -> +; col2 2 -> +; col3 -3 -> -
    # disjoint mean: col0 (3+1)/2 = 2; col1 2/1; col2 2/1; col3 -3/1
    close(out, [2.0, 2.0, 2.0, -3.0])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("consensus", ["ties", "breadcrumbs_ties"])
def test_ties_matches_loop_reference_on_random_integer_tensors(seed, consensus):
    g = np.random.default_rng(seed)
    base = g.integers(-3, 4, size=(3, 4)).astype(np.float32)
    experts = [base + g.integers(-4, 5, size=(3, 4)).astype(np.float32) for _ in range(3)]
    weights = tuple(float(w) for w in g.choice([-1.0, 0.5, 1.0, 2.0], size=3))
    densities = tuple(float(d) for d in g.choice([0.2, 0.5, 0.75, 1.0], size=3))
    if consensus == "ties":
        out = run("ties", base, experts, weight=weights, density=densities, normalize=True, lambda_=0.7)
        close(
            out,
            ref_gta(base, experts, weights, densities=densities, consensus="sum", normalize=True, lam=0.7),
        )
    else:
        out = run(
            "breadcrumbs_ties",
            base,
            experts,
            weight=weights,
            density=densities,
            gamma=(0.1,) * 3,
            normalize=True,
        )
        trim = lambda d, dens: ref_breadcrumbs_trim(d, dens, 0.1)  # noqa: E731
        expected = ref_gta(
            base, experts, weights, densities=densities, consensus="sum", normalize=True, trim=trim
        )
        close(out, expected)


@HYP
@given(
    st.lists(st.lists(st.integers(-4, 4), min_size=6, max_size=6), min_size=1, max_size=4),
    st.lists(st.integers(-3, 3), min_size=6, max_size=6),
    st.data(),
)
def test_ties_matches_loop_reference_property(deltas, base, data):
    k = len(deltas)
    weights = tuple(data.draw(st.sampled_from([-1.0, 0.5, 1.0, 2.0])) for _ in range(k))
    densities = tuple(data.draw(st.sampled_from([0.0, 0.1, 0.34, 0.5, 1.0])) for _ in range(k))
    normalize = data.draw(st.booleans())
    consensus = data.draw(st.sampled_from(["sum", "count"]))
    experts = [[b + d for b, d in zip(base, row)] for row in deltas]
    out = task_arithmetic_family(
        t32(base), t32(experts), weight=weights, density=densities, normalize=normalize,
        sparsify="magnitude", consensus=consensus,
    )  # fmt: skip
    close(out, ref_gta(base, experts, weights, densities=densities, consensus=consensus, normalize=normalize))


def test_ties_zero_sum_elects_plus_one():
    out = run("ties", [0.0], [[1.0], [-1.0]], weight=(1.0, 1.0), normalize=False)
    close(out, [1.0])


def test_ties_negative_weight_flips_the_vote():
    # weighted deltas: +1 and -2 -> sum -1 elects -, only the second (negated) model agrees
    out = run("ties", [0.0], [[1.0], [2.0]], weight=(1.0, -1.0), normalize=False)
    close(out, [-2.0])
    # with normalize the divisor is the agreeing weight (-1): -2 / -1
    close(run("ties", [0.0], [[1.0], [2.0]], weight=(1.0, -1.0), normalize=True), [2.0])
    # the same inputs with positive weights elect + and add both
    close(run("ties", [0.0], [[1.0], [2.0]], weight=(1.0, 1.0), normalize=False), [3.0])


def test_ties_count_consensus_differs_from_sum_consensus():
    base, experts = t32([0.0]), t32([[1.0], [1.0], [-5.0]])
    kw = dict(weight=(1.0, 1.0, 1.0), normalize=True, sparsify=None)
    # sum: 1 + 1 - 5 < 0 elects -, count: two + against one - elects +
    close(task_arithmetic_family(base, experts, consensus="sum", **kw), [-5.0])
    close(task_arithmetic_family(base, experts, consensus="count", **kw), [1.0])


def test_ties_trimmed_zeros_never_agree_and_do_not_count_in_the_divisor():
    # expert 2 is trimmed to [0, 5]: at index 0 only expert 1 counts, divisor 1 (not 2)
    out = run("ties", [0.0, 0.0], [[4.0, 1.0], [1.0, 5.0]], weight=(1.0, 1.0), density=(1.0, 0.5))
    close(out, [(4.0 + 0.0) / 1, (1 + 5) / 2])


def test_ties_lambda_scales_merged_delta():
    out = run("ties", [1.0, 1.0], [[3.0, 0.0], [5.0, -1.0]], weight=(1.0, 1.0), lambda_=0.5)
    close(out, [1 + 0.5 * (2 + 4) / 2, 1 + 0.5 * (-1 - 2) / 2])


@pytest.mark.parametrize("density", [0.0, -0.5])
def test_ties_density_zero_drops_the_delta_and_returns_base(density):
    base = [1.0, -2.0, 3.0]
    out = run("ties", base, [[5.0, 5.0, 5.0], [0.0, 1.0, 9.0]], weight=(1.0, 1.0), density=(density, density))
    close(out, base)


def test_ties_tiny_positive_density_keeps_one_entry():
    out = run("ties", [0.0] * 10, [[1.0, -9.0, 3.0] + [0.5] * 7], weight=(1.0,), density=(0.01,))
    close(out, [0.0, -9.0] + [0.0] * 8)


def test_magnitude_prune_density_one_returns_input_unchanged():
    x = torch.randn(4, 4)
    assert torch.equal(magnitude_prune(x, 1.0), x)


def test_magnitude_prune_keeps_floor_density_times_n():
    x = t32([0.1, -0.9, 0.5, 0.3, -0.7, 0.2, 0.8, -0.4, 0.6, 0.05])
    out = magnitude_prune(x, 0.35)  # floor(3.5) = 3: 0.9, 0.8, 0.7
    close(out, [0, -0.9, 0, 0, -0.7, 0, 0.8, 0, 0, 0])


@HYP
@given(
    st.lists(st.floats(-100, 100, width=32), min_size=1, max_size=12),
    st.lists(st.floats(-100, 100, width=32), min_size=12, max_size=12),
)
def test_ties_one_source_weight_one_density_one_equals_that_source(src, base_vals):
    base = t32(base_vals[: len(src)])
    out = run("ties", base, [src], weight=(1.0,), density=(1.0,))
    torch.testing.assert_close(out, t32(src), atol=1e-4, rtol=1e-5)


@HYP
@given(
    st.integers(0, 2**16),
    st.integers(2, 4),
    st.sampled_from([0.3, 0.5, 1.0]),
    st.sampled_from(["ties", "karcher", "linear"]),
)
def test_symmetric_methods_ignore_source_order(seed, k, density, name):
    g = torch.Generator().manual_seed(seed)
    base, experts = torch.randn(2, 4, generator=g), torch.randn(k, 2, 4, generator=g)
    perm = torch.randperm(k, generator=g).tolist()
    weights = tuple(float(w) for w in torch.rand(k, generator=g) + 0.5)
    if name == "ties":
        kw = dict(weight=weights, density=(density,) * k)
        pkw = dict(weight=tuple(weights[i] for i in perm), density=(density,) * k)
        a, b = run(name, base, list(experts), **kw), run(name, base, [experts[i] for i in perm], **pkw)
    elif name == "linear":
        a = run(name, None, list(experts), weight=(1.0,) * k)
        b = run(name, None, [experts[i] for i in perm], weight=(1.0,) * k)
    else:
        a, b = run(name, None, list(experts)), run(name, None, [experts[i] for i in perm])
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ DARE


def test_bernoulli_prune_density_one_returns_input():
    x = torch.randn(10)
    assert torch.equal(bernoulli_prune(x, 1.0, "l1", torch.Generator().manual_seed(0)), x)


@pytest.mark.parametrize("rescale", ["l1", "none", "inverse_density", True, False])
def test_bernoulli_prune_density_zero_gives_zeros_without_nan(rescale):
    out = bernoulli_prune(torch.randn(50), 0.0, rescale, torch.Generator().manual_seed(0))
    assert torch.equal(out, torch.zeros(50))


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_bernoulli_prune_keep_rate_is_close_to_density(density):
    out = bernoulli_prune(torch.ones(200_000), density, "none", torch.Generator().manual_seed(7))
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    assert abs(float((out != 0).float().mean()) - density) < 0.01


def test_bernoulli_prune_same_seed_same_output_other_seed_other_mask():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    a = bernoulli_prune(x, 0.5, "l1", torch.Generator().manual_seed(1))
    b = bernoulli_prune(x, 0.5, "l1", torch.Generator().manual_seed(1))
    c = bernoulli_prune(x, 0.5, "l1", torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a != 0, c != 0)


def test_bernoulli_prune_l1_rescale_preserves_l1_norm_and_direction():
    x = torch.randn(5000, generator=torch.Generator().manual_seed(3))
    out = bernoulli_prune(x, 0.3, "l1", torch.Generator().manual_seed(4))
    kept = out != 0
    torch.testing.assert_close(out.abs().sum(), x.abs().sum(), rtol=1e-5, atol=0)
    ratio = out[kept] / x[kept]  # one common positive factor ||x||_1 / ||x*m||_1
    expected = float(x.abs().sum() / x[kept].abs().sum())
    torch.testing.assert_close(ratio, torch.full_like(ratio, expected), rtol=1e-5, atol=0)


def test_bernoulli_prune_inverse_density_divides_kept_entries_by_density():
    x = torch.randn(2000, generator=torch.Generator().manual_seed(5))
    out = bernoulli_prune(x, 0.25, "inverse_density", torch.Generator().manual_seed(6))
    kept = out != 0
    assert 0 < int(kept.sum()) < 2000
    torch.testing.assert_close(out[kept], x[kept] / 0.25)


def test_bernoulli_prune_no_rescale_keeps_values():
    x = torch.randn(2000, generator=torch.Generator().manual_seed(5))
    out = bernoulli_prune(x, 0.6, False, torch.Generator().manual_seed(6))
    kept = out != 0
    assert torch.equal(out[kept], x[kept])


def test_rescale_to_norm_l1_is_skipped_when_a_norm_is_tiny():
    x = t32([1.0, 2.0])
    masked = t32([1e-9, 0.0])
    assert torch.equal(rescale_to_norm(x, masked, "l1", 0.5), masked)


def test_dare_linear_applies_mask_then_weight_and_lambda():
    g = torch.Generator().manual_seed(0)
    base, expert = torch.randn(400, generator=g), torch.randn(400, generator=g)
    out = run(
        "dare_linear", base, [expert], seed=11, weight=(2.0,), density=(0.5,), rescale="none", lambda_=0.5
    )
    delta = expert - base
    merged = (out - base) / (0.5 * 2.0)
    kept = merged.abs() > 1e-5
    assert 100 < int(kept.sum()) < 300
    torch.testing.assert_close(merged[kept], delta[kept], atol=1e-4, rtol=1e-4)
    assert float(merged[~kept].abs().max()) < 1e-5


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_random_methods_are_reproducible_per_seed_and_vary_across_seeds(name):
    g = torch.Generator().manual_seed(0)
    base, experts = torch.randn(8, 16, generator=g), torch.randn(2, 8, 16, generator=g)
    kw = dict(weight=(1.0, 1.0), density=(0.5, 0.5))
    a, b = run(name, base, list(experts), seed=3, **kw), run(name, base, list(experts), seed=3, **kw)
    c = run(name, base, list(experts), seed=4, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@HYP
@given(
    st.integers(0, 2**16), st.integers(1, 3), st.floats(-2, 2), st.booleans(), st.sampled_from(["l1", "none"])
)
def test_dare_linear_density_one_equals_task_arithmetic(seed, k, lam, normalize, rescale):
    g = torch.Generator().manual_seed(seed)
    base, experts = torch.randn(3, 5, generator=g), torch.randn(k, 3, 5, generator=g)
    weights = tuple(float(w) for w in torch.rand(k, generator=g) + 0.1)
    dare = run(
        "dare_linear", base, list(experts), seed=seed, weight=weights, density=(1.0,) * k,
        lambda_=lam, normalize=normalize, rescale=rescale,
    )  # fmt: skip
    expected = ref_gta(base.numpy(), experts.numpy(), weights, normalize=normalize, lam=lam)
    close(dare, expected, atol=1e-4)


def test_dare_ties_density_one_equals_ties_without_trim():
    g = torch.Generator().manual_seed(1)
    base, experts = torch.randn(6, generator=g), torch.randn(3, 6, generator=g)
    w = (1.0, -0.5, 2.0)
    out = run("dare_ties", base, list(experts), seed=0, weight=w, density=(1.0,) * 3, normalize=True)
    close(out, ref_gta(base.numpy(), experts.numpy(), w, consensus="sum", normalize=True), atol=1e-5)


@pytest.mark.parametrize(
    "name", ["dare_linear", "dare_ties", "della_linear", "della", "breadcrumbs", "breadcrumbs_ties"]
)
def test_sparsified_density_zero_returns_base(name):
    g = torch.Generator().manual_seed(0)
    base, experts = torch.randn(4, 4, generator=g), torch.randn(2, 4, 4, generator=g)
    out = run(name, base, list(experts), seed=0, weight=(1.0, 1.0), density=(0.0, 0.0))
    assert torch.equal(out, base)


# ------------------------------------------------------------------------------------------ breadcrumbs


def test_breadcrumbs_prune_keeps_the_middle_band():
    mags = [3.0, 10.0, 1.0, 7.0, 5.0, 2.0, 9.0, 4.0, 8.0, 6.0]
    x = t32([m * (-1) ** i for i, m in enumerate(mags)])
    # n = 10, n_keep = 5, n_top = 1, n_bot = 4: keep magnitudes 5..9 (drop 1..4 and 10)
    out = breadcrumbs_prune(x, 0.5, 0.1, "none")
    expected = [v if 5 <= abs(v) <= 9 else 0.0 for v in x.tolist()]
    close(out, expected)


def test_breadcrumbs_prune_gamma_zero_keeps_the_top_band_not_nothing():
    x = t32([3.0, -10.0, 1.0, 7.0, 5.0, -2.0, 9.0, 4.0, 8.0, 6.0])
    out = breadcrumbs_prune(x, 0.5, 0.0, "none")  # n_top = 0: keep [5, 10) = magnitudes 6..10
    close(out, [v if abs(v) >= 6 else 0.0 for v in x.tolist()])


def test_breadcrumbs_prune_reduces_outlier_removal_to_reach_density():
    x = t32(list(range(1, 11)))
    # n_keep = 8, n_top = 3, n_bot = max(0, -1) = 0: keep ascending [0, 8) = 1..8, drop only 9, 10
    out = breadcrumbs_prune(x, 0.8, 0.3, "none")
    close(out, [1, 2, 3, 4, 5, 6, 7, 8, 0, 0])


def test_breadcrumbs_prune_equal_magnitudes_drop_the_lower_index_first():
    x = t32([2.0, 1.0, 2.0, 1.0, 2.0, 1.0])
    # stable ascending sort: 1@1, 1@3, 1@5, 2@0, 2@2, 2@4; n_keep = 3, n_top = 1, n_bot = 2 -> [2, 5)
    out = breadcrumbs_prune(x, 0.5, 1 / 6 + 1e-9, "none")
    close(out, [2.0, 0.0, 2.0, 0.0, 0.0, 1.0])


def test_breadcrumbs_prune_l1_rescale_preserves_l1_norm():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    out = breadcrumbs_prune(x, 0.3, 0.05, "l1")
    torch.testing.assert_close(out.abs().sum(), x.abs().sum(), rtol=1e-5, atol=0)
    assert int((out != 0).sum()) == 300


@pytest.mark.parametrize("rescale", ["none", "l1", "inverse_density"])
def test_breadcrumbs_prune_density_zero_gives_zeros_without_nan(rescale):
    out = breadcrumbs_prune(torch.randn(20), 0.0, 0.01, rescale)
    assert torch.equal(out, torch.zeros(20))


def test_breadcrumbs_prune_density_one_returns_input():
    x = torch.randn(20)
    assert torch.equal(breadcrumbs_prune(x, 1.0, 0.1, "none"), x)


def test_breadcrumbs_linear_combines_pruned_deltas_without_election():
    base = [0.0] * 10
    e1 = list(range(1, 11))
    e2 = [-v for v in range(10, 0, -1)]  # magnitudes 10..1
    out = run("breadcrumbs", base, [e1, e2], weight=(1.0, 1.0), density=(0.5, 0.5), gamma=(0.1, 0.1))
    keep1 = [v if 5 <= abs(v) <= 9 else 0.0 for v in e1]
    keep2 = [v if 5 <= abs(v) <= 9 else 0.0 for v in e2]
    close(out, [a + b for a, b in zip(keep1, keep2)])


def test_breadcrumbs_density_one_equals_task_arithmetic():
    g = torch.Generator().manual_seed(4)
    base, experts = torch.randn(3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    out = run("breadcrumbs", base, list(experts), weight=(0.5, 1.5), density=(1.0, 1.0), gamma=(0.2, 0.2))
    close(out, ref_gta(base.numpy(), experts.numpy(), (0.5, 1.5)), atol=1e-5)


def test_breadcrumbs_ties_density_one_equals_unnormalized_ties():
    g = torch.Generator().manual_seed(5)
    base, experts = torch.randn(9, generator=g), torch.randn(3, 9, generator=g)
    w = (1.0, -1.0, 0.5)
    out = run("breadcrumbs_ties", base, list(experts), weight=w, density=(1.0,) * 3)
    close(out, ref_gta(base.numpy(), experts.numpy(), w, consensus="sum", normalize=False), atol=1e-5)


# ------------------------------------------------------------------------------------------------ DELLA


@pytest.mark.parametrize("shape", [(40,), (3, 25)])
def test_della_prune_keep_probability_is_linear_in_row_magnitude_rank(shape):
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(shape, generator=g)
    d, eps = 0.5, 0.2
    rows = delta.reshape(-1, shape[-1]).double().numpy()
    expected_p = np.zeros_like(rows)
    for r, row in enumerate(rows):
        order = sorted(range(len(row)), key=lambda j: abs(row[j]))
        for rank, j in enumerate(order):
            expected_p[r, j] = (d - eps) + 2 * eps * rank / (len(row) - 1)
    kept_total = 0
    for seed in range(5):
        out = della_prune(delta, d, eps, "inverse_density", torch.Generator().manual_seed(seed))
        o = out.reshape(rows.shape).double().numpy()
        kept = o != 0
        kept_total += int(kept.sum())
        # a kept entry is delta / p_keep, a dropped one is 0
        np.testing.assert_allclose(rows[kept] / o[kept], expected_p[kept], rtol=1e-5)
    assert kept_total > 0.3 * 5 * rows.size


def test_della_prune_keep_rate_rises_with_magnitude_rank():
    n, draws, d, eps = 1000, 400, 0.5, 0.3
    mags = torch.randperm(n, generator=torch.Generator().manual_seed(0)).float() + 1
    delta = mags.repeat(draws, 1)  # each row is one independent draw, ranked within the row
    out = della_prune(delta, d, eps, "none", torch.Generator().manual_seed(1))
    rate = (out != 0).float().mean(0)
    order = torch.argsort(mags)
    low, high = float(rate[order[:100]].mean()), float(rate[order[-100:]].mean())
    # expected mean keep-probability of the bottom / top decile: (d - eps) + 2 eps * mean(rank/(n-1))
    exp_low = (d - eps) + 2 * eps * (49.5 / (n - 1))
    exp_high = (d - eps) + 2 * eps * ((n - 50.5) / (n - 1))
    assert abs(low - exp_low) < 0.02
    assert abs(high - exp_high) < 0.02
    assert abs(float(rate.mean()) - d) < 0.01


def test_della_prune_l1_rescale_preserves_l1_norm():
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    out = della_prune(x, 0.4, 0.1, "l1", torch.Generator().manual_seed(1))
    torch.testing.assert_close(out.abs().sum(), x.abs().sum(), rtol=1e-5, atol=0)


@pytest.mark.parametrize(("density", "epsilon"), [(0.1, 0.15), (0.9, 0.15), (0.15, 0.15), (0.5, 0.5)])
def test_della_prune_density_plus_minus_epsilon_outside_open_unit_interval_raises(density, epsilon):
    with pytest.raises(MergeError, match="epsilon"):
        della_prune(torch.randn(10), density, epsilon, "l1", torch.Generator().manual_seed(0))


def test_della_method_raises_merge_error_for_bad_epsilon():
    with pytest.raises(MergeError):
        run(
            "della", [0.0] * 4, [[1.0, 2.0, 3.0, 4.0]], seed=0, weight=(1.0,), density=(0.1,), epsilon=(0.15,)
        )


def test_della_prune_density_edges():
    x = torch.randn(10)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(della_prune(x, 0.0, 0.15, "l1", g), torch.zeros(10))
    assert torch.equal(della_prune(x, 1.0, 0.15, "l1", g), x)


def test_della_linear_density_one_equals_task_arithmetic():
    g = torch.Generator().manual_seed(2)
    base, experts = torch.randn(3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    out = run("della_linear", base, list(experts), seed=0, weight=(0.5, 1.5), density=(1.0, 1.0), lambda_=2.0)
    close(out, ref_gta(base.numpy(), experts.numpy(), (0.5, 1.5), lam=2.0), atol=1e-5)


def test_della_density_one_equals_ties_sum_election_normalized():
    g = torch.Generator().manual_seed(3)
    base, experts = torch.randn(7, generator=g), torch.randn(3, 7, generator=g)
    w = (1.0, 2.0, 0.5)
    out = run("della", base, list(experts), seed=0, weight=w, density=(1.0,) * 3)
    close(out, ref_gta(base.numpy(), experts.numpy(), w, consensus="sum", normalize=True), atol=1e-5)


# ------------------------------------------------------------------------------------- zero deltas, inputs


REQUIRED_BASE = [
    ("task_arithmetic", dict(weight=(1.0, 2.0, 0.5))),
    ("ties", dict(weight=(1.0, 2.0, 0.5), density=(0.5,) * 3)),
    ("dare_ties", dict(weight=(1.0, 2.0, 0.5), density=(0.5,) * 3)),
    ("dare_linear", dict(weight=(1.0, 2.0, 0.5), density=(0.5,) * 3, rescale="inverse_density")),
    ("breadcrumbs", dict(weight=(1.0, 2.0, 0.5), density=(0.5,) * 3, gamma=(0.1,) * 3)),
    ("breadcrumbs_ties", dict(weight=(1.0, 2.0, 0.5), density=(0.5,) * 3, gamma=(0.1,) * 3)),
    ("della", dict(weight=(1.0, 2.0, 0.5), density=(0.5,) * 3, epsilon=(0.1,) * 3)),
    ("della_linear", dict(weight=(1.0, 2.0, 0.5), density=(0.5,) * 3, epsilon=(0.1,) * 3)),
    ("sce", dict(select_topk=0.5)),
    ("model_stock", dict()),
    ("model_stock", dict(filter_wise=True)),
    ("tsv_m", dict()),
    ("iso_c", dict()),
]


@pytest.mark.parametrize(("name", "params"), REQUIRED_BASE)
def test_zero_task_vectors_return_base(name, params):
    base = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    out = run(name, base, [base, base, base], seed=0, **params)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, base, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["nuslerp", "multislerp"])
def test_spherical_methods_with_base_and_zero_task_vectors_return_base(name):
    base = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    out = run(name, base, [base, base], weight=(1.0, 1.0))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, base, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("name", "params"), [*REQUIRED_BASE, ("nuslerp", dict(weight=(1.0, 2.0)))])
def test_methods_do_not_modify_their_inputs(name, params):
    g = torch.Generator().manual_seed(0)
    base, experts = (
        torch.randn(4, 6, generator=g),
        torch.randn(2 if name == "nuslerp" else 3, 4, 6, generator=g),
    )
    base_copy, experts_copy = base.clone(), experts.clone()
    METHODS.get(name).fn(base, experts, gen=torch.Generator().manual_seed(0), **params)
    assert torch.equal(base, base_copy)
    assert torch.equal(experts, experts_copy)


# ------------------------------------------------------------------------------------------------- SLERP


def test_slerp_orthogonal_vectors_hand_computed():
    # Omega = pi/2: s0 = cos(t pi/2), s1 = sin(t pi/2) applied to the unnormalized inputs
    out = run("slerp", [2.0, 0.0], [[0.0, 3.0]], t=1 / 3)
    close(out, [2 * math.cos(math.pi / 6), 3 * math.sin(math.pi / 6)])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_slerp_matches_reference(seed, t):
    g = torch.Generator().manual_seed(seed)
    v0, v1 = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g) * 2
    out = run("slerp", v0, [v1], t=t)
    close(out, ref_slerp(t, v0.numpy(), v1.numpy()), atol=1e-5)


def test_slerp_t_zero_and_one_return_the_ends():
    g = torch.Generator().manual_seed(9)
    v0, v1 = torch.randn(5, 2, generator=g), torch.randn(5, 2, generator=g)
    torch.testing.assert_close(run("slerp", v0, [v1], t=0.0), v0, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(run("slerp", v0, [v1], t=1.0), v1, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("factor", [2.0, -3.0])
def test_slerp_colinear_and_anti_parallel_fall_back_to_lerp(factor):
    v0 = t32([1.0, -2.0, 0.5])
    out = run("slerp", v0, [v0 * factor], t=0.3)
    close(out, (0.7 * v0 + 0.3 * factor * v0).numpy())
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("angle", "is_lerp"), [(0.02, True), (math.pi - 0.02, True), (0.1, False)])
def test_slerp_lerp_threshold_is_cos_0_9995(angle, is_lerp):
    # cos(0.02) = 0.9998 > 0.9995 -> lerp; cos(0.1) = 0.995 -> spherical
    v0, v1 = [1.0, 0.0], [math.cos(angle), math.sin(angle)]
    out = run("slerp", v0, [v1], t=0.5).double().numpy()
    lerp = 0.5 * np.array(v0) + 0.5 * np.array(v1)
    sph = np.array([math.cos(angle / 2), math.sin(angle / 2)])
    np.testing.assert_allclose(out, lerp if is_lerp else sph, atol=1e-6)
    assert not np.allclose(lerp, sph, atol=1e-6)


@pytest.mark.parametrize(
    ("v0", "v1"), [([0.0, 0.0], [1.0, 2.0]), ([1.0, 2.0], [0.0, 0.0]), ([0.0, 0.0], [0.0, 0.0])]
)
def test_slerp_zero_norm_tensors_give_no_nan(v0, v1):
    out = run("slerp", v0, [v1], t=0.4)
    assert torch.isfinite(out).all()
    close(out, ref_slerp(0.4, v0, v1))


# ----------------------------------------------------------------------------------------------- NuSLERP


def test_nuslerp_t_is_second_weight_over_weight_sum():
    a, b = [1.0, 0.0], [0.0, 1.0]
    out = run("nuslerp", None, [a, b], weight=(1.0, 3.0))  # t = 0.75
    close(out, [math.cos(0.75 * math.pi / 2), math.sin(0.75 * math.pi / 2)])


def test_nuslerp_weights_summing_to_zero_use_t_one_half():
    out = run("nuslerp", None, [[2.0, 0.0], [0.0, 2.0]], weight=(1.0, -1.0))
    close(out, [2 * math.sqrt(0.5), 2 * math.sqrt(0.5)])


def _nuslerp_modes_inputs():
    g = np.random.default_rng(0)
    return g.standard_normal((3, 4)).astype(np.float32), g.standard_normal((3, 4)).astype(np.float32)


def test_nuslerp_flatten_uses_one_angle_per_tensor():
    a, b = _nuslerp_modes_inputs()
    out = run("nuslerp", None, [a, b], weight=(0.6, 0.4), nuslerp_flatten=True)
    close(out, ref_nuslerp_vec(0.4, a.ravel().astype(np.float64), b.ravel().astype(np.float64)).reshape(3, 4))


def test_nuslerp_row_wise_and_column_wise_use_one_angle_per_vector():
    a, b = _nuslerp_modes_inputs()
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    # default (not row-wise): vectors along the last dim, i.e. each a[i, :] is one vector
    last = np.stack([ref_nuslerp_vec(0.4, a64[i], b64[i]) for i in range(3)])
    # nuslerp_row_wise: vectors along dim 0, i.e. each a[:, j] is one vector
    first = np.stack([ref_nuslerp_vec(0.4, a64[:, j], b64[:, j]) for j in range(4)], axis=1)
    out_last = run("nuslerp", None, [a, b], weight=(0.6, 0.4), nuslerp_flatten=False)
    out_first = run("nuslerp", None, [a, b], weight=(0.6, 0.4), nuslerp_flatten=False, nuslerp_row_wise=True)
    close(out_last, last)
    close(out_first, first)
    assert not np.allclose(last, first, atol=1e-3)


def test_nuslerp_with_base_slerps_the_task_vectors():
    a, b = _nuslerp_modes_inputs()
    base = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    out = run("nuslerp", base, [a, b], weight=(1.0, 1.0))
    ta, tb = (a - base).astype(np.float64).ravel(), (b - base).astype(np.float64).ravel()
    close(out, base + ref_nuslerp_vec(0.5, ta, tb).reshape(3, 4))
    without = run("nuslerp", None, [a, b], weight=(1.0, 1.0))
    assert not torch.allclose(out, without, atol=1e-3)


@pytest.mark.parametrize("factor", [2.0, -2.0])
def test_nuslerp_colinear_and_anti_parallel_fall_back_to_lerp(factor):
    a = t32([1.0, 0.0, 0.0])
    out = run("nuslerp", None, [a, a * factor], weight=(0.7, 0.3))
    assert torch.isfinite(out).all()
    close(out, (0.7 * a + 0.3 * factor * a).numpy())


def test_nuslerp_fp32_near_anti_parallel_pair_stays_near_lerp():
    a = t32([0.3, -1.7, 2.9, 0.11])
    out = run("nuslerp", None, [a, -2.0 * a], weight=(0.7, 0.3))
    close(out, (0.7 * a - 0.6 * a).numpy(), atol=1e-3)


def test_nuslerp_zero_vector_gives_no_nan():
    out = run("nuslerp", None, [[0.0, 0.0], [1.0, 1.0]], weight=(1.0, 1.0))
    assert torch.isfinite(out).all()
    close(out, ref_nuslerp_vec(0.5, np.zeros(2), np.ones(2)))


# -------------------------------------------------------------------------------------------- multislerp


def test_multislerp_experts_equal_to_base_return_base():
    base = [[1.0, -2.0], [3.0, 0.5]]
    close(run("multislerp", base, [base, base, base], weight=(0.3, 0.3, 0.4)), base)


def test_multislerp_one_input_returns_it():
    x = [[1.0, -2.0], [3.0, 0.5]]
    close(run("multislerp", None, [x], weight=(0.3,)), x)
    close(run("multislerp", [[9.0, 9.0], [9.0, 9.0]], [x], weight=(0.3,)), x)


def test_multislerp_two_orthogonal_equal_weights_is_the_slerp_midpoint():
    out = run("multislerp", None, [[2.0, 0.0], [0.0, 2.0]], weight=(1.0, 1.0))
    close(out, [math.sqrt(2), math.sqrt(2)])


def test_multislerp_parallel_inputs_average_the_norms():
    out = run("multislerp", None, [[1.0, 2.0], [2.0, 4.0]], weight=(1.0, 3.0))
    close(out, np.array([1.0, 2.0]) * (0.25 * 1 + 0.75 * 2))


@pytest.mark.parametrize("normalize_weights", [True, False])
def test_multislerp_matches_reference(normalize_weights):
    g = np.random.default_rng(3)
    xs = g.standard_normal((3, 2, 5)).astype(np.float32)
    w = (0.2, 0.5, 0.3) if not normalize_weights else (1.0, 2.0, 0.5)
    out = run("multislerp", None, list(xs), weight=w, normalize_weights=normalize_weights)
    close(out, ref_multislerp(xs, w, normalize_weights=normalize_weights), atol=1e-5)


def test_multislerp_with_base_works_on_task_vectors():
    g = np.random.default_rng(4)
    base, xs = g.standard_normal(6).astype(np.float32), g.standard_normal((3, 6)).astype(np.float32)
    out = run("multislerp", base, list(xs), weight=(1.0, 1.0, 2.0))
    close(out, base + ref_multislerp(xs - base, (1.0, 1.0, 2.0)), atol=1e-5)


def test_multislerp_two_antipodal_equal_weights_fall_back_to_linear():
    out = run("multislerp", None, [[1.0, 2.0], [-2.0, -4.0]], weight=(1.0, 1.0))
    assert torch.isfinite(out).all()
    close(out, [0.5 * 1 - 0.5 * 2, 0.5 * 2 - 0.5 * 4])
    with_base = run("multislerp", [1.0, 1.0], [[2.0, 3.0], [-1.0, -3.0]], weight=(1.0, 1.0))
    close(with_base, [1.0 + 0.5 * 1 - 0.5 * 2, 1.0 + 0.5 * 2 - 0.5 * 4])


def test_multislerp_three_balancing_inputs_raise_merge_error():
    c, s = math.cos(2 * math.pi / 3), math.sin(2 * math.pi / 3)
    with pytest.raises(MergeError, match="antipodal"):
        run("multislerp", None, [[1.0, 0.0], [c, s], [c, -s]], weight=(1.0, 1.0, 1.0))


# ----------------------------------------------------------------------------------------------- Karcher


def test_karcher_identical_tensors_return_that_tensor():
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(run("karcher", None, [x, x, x]), x, atol=1e-6, rtol=1e-5)


def test_karcher_one_input_returns_it():
    x = torch.randn(5)
    assert torch.equal(run("karcher", None, [x]), x)


def test_karcher_zero_tensor_counts_in_the_norm_but_not_the_direction():
    out = run("karcher", None, [[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]])
    # direction: geodesic midpoint of e1 and e2; norm: (0 + 2 + 4) / 3
    close(out, np.array([math.sqrt(0.5), math.sqrt(0.5)]) * 2.0)


def test_karcher_all_zero_tensors_return_zeros():
    out = run("karcher", None, [[0.0, 0.0], [0.0, 0.0]])
    assert torch.equal(out, torch.zeros(2))


def test_karcher_of_points_on_a_great_circle_is_the_mean_angle():
    # on one great circle the Karcher mean of angles 0, 10, 80 degrees is at 30 degrees; the
    # normalized Euclidean mean (the starting point) is not, so this needs the iteration
    angles = [0.0, math.radians(10), math.radians(80)]
    radii = [1.0, 2.0, 3.0]
    pts = [[r * math.cos(a), r * math.sin(a), 0.0] for r, a in zip(radii, angles)]
    out = run("karcher", None, pts, max_iter=20, tol=1e-7)
    close(out, [2.0 * math.cos(math.radians(30)), 2.0 * math.sin(math.radians(30)), 0.0], atol=1e-5)


def test_karcher_result_is_a_stationary_point_of_the_sum_of_squared_geodesic_distances():
    xs = np.random.default_rng(5).standard_normal((4, 6)) + 1.0
    out = run("karcher", None, list(xs.astype(np.float32)), max_iter=50, tol=1e-7).double().numpy()
    np.testing.assert_allclose(np.linalg.norm(out), np.linalg.norm(xs, axis=1).mean(), rtol=1e-5)
    u = out / np.linalg.norm(out)
    grad = np.zeros(6)
    for x in xs:
        ui = x / np.linalg.norm(x)
        phi = math.acos(np.clip(ui @ u, -1, 1))
        grad += phi / math.sin(phi) * (ui - (ui @ u) * u) / len(xs)
    assert np.linalg.norm(grad) < 1e-4


# ------------------------------------------------------------------------------------------------- SCE


def test_sce_hand_computed():
    # tau1 = [1, 2], tau2 = [3, -2]; energies 2.5 and 6.5 -> c = [5/18, 13/18]
    # col 0: both positive -> (5/18*1 + 13/18*3) / 1 = 22/9; col 1: sum 0 elects +, only tau1 -> 2
    close(run("sce", [0.0, 0.0], [[1.0, 2.0], [3.0, -2.0]]), [22 / 9, 2.0])


@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.3, 0.0])
def test_sce_matches_reference(select_topk):
    g = np.random.default_rng(8)
    base = g.standard_normal((3, 4)).astype(np.float32)
    experts = [(base + g.standard_normal((3, 4))).astype(np.float32) for _ in range(3)]
    out = run("sce", base, experts, select_topk=select_topk)
    close(out, ref_sce(base, experts, select_topk), atol=1e-5)


def test_sce_select_topk_keeps_the_highest_variance_positions():
    base = [0.0, 0.0, 0.0, 0.0]
    experts = [[1.0, 5.0, 0.0, 2.0], [1.0, -5.0, 0.1, 2.5]]
    # variances: [0, 25, 0.0025, 0.0625]; nnz = 3, k = floor(3 * 0.5) = 1 -> only position 1 survives
    out = run("sce", base, experts, select_topk=0.5)
    # position 1: tau = [5, -5] sums to 0 -> elects +, only expert 1 agrees
    close(out, [0.0, 5.0, 0.0, 0.0])


def test_sce_one_source_returns_it():
    base = torch.randn(3, 3)
    expert = base + torch.randn(3, 3)
    torch.testing.assert_close(run("sce", base, [expert]), expert, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------- Model Stock


def test_model_stock_two_experts_hand_computed():
    base = [1.0, 1.0]
    e1, e2 = [2.0, 1.0], [2.0, 2.0]  # offsets [1, 0], [1, 1]: cos = 1/sqrt(2)
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    mean = np.array([2.0, 1.5])
    close(run("model_stock", base, [e1, e2]), t * mean + (1 - t) * np.array(base))


def test_model_stock_three_experts_uses_mean_pairwise_cosine():
    g = np.random.default_rng(2)
    base = g.standard_normal(5)
    experts = [base + g.standard_normal(5) + 1.0 for _ in range(3)]
    offs = [e - base for e in experts]
    cos = np.mean(
        [
            offs[i] @ offs[j] / (np.linalg.norm(offs[i]) * np.linalg.norm(offs[j]))
            for i, j in [(0, 1), (0, 2), (1, 2)]
        ]
    )
    t = 3 * cos / (1 + 2 * cos)
    expected = t * np.mean(experts, axis=0) + (1 - t) * base
    close(
        run("model_stock", base.astype(np.float32), [e.astype(np.float32) for e in experts]),
        expected,
        atol=1e-5,
    )


def test_model_stock_anti_parallel_deltas_hit_the_singular_denominator_and_keep_base():
    # cos = -1, K = 2: 1 + (K-1) cos = 0 -> t = 0
    close(run("model_stock", [1.0, 2.0], [[2.0, 3.0], [0.0, 1.0]]), [1.0, 2.0])


def test_model_stock_anti_correlated_deltas_do_not_clamp_t_unless_asked():
    base = np.array([0.0, 0.0])
    e1, e2 = np.array([1.0, 0.0]), np.array([-1.0, 0.5])
    c = (e1 @ e2) / (np.linalg.norm(e1) * np.linalg.norm(e2))
    t = 2 * c / (1 + c)
    assert t < -1  # strongly anti-correlated: mergekit's raw t is far outside [0, 1]
    mean = (e1 + e2) / 2
    close(run("model_stock", base, [e1, e2]), t * mean + (1 - t) * base)
    close(run("model_stock", base, [e1, e2], clamp_t=True), base)


def test_model_stock_clamp_t_leaves_positive_correlation_alone():
    # mean pairwise cosine >= -1/(K-1) always, so t <= 1; clamping only matters for t < 0
    base = np.zeros(2)
    e1, e2 = np.array([1.0, 0.0]), np.array([1.0, 1.0])
    c = 1 / math.sqrt(2)
    expected = 2 * c / (1 + c) * (e1 + e2) / 2
    close(run("model_stock", base, [e1, e2], clamp_t=True), expected)


def test_model_stock_filter_wise_uses_one_t_per_row():
    base = np.zeros((2, 2))
    e1 = np.array([[1.0, 0.0], [1.0, 0.0]])
    e2 = np.array([[2.0, 0.0], [0.0, 1.0]])  # row 0 parallel (t = 1), row 1 orthogonal (t = 0)
    out = run("model_stock", base, [e1, e2], filter_wise=True)
    close(out, [[1.5, 0.0], [0.0, 0.0]])
    flat_cos = (e1.ravel() @ e2.ravel()) / (np.linalg.norm(e1) * np.linalg.norm(e2))
    t = 2 * flat_cos / (1 + flat_cos)
    close(run("model_stock", base, [e1, e2]), t * (e1 + e2) / 2)


def test_model_stock_filter_wise_on_1d_tensor_uses_one_t():
    base = np.zeros(3)
    e1, e2 = np.array([1.0, 0.0, 0.0]), np.array([1.0, 1.0, 0.0])
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    close(run("model_stock", base, [e1, e2], filter_wise=True), t * (e1 + e2) / 2)


def test_model_stock_needs_two_experts():
    with pytest.raises(MergeError, match="at least 2"):
        run("model_stock", [0.0], [[1.0]])


# ------------------------------------------------------------------------------------------ passthrough


def test_passthrough_copies_the_input():
    x = torch.randn(3, 2)
    assert torch.equal(run("passthrough", None, [x]), x)
    assert torch.equal(run("passthrough", None, [x], scale=(None,)), x)


def test_passthrough_with_scale_multiplies():
    close(run("passthrough", None, [[1.0, -2.0]], scale=(0.5,)), [0.5, -1.0])


# ------------------------------------------------------------------------------------------------ TSV-M


def test_tsv_m_orthogonal_low_rank_deltas_sum_exactly():
    # T = 2 tasks in a 4x4 tensor, r = 2; each task has rank 2 in its own orthogonal subspace, so the
    # stacked U and V^T are already orthogonal and TSV-M reduces to task arithmetic with weight 1
    u, v = random_orthogonal(4, 0), random_orthogonal(4, 1)
    tau1 = u[:, :2] @ np.diag([3.0, 2.0]) @ v[:, :2].T
    tau2 = u[:, 2:] @ np.diag([5.0, 1.0]) @ v[:, 2:].T
    base = np.random.default_rng(2).standard_normal((4, 4))
    out = run("tsv_m", base, [base + tau1, base + tau2], alpha=0.5)
    close(out, base + 0.5 * (tau1 + tau2), atol=1e-5)


def test_tsv_m_three_tasks_orthogonal_rank_one_deltas():
    # k = min(6, 3) = 3, T = 3, r = 1: every task keeps exactly its only singular triplet
    u, v = random_orthogonal(6, 3), random_orthogonal(3, 4)
    taus = [s * np.outer(u[:, i], v[:, i]) for i, s in enumerate([4.0, 2.0, 1.0])]
    base = np.zeros((6, 3))
    close(run("tsv_m", base, [base + t for t in taus]), sum(taus), atol=1e-5)


@pytest.mark.parametrize(("shape", "n_tasks"), [((6, 4), 2), ((5, 7), 3), ((8, 8), 3)])
def test_tsv_m_matches_reference_on_random_deltas(shape, n_tasks):
    g = np.random.default_rng(sum(shape) + n_tasks)
    base = g.standard_normal(shape)
    experts = [base + g.standard_normal(shape) for _ in range(n_tasks)]
    out = run("tsv_m", base, experts, alpha=1.3)
    close(out, ref_tsv_m(base, experts, alpha=1.3), atol=1e-4, rtol=1e-4)


def test_tsv_m_orthonormal_factors_make_the_spectrum_the_kept_singular_values():
    # tau_m = U_perp diag(s_bar) V_perp^T with orthonormal U_perp and V_perp^T: its singular values are
    # exactly the stacked top-r singular values of the tasks (padded with zeros for k mod T)
    g = np.random.default_rng(11)
    base = g.standard_normal((7, 5))
    deltas = [g.standard_normal((7, 5)) for _ in range(2)]
    out = run("tsv_m", base, [base + d for d in deltas]).double().numpy()
    kept = np.concatenate([np.linalg.svd(d, compute_uv=False)[:2] for d in deltas] + [np.zeros(1)])
    np.testing.assert_allclose(
        np.linalg.svd(out - base, compute_uv=False), np.sort(kept)[::-1], atol=1e-4, rtol=1e-4
    )


def test_tsv_m_polar_factors_are_orthonormal():
    from evomerge.merge.methods import _polar

    m = torch.randn(7, 3, generator=torch.Generator().manual_seed(0))
    q = _polar(m).double()
    torch.testing.assert_close(q.T @ q, torch.eye(3, dtype=torch.float64), atol=1e-5, rtol=0)
    wide = _polar(m.T).double()
    torch.testing.assert_close(wide @ wide.T, torch.eye(3, dtype=torch.float64), atol=1e-5, rtol=0)
    close(_polar(m), ref_polar(m.double().numpy()), atol=1e-5)


def test_tsv_m_one_task_reconstructs_it():
    g = np.random.default_rng(12)
    base, expert = g.standard_normal((4, 6)), g.standard_normal((4, 6))
    close(run("tsv_m", base, [expert]), expert, atol=1e-5)


@pytest.mark.parametrize(("shape", "n_tasks"), [((5,), 2), ((2, 3, 2), 2), ((3, 2), 3)])
def test_tsv_m_non_2d_or_too_many_tasks_uses_the_mean_task_vector(shape, n_tasks):
    g = np.random.default_rng(13)
    base = g.standard_normal(shape)
    experts = [g.standard_normal(shape) for _ in range(n_tasks)]
    expected = base + 0.7 * np.mean([e - base for e in experts], axis=0)
    close(run("tsv_m", base, experts, alpha=0.7), expected, atol=1e-5)


# ------------------------------------------------------------------------------------------------ Iso-C


@pytest.mark.parametrize(("shape", "n_tasks"), [((6, 4), 2), ((4, 9), 3), ((5, 5), 1)])
def test_iso_c_flattens_the_spectrum_of_the_summed_delta_to_its_mean(shape, n_tasks):
    g = np.random.default_rng(sum(shape))
    base = g.standard_normal(shape)
    deltas = [g.standard_normal(shape) for _ in range(n_tasks)]
    out = run("iso_c", base, [base + d for d in deltas], alpha=1.0).double().numpy()
    u, s, vt = np.linalg.svd(sum(deltas), full_matrices=False)
    merged_s = np.linalg.svd(out - base, compute_uv=False)
    np.testing.assert_allclose(merged_s, np.full_like(merged_s, s.mean()), rtol=1e-4)
    np.testing.assert_allclose(out, base + s.mean() * u @ vt, atol=1e-4)


def test_iso_c_alpha_scales_the_merged_delta():
    g = np.random.default_rng(1)
    base, e1, e2 = (g.standard_normal((3, 3)) for _ in range(3))
    u, s, vt = np.linalg.svd((e1 - base) + (e2 - base))
    close(run("iso_c", base, [e1, e2], alpha=1.5), base + 1.5 * s.mean() * u @ vt, atol=1e-4)


def test_iso_c_non_2d_uses_the_mean_task_vector():
    base, e1, e2 = np.zeros(4), np.array([1.0, 2.0, 3.0, 4.0]), np.array([3.0, 0.0, -1.0, 0.0])
    close(run("iso_c", base, [e1, e2], alpha=2.0), 2.0 * (e1 + e2) / 2)


@pytest.mark.parametrize("consensus", ["sum", "count"])
@pytest.mark.parametrize("normalize", [True, False])
def test_blockwise_election_is_bit_identical_to_the_whole_tensor_form(consensus, normalize):
    from evomerge.merge.methods import CACHE_CHUNK, _per_source, elected_sum, sign_agreement

    g = torch.Generator().manual_seed(0)
    deltas = torch.randn(3, 2 * CACHE_CHUNK + 5, generator=g)
    deltas[deltas.abs() < 0.3] = 0  # zeros never agree
    w = _per_source((1.0, -0.5, 2.0), deltas)
    deltas.mul_(w)
    mask = sign_agreement(deltas, consensus).to(deltas.dtype)
    want = (deltas * mask).sum(0)
    if normalize:
        divisor = (w * mask).sum(0)
        want = want / (divisor + (divisor == 0))
    assert torch.equal(elected_sum(deltas, w, consensus, normalize), want)
