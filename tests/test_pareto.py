"""Pareto tools against hand-computed fronts, areas and volumes, plus hypothesis properties."""

from __future__ import annotations

import itertools

import moocore
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.pareto import (
    crowding_distance,
    dominates,
    hypervolume,
    hypervolume_history,
    igd_plus,
    knee_point,
    non_dominated,
    non_dominated_sort,
    reference_point,
)

# ----------------------------------------------------------------------------- helpers


def fronts_as_lists(points) -> list[list[int]]:
    return [f.tolist() for f in non_dominated_sort(np.asarray(points, dtype=float))]


def hv_inclusion_exclusion(points: np.ndarray, ref: np.ndarray) -> float:
    """Exact HV by inclusion-exclusion over boxes [ref, p] (independent of the sweep and moocore)."""
    pts = points[np.all(points > ref, axis=1)]
    total = 0.0
    for k in range(1, len(pts) + 1):
        for subset in itertools.combinations(range(len(pts)), k):
            corner = pts[list(subset)].min(axis=0)
            total += (-1) ** (k + 1) * float(np.prod(corner - ref))
    return total


def hv_grid_count(points: np.ndarray) -> int:
    """Exact HV of non-negative integer points w.r.t. the origin: count the dominated unit cells."""
    m = points.shape[1]
    top = int(points.max()) if len(points) else 0
    cells = np.array(list(itertools.product(range(top), repeat=m)), dtype=float).reshape(-1, m) + 1.0
    covered = np.zeros(len(cells), dtype=bool)
    for p in points:
        covered |= np.all(cells <= p, axis=1)
    return int(covered.sum())


def int_points(m: int, *, min_size: int = 0, max_size: int = 12, hi: int = 5):
    """Small integer coordinates force ties and exact duplicates."""
    row = st.lists(st.integers(0, hi), min_size=m, max_size=m)
    return st.lists(row, min_size=min_size, max_size=max_size).map(
        lambda rows: np.array(rows, dtype=float).reshape(-1, m)
    )


def float_points(m: int, *, min_size: int = 1, max_size: int = 10):
    row = st.lists(st.floats(0.0, 1.0, allow_nan=False, width=32), min_size=m, max_size=m)
    return st.lists(row, min_size=min_size, max_size=max_size).map(
        lambda rows: np.array(rows, dtype=float).reshape(-1, m)
    )


PROPS = settings(max_examples=60, deadline=None)

# ----------------------------------------------------------------------------- dominance, sorting


def test_dominates_needs_strictly_better_somewhere():
    assert dominates(np.array([2.0, 1.0]), np.array([1.0, 1.0]))
    assert not dominates(np.array([1.0, 1.0]), np.array([1.0, 1.0]))
    assert not dominates(np.array([2.0, 0.0]), np.array([1.0, 1.0]))


def test_non_dominated_mask_keeps_first_duplicate():
    points = np.array([[1.0, 2.0], [2.0, 1.0], [1.0, 2.0], [0.0, 0.0]])
    assert non_dominated(points).tolist() == [True, True, False, False]


def test_sort_with_ties_hand_computed():
    # [1,1] ties [1,2] in f1 and [2,1] in f2: dominated by both, so F2.
    assert fronts_as_lists([[1, 2], [2, 1], [1, 1], [0, 0]]) == [[0, 1], [2], [3]]


def test_sort_duplicate_counts_as_dominated_by_its_first_copy():
    # idx 4 copies idx 1: it drops to F2, and as it still dominates [1,1], that one drops to F3.
    points = [[1, 2], [2, 1], [1, 1], [0, 0], [2, 1]]
    assert fronts_as_lists(points) == [[0, 1], [4], [2], [3]]


def test_sort_exact_duplicates_first_stays_rest_step_down():
    assert fronts_as_lists([[1, 1], [1, 1], [1, 1], [0, 0]]) == [[0], [1], [2], [3]]


def test_sort_one_point():
    assert fronts_as_lists([[3.0, 4.0]]) == [[0]]


def test_sort_empty_gives_no_fronts():
    assert non_dominated_sort(np.empty((0, 2))) == []


def test_sort_all_dominated_by_one():
    assert fronts_as_lists([[5, 5], [1, 2], [2, 1], [3, 3]]) == [[0], [3], [1, 2]]


def test_sort_mutually_non_dominated_is_one_front():
    assert fronts_as_lists([[0, 3], [1, 2], [2, 1], [3, 0]]) == [[0, 1, 2, 3]]


def test_sort_large_input_uses_blocks_consistently():
    rng = np.random.default_rng(0)
    points = rng.integers(0, 20, size=(1500, 3)).astype(float)
    fronts = non_dominated_sort(points)
    assert np.array_equal(np.sort(np.concatenate(fronts)), np.arange(len(points)))
    mask = np.zeros(len(points), dtype=bool)
    mask[fronts[0]] = True
    assert np.array_equal(mask, non_dominated(points))


@PROPS
@given(int_points(2, max_size=15) | int_points(3, max_size=15))
def test_sort_partitions_indices_and_f1_matches_non_dominated(points):
    fronts = non_dominated_sort(points)
    flat = np.concatenate(fronts) if fronts else np.array([], dtype=int)
    assert sorted(flat.tolist()) == list(range(len(points)))
    assert all(len(f) > 0 and np.all(np.diff(f) > 0) for f in fronts)
    if fronts:
        assert set(fronts[0].tolist()) == set(np.flatnonzero(non_dominated(points)).tolist())
        for i in fronts[0]:
            assert not any(dominates(points[j], points[i]) for j in range(len(points)))


@PROPS
@given(int_points(2, max_size=15) | int_points(3, max_size=15))
def test_sort_each_later_front_is_beaten_by_the_previous(points):
    fronts = non_dominated_sort(points)
    for prev, cur in itertools.pairwise(fronts):
        for j in cur:
            assert any(
                dominates(points[i], points[j]) or (np.array_equal(points[i], points[j]) and i < j)
                for i in prev
            )
    for f in fronts:  # no point in a front beats another point of the same front
        for i, j in itertools.permutations(f, 2):
            assert not dominates(points[i], points[j])
            assert not np.array_equal(points[i], points[j])


# ----------------------------------------------------------------------------- crowding


def test_crowding_hand_computed_with_boundaries():
    points = np.array([[0.0, 6.0], [1.0, 3.0], [3.0, 2.0], [5.0, 0.0]])
    # f1 range 5: idx1 (3-0)/5, idx2 (5-1)/5; f2 range 6: idx1 (6-2)/6, idx2 (3-0)/6.
    expected = [np.inf, 3 / 5 + 4 / 6, 4 / 5 + 3 / 6, np.inf]
    np.testing.assert_allclose(crowding_distance(points), expected)


def test_crowding_skips_constant_objective():
    points = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0], [5.0, 1.0]])
    np.testing.assert_allclose(crowding_distance(points), [np.inf, 2 / 5, 4 / 5, np.inf])


def test_crowding_all_constant_is_all_zero():
    assert crowding_distance(np.ones((3, 2))).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("n", [1, 2])
def test_crowding_tiny_fronts_are_all_boundary(n):
    assert np.all(np.isinf(crowding_distance(np.arange(2.0 * n).reshape(n, 2))))


@PROPS
@given(float_points(2, min_size=3) | float_points(3, min_size=3))
def test_crowding_non_negative_with_infinite_extremes(points):
    d = crowding_distance(points)
    assert np.all(d >= 0)
    for f in points.T:
        if f.max() > f.min():  # stable sort: first min and last max are the ends
            assert np.isinf(d[np.argmin(f)])
            assert np.isinf(d[len(f) - 1 - np.argmax(f[::-1])])


# ----------------------------------------------------------------------------- hypervolume


def test_hv_2d_staircase_hand_computed():
    # Strips from the right: (4,1): 4*1, (3,2): 3*1, (2,3): 2*1, (1,4): 1*1.
    points = np.array([[1.0, 4.0], [2.0, 3.0], [3.0, 2.0], [4.0, 1.0]])
    assert hypervolume(points, np.zeros(2)) == 10.0


def test_hv_2d_staircase_with_offset_ref():
    # ref (0, 1): (6,2): 6*1, (3,4): 3*2, (1,5): 1*1.
    points = np.array([[1.0, 5.0], [3.0, 4.0], [6.0, 2.0]])
    assert hypervolume(points, np.array([0.0, 1.0])) == 13.0


def test_hv_moocore_docstring_example_maximized():
    points = np.array([[5.0, 5.0], [4.0, 6.0], [2.0, 7.0], [7.0, 4.0]])
    assert hypervolume(points, np.zeros(2)) == 39.0


def test_hv_points_worse_than_ref_contribute_nothing():
    points = np.array([[1.0, 5.0], [3.0, 4.0], [6.0, 2.0], [10.0, 1.0]])
    # ref (2, 2): (1,5) worse in f1, (6,2) equal in f2, (10,1) worse in f2: only (3,4) counts.
    assert hypervolume(points, np.array([2.0, 2.0])) == 2.0
    assert hypervolume(np.array([[-1.0, 5.0, 5.0], [0.0, 3.0, 3.0]]), np.zeros(3)) == 0.0
    assert hypervolume(np.array([[1.0, 1.0, 1.0], [9.0, 9.0, 0.0]]), np.zeros(3)) == 1.0


def test_hv_one_point_is_its_box():
    assert hypervolume(np.array([[3.0, 4.0]]), np.array([1.0, 1.0])) == 6.0
    assert hypervolume(np.array([[2.0, 3.0, 4.0]]), np.zeros(3)) == 24.0


def test_hv_one_objective_is_max_minus_ref():
    assert hypervolume(np.array([[0.2], [0.7], [-1.0]]), np.array([0.1])) == pytest.approx(0.6)


def test_hv_empty_is_zero():
    assert hypervolume(np.empty((0, 3)), np.zeros(3)) == 0.0


def test_hv_3d_unit_cubes():
    ref = np.zeros(3)
    assert hypervolume(np.array([[1.0, 1.0, 1.0]]), ref) == 1.0
    # Three 2x1x1 bricks along the axes: 3*2 - 3*1 (pairwise overlaps) + 1 (triple) = 4.
    bricks = np.array([[2.0, 1.0, 1.0], [1.0, 2.0, 1.0], [1.0, 1.0, 2.0]])
    assert hypervolume(bricks, ref) == 4.0
    assert hypervolume(bricks, ref) == hv_inclusion_exclusion(bricks, ref)
    # A 2x2x2 cube minus one unit corner cube, built from unit-cube corners: 7.
    seven = np.array([[2.0, 2.0, 1.0], [2.0, 1.0, 2.0], [1.0, 2.0, 2.0]])
    assert hypervolume(seven, ref) == 7.0 == hv_grid_count(seven)


def test_hv_3d_matches_monte_carlo():
    rng = np.random.default_rng(1)
    points = rng.uniform(0.2, 1.0, size=(30, 3))
    ref = np.zeros(3)
    samples = rng.uniform(0.0, 1.0, size=(200_000, 3))
    inside = np.zeros(len(samples), dtype=bool)
    for p in points:
        inside |= np.all(samples <= p, axis=1)
    est, se = inside.mean(), inside.std() / np.sqrt(len(samples))
    assert abs(hypervolume(points, ref) - est) < 5 * se


@PROPS
@given(int_points(3, min_size=1, max_size=7) | int_points(4, min_size=1, max_size=6))
def test_hv_moocore_matches_inclusion_exclusion_and_cell_count(points):
    ref = np.zeros(points.shape[1])
    hv = hypervolume(points, ref)
    assert hv == pytest.approx(hv_inclusion_exclusion(points, ref), abs=1e-9)
    assert hv == pytest.approx(hv_grid_count(points), abs=1e-9)


@PROPS
@given(float_points(2, max_size=12), st.floats(-0.5, 0.5), st.floats(-0.5, 0.5))
def test_hv_2d_sweep_matches_moocore(points, r1, r2):
    ref = np.array([r1, r2])
    inside = points[np.all(points > ref, axis=1)]
    expected = moocore.hypervolume(-inside, ref=-ref) if len(inside) else 0.0
    assert hypervolume(points, ref) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@PROPS
@given(
    float_points(2) | float_points(3),
    st.integers(0, 100),
    st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3),
)
def test_hv_adding_dominated_point_changes_nothing(points, pick, shrink):
    ref = np.full(points.shape[1], -0.1)
    worse = points[pick % len(points)] - np.array(shrink[: points.shape[1]])
    before = hypervolume(points, ref)
    after = hypervolume(np.vstack([points, worse]), ref)
    assert after == pytest.approx(before, rel=1e-12, abs=1e-15)


@PROPS
@given(float_points(2) | float_points(3))
def test_hv_bounded_by_best_box_and_bounding_box(points):
    ref = np.full(points.shape[1], -0.1)
    hv = hypervolume(points, ref)
    boxes = np.prod(points - ref, axis=1)
    assert boxes.max() * (1 - 1e-12) <= hv <= np.prod(points.max(axis=0) - ref) * (1 + 1e-12)


# ----------------------------------------------------------------------------- reference point


def test_reference_point_hand_computed():
    points = np.array([[0.0, 10.0], [1.0, 20.0], [2.0, 10.0]])
    np.testing.assert_allclose(reference_point(points), [-0.02, 9.9])
    np.testing.assert_allclose(reference_point(points, margin=0.5), [-1.0, 5.0])


def test_reference_point_zero_range_uses_magnitude():
    np.testing.assert_allclose(reference_point(np.array([[3.0, -5.0], [3.0, 5.0]])), [2.97, -5.1])
    np.testing.assert_allclose(reference_point(np.array([[0.5], [0.5]])), [0.49])


@PROPS
@given(float_points(2) | float_points(3))
def test_reference_point_makes_every_point_count(points):
    ref = reference_point(points)
    assert np.all(points > ref)
    assert hypervolume(points, ref) > 0


@pytest.mark.parametrize("margin", [0.0, -0.1, float("nan")])
def test_reference_point_rejects_bad_margin(margin):
    with pytest.raises(ValueError, match="margin"):
        reference_point(np.ones((2, 2)), margin=margin)


# ----------------------------------------------------------------------------- IGD+


def test_igd_plus_zero_when_front_is_reference():
    z = np.array([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]])
    assert igd_plus(z, z) == 0.0
    assert igd_plus(z + 0.1, z) == 0.0  # a front beyond the reference has no shortfall


def test_igd_plus_hand_computed():
    z = np.array([[1.0, 1.0], [2.0, 0.0], [0.0, 2.0]])
    # (2,1) covers (1,1) and (2,0); shortfall to (0,2) is (0, 1) -> mean (0 + 0 + 1) / 3.
    assert igd_plus(np.array([[2.0, 1.0]]), z) == pytest.approx(1 / 3)
    # (1, 0.5): shortfalls (0, .5), (1, 0), (0, 1.5).
    assert igd_plus(np.array([[1.0, 0.5]]), z) == pytest.approx((0.5 + 1.0 + 1.5) / 3)


def test_igd_plus_weakly_pareto_compliant_where_igd_is_not():
    z = np.array([[10.0, 0.0], [0.0, 10.0]])
    a, b = np.array([[6.0, 6.0]]), np.array([[5.0, 5.0]])  # a dominates b

    def igd(front):
        return np.mean(np.linalg.norm(z[:, None] - front[None], axis=2).min(axis=1))

    assert igd(a) > igd(b)  # plain IGD prefers the dominated set
    assert igd_plus(a, z) == pytest.approx(4.0)
    assert igd_plus(b, z) == pytest.approx(5.0)


@PROPS
@given(
    float_points(2) | float_points(3),
    st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3),
    st.randoms(use_true_random=False),
)
def test_igd_plus_never_worse_for_a_dominating_front(front, shift, rnd):
    m = front.shape[1]
    z = np.array([[rnd.random() for _ in range(m)] for _ in range(5)])
    better = front + np.array(shift[:m])
    assert igd_plus(better, z) <= igd_plus(front, z) + 1e-12
    assert igd_plus(np.vstack([front, z[:1]]), z) <= igd_plus(front, z) + 1e-12


def test_igd_plus_rejects_mismatched_dims():
    with pytest.raises(ValueError, match="objectives"):
        igd_plus(np.ones((2, 2)), np.ones((2, 3)))


# ----------------------------------------------------------------------------- knee


def test_knee_on_convex_front():
    front = np.array([[0.0, 1.0], [0.5, 0.9], [0.8, 0.8], [0.9, 0.5], [1.0, 0.0]])
    assert knee_point(front) == 2
    assert knee_point(front * np.array([1.0, 100.0]) + np.array([3.0, -7.0])) == 2  # unit-free
    assert knee_point(np.vstack([[0.1, 0.1], front])) == 3  # dominated points are no candidates


def test_knee_3d_plane_through_extremes():
    front = np.array([[1.0, 0.0, 0.0], [0.9, 0.5, 0.3], [0.0, 1.0, 0.0], [0.6, 0.6, 0.6], [0.0, 0.0, 1.0]])
    assert knee_point(front) == 3


def test_knee_tie_takes_lowest_index():
    front = np.array([[0.0, 1.0], [0.6, 0.8], [0.8, 0.6], [1.0, 0.0]])
    assert knee_point(front) == 1


def test_knee_concave_dent_is_not_a_knee():
    assert knee_point(np.array([[0.0, 1.0], [0.2, 0.2], [1.0, 0.0]])) == 0


def test_knee_tiny_fronts_use_normalized_sum():
    assert knee_point(np.array([[1.0, 2.0]])) == 0
    assert knee_point(np.array([[0.0, 1.0], [1.0, 0.0]])) == 0  # tie
    assert knee_point(np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.5]])) == 1
    assert knee_point(np.array([[0.0, 0.0], [2.0, 2.0], [2.0, 2.0]])) == 1  # one point after filtering


@PROPS
@given(float_points(2) | float_points(3))
def test_knee_is_on_the_first_front(points):
    assert non_dominated(points)[knee_point(points)]


# ----------------------------------------------------------------------------- history


def prefix_hvs(points: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return np.array([hypervolume(points[: i + 1], ref) for i in range(len(points))])


def test_history_hand_computed():
    points = np.array([[5.0, 5.0], [4.0, 6.0], [1.0, 1.0], [2.0, 7.0], [-1.0, 9.0], [7.0, 4.0]])
    np.testing.assert_allclose(hypervolume_history(points, np.zeros(2)), [25, 29, 29, 31, 31, 39])


def test_history_empty():
    assert hypervolume_history(np.empty((0, 2)), np.zeros(2)).shape == (0,)


@PROPS
@given(int_points(2, max_size=20) | int_points(3, max_size=15) | float_points(3, max_size=15))
def test_history_monotone_and_equal_to_prefix_hv(points):
    ref = np.full(points.shape[1], 0.5)  # integer 0s sit below ref: they must add nothing
    hist = hypervolume_history(points, ref)
    assert np.all(np.diff(hist) >= 0)
    np.testing.assert_allclose(hist, prefix_hvs(points, ref), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("n", "m"), [(1000, 2), (300, 3)])
def test_history_large_runs_match_final_hv(n, m):
    rng = np.random.default_rng(n + m)
    # Points drift toward a front, as in a search: many improvements, many dominated.
    points = rng.uniform(0, 1, size=(n, m)) ** (1.0 / np.linspace(1, 4, n))[:, None]
    ref = np.zeros(m)
    hist = hypervolume_history(points, ref)
    assert np.all(np.diff(hist) >= 0)
    for i in (0, n // 3, n // 2, n - 1):
        assert hist[i] == pytest.approx(hypervolume(points[: i + 1], ref), rel=1e-9)


# ----------------------------------------------------------------------------- bad input

NAN = np.array([[1.0, 2.0], [np.nan, 0.0]])
CALLS = {
    "non_dominated_sort": lambda p: non_dominated_sort(p),
    "crowding_distance": lambda p: crowding_distance(p),
    "hypervolume": lambda p: hypervolume(p, np.zeros(2)),
    "reference_point": lambda p: reference_point(p),
    "igd_plus": lambda p: igd_plus(p, np.ones((1, 2))),
    "knee_point": lambda p: knee_point(p),
    "hypervolume_history": lambda p: hypervolume_history(p, np.zeros(2)),
}


@pytest.mark.parametrize("name", CALLS)
def test_nan_is_rejected_with_row(name):
    with pytest.raises(ValueError, match=r"NaN or inf in row 1"):
        CALLS[name](NAN)


@pytest.mark.parametrize("name", CALLS)
@pytest.mark.parametrize("bad", [np.ones(3), np.ones((2, 2, 2)), np.ones((3, 0)), [["a", "b"]]])
def test_wrong_shape_is_rejected(name, bad):
    with pytest.raises(ValueError, match="points|front"):
        CALLS[name](bad)


@pytest.mark.parametrize(
    "call",
    [
        lambda: hypervolume(np.ones((2, 2)), np.zeros(3)),
        lambda: hypervolume(np.ones((2, 3)), np.zeros((1, 3))),
        lambda: hypervolume(np.ones((2, 2)), [0.0, np.nan]),
        lambda: hypervolume_history(np.ones((2, 3)), np.zeros(2)),
    ],
)
def test_bad_ref_is_rejected(call):
    with pytest.raises(ValueError, match="ref"):
        call()


@pytest.mark.parametrize(
    "call",
    [
        lambda: reference_point(np.empty((0, 2))),
        lambda: knee_point(np.empty((0, 2))),
        lambda: igd_plus(np.empty((0, 2)), np.ones((1, 2))),
        lambda: igd_plus(np.ones((1, 2)), np.empty((0, 2))),
    ],
)
def test_empty_input_is_rejected_where_undefined(call):
    with pytest.raises(ValueError, match="at least one point"):
        call()


def test_too_many_objectives_for_moocore_is_rejected():
    with pytest.raises(ValueError, match="at most 31 objectives, got 32"):
        hypervolume(np.ones((2, 32)), np.zeros(32))
