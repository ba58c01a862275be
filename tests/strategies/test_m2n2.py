"""M2N2 (ALGORITHMS.md 4.3): the rules on hand-computed cases, the strategy's ask/tell behaviour (mixture and
store mode, garbage collection of the member store), determinism, and engine runs on the digits MLP whose
journal rebuilds exactly and resumes to the same results. Recipe arithmetic: tests/merge/test_mixture.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import journal_records, run_config

from evomerge.digits_mlp import DigitsMLP
from evomerge.evaluate.digits import DigitsSpec, save_digits_checkpoint, train_digits_mlp
from evomerge.merge.mixture import Mixture, Offspring
from evomerge.space.model import ModelSpace
from evomerge.strategies import Candidate, Result, StrategyError
from evomerge.strategies.m2n2 import (
    M2N2,
    Member,
    attraction,
    choose_parents,
    compact,
    competition_fitness,
    replacement_slot,
    slerp_child,
    split_weights,
)

torch.set_num_threads(1)

# 3 members x 4 samples. Column totals z = [3, 2, 1, 1] (all columns solved by someone).
S = np.array([[1, 1, 1, 0], [1, 0, 0, 1], [1, 1, 0, 0]], dtype=float)
ALL = np.ones(3, dtype=bool)


# ---------------------------------------------------------------------------------------------- rules


def test_fitness_with_competition_by_hand():
    # alpha 1: f0 = 1/3 + 1/2 + 1, f1 = 1/3 + 1, f2 = 1/3 + 1/2
    np.testing.assert_allclose(competition_fitness(S, 1.0), [11 / 6, 4 / 3, 5 / 6])
    # alpha 2: z^2 = [9, 4, 1, 1]
    np.testing.assert_allclose(competition_fitness(S, 2.0), [1 / 9 + 1 / 4 + 1, 1 / 9 + 1, 1 / 9 + 1 / 4])


def test_fitness_without_competition_is_the_plain_sum():
    np.testing.assert_array_equal(competition_fitness(S, 0.0), [3, 2, 2])
    partial = np.array([[0.5, 1, 0], [0, 0, 0]])
    np.testing.assert_allclose(competition_fitness(partial, 0.0), [1.5, 0])
    # an unsolved column (z = 0 counted as 1) divides nothing and makes no NaN
    np.testing.assert_allclose(competition_fitness(np.zeros((2, 3)), 1.0), [0, 0])


def test_attraction_by_hand():
    # shared rows (alpha 1): r0 = [1/3, 1/2, 1, 0], r1 = [1/3, 0, 0, 1], r2 = [1/3, 1/2, 0, 0]
    np.testing.assert_allclose(attraction(S, 0, 1.0), [0, 1, 0])  # only member 1 solves sample 3
    np.testing.assert_allclose(attraction(S, 1, 1.0), [1 / 2 + 1, 0, 1 / 2])
    np.testing.assert_allclose(attraction(S, 2, 1.0), [1, 1, 0])
    np.testing.assert_allclose(attraction(S, 1, 0.0), [2, 0, 1])  # plain counts of what 1 lacks


def _frequencies(scores, filled, alpha, matchmaker, n=12000, seed=0):
    rng = np.random.default_rng(seed)
    counts = np.zeros((len(scores), len(scores)))
    for _ in range(n):
        a, b = choose_parents(scores, filled, alpha, rng, matchmaker=matchmaker)
        counts[a, b] += 1
    return counts / n


def _assert_distribution(freq, exact, n=12000):
    exact = np.asarray(exact, dtype=float)
    assert exact.sum() == pytest.approx(1.0)
    tol = 4.5 * np.sqrt(exact * (1 - exact) / n) + 1e-9
    assert np.all(np.abs(freq - exact) <= tol), (freq, exact)


def test_choose_parents_with_matchmaker_follows_fitness_then_attraction():
    # p_a = f / sum f = [11, 8, 5] / 24; b | a ~ attraction: a=0 -> 1; a=1 -> 0 (3/4), 2 (1/4); a=2 -> 0, 1 (1/2)
    exact = np.zeros((3, 3))
    exact[0, 1] = 11 / 24
    exact[1, 0], exact[1, 2] = 8 / 24 * 3 / 4, 8 / 24 * 1 / 4
    exact[2, 0] = exact[2, 1] = 5 / 24 / 2
    _assert_distribution(_frequencies(S, ALL, 1.0, True), exact)
    # alpha 0: p_a = [3, 2, 2] / 7; b | a=1 ~ [2, 0, 1] / 3
    exact0 = np.zeros((3, 3))
    exact0[0, 1] = 3 / 7
    exact0[1, 0], exact0[1, 2] = 2 / 7 * 2 / 3, 2 / 7 * 1 / 3
    exact0[2, 0] = exact0[2, 1] = 1 / 7
    _assert_distribution(_frequencies(S, ALL, 0.0, True), exact0)


def test_choose_parents_without_matchmaker_draws_both_iid_by_fitness():
    p = np.array([11, 8, 5]) / 24
    _assert_distribution(_frequencies(S, ALL, 1.0, False), np.outer(p, p))  # a == b allowed


def test_choose_parents_never_picks_empty_slots():
    scores = np.vstack([S, np.zeros((2, 4))])
    filled = np.array([True, True, True, False, False])
    freq = _frequencies(scores, filled, 1.0, True, n=3000)
    assert freq[3:].sum() == 0 and freq[:, 3:].sum() == 0


def test_fallback_all_fitness_zero_is_uniform_over_filled_slots():
    scores = np.zeros((3, 4))  # members that solve nothing (slot 2 empty)
    filled = np.array([True, True, False])
    exact = np.zeros((3, 3))
    exact[0, 1] = exact[1, 0] = 0.5  # a uniform; no attraction, no fitness: b uniform among the others
    _assert_distribution(_frequencies(scores, filled, 1.0, True, n=4000), exact, n=4000)
    exact_iid = np.zeros((3, 3))
    exact_iid[:2, :2] = 0.25
    _assert_distribution(_frequencies(scores, filled, 1.0, False, n=4000), exact_iid, n=4000)


def test_fallback_all_attraction_zero_draws_b_by_fitness_among_the_others():
    # members 0 and 1 identical, member 2 solves a subset: from a = 0 or 1 nobody adds anything.
    # z = [3, 2, 1->1]; f = [1/3 + 1/2, 1/3 + 1/2, 1/3] = [5/6, 5/6, 1/3]; sum 2
    scores = np.array([[1, 1, 0], [1, 1, 0], [1, 0, 0]], dtype=float)
    np.testing.assert_allclose(attraction(scores, 0, 1.0), [0, 0, 0])
    pa = np.array([5 / 6, 5 / 6, 1 / 3]) / 2
    exact = np.zeros((3, 3))
    exact[0, 1], exact[0, 2] = pa[0] * 5 / 7, pa[0] * 2 / 7  # b ~ f among {1, 2}: (5/6) : (1/3) = 5 : 2
    exact[1, 0], exact[1, 2] = pa[1] * 5 / 7, pa[1] * 2 / 7
    exact[2, 0] = exact[2, 1] = pa[2] / 2  # from a = 2, attraction [1/2, 1/2, 0]
    _assert_distribution(_frequencies(scores, ALL, 1.0, True), exact)


def test_fallback_single_filled_member_is_both_parents():
    scores = np.array([[1, 0, 1], [0, 0, 0], [0, 0, 0]], dtype=float)
    filled = np.array([True, False, False])
    rng = np.random.default_rng(0)
    for matchmaker in (True, False):
        assert {choose_parents(scores, filled, 1.0, rng, matchmaker=matchmaker) for _ in range(50)} == {
            (0, 0)
        }
    zero = np.zeros((3, 3))  # even when it solves nothing
    assert {choose_parents(zero, filled, 1.0, rng) for _ in range(50)} == {(0, 0)}


def test_replacement_by_hand():
    # child [1, 0, 0, 0]: z' = [4, 2, 1, 1] -> f = [7/4, 5/4, 3/4, child 1/4]: the child is the worst
    assert replacement_slot(S, np.array([1.0, 0, 0, 0]), 1.0) is None
    # child [0, 0, 1, 1]: z' = [3, 2, 2, 2] -> f = [4/3, 5/6, 5/6, child 1]: members 1 and 2 tie, first goes
    assert replacement_slot(S, np.array([0.0, 0, 1, 1]), 1.0) == 1
    # alpha 0, same child: f = [3, 2, 2, 2]: the child ties the worst members; argmin takes the first index,
    # a member's, so that member gives its slot (reference rule: replace iff k* < P)
    assert replacement_slot(S, np.array([0.0, 0, 1, 1]), 0.0) == 1
    # child [1, 1, 0, 0] = member 2: z' = [4, 3, 1, 1] -> f2 = f_child = 1/4 + 1/3: tie, member 2's slot
    assert replacement_slot(S, np.array([1.0, 1, 0, 0]), 1.0) == 2
    # a clearly better child replaces the weakest: [0, 1, 1, 1] -> z' = [3, 3, 2, 2]
    # f = [1/3 + 1/3 + 1/2, 1/3 + 1/2, 1/3 + 1/3, child 1/3 + 1/2 + 1/2] -> member 2 (2/3)
    assert replacement_slot(S, np.array([0.0, 1, 1, 1]), 1.0) == 2


def test_replacement_fills_empty_all_zero_slots_first():
    scores = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=float)
    assert replacement_slot(scores, np.array([0.0, 0, 0, 1]), 1.0) == 1
    assert replacement_slot(scores, np.array([1.0, 1, 0, 0]), 1.0) == 1  # even a duplicate of member 0
    assert replacement_slot(scores, np.zeros(4), 1.0) == 1  # even a child that solves nothing
    assert replacement_slot(np.zeros((3, 4)), np.array([1.0, 0, 0, 0]), 1.0) == 0


def test_split_weights_by_hand():
    starts = np.array([0, 3, 5, 8])
    np.testing.assert_allclose(split_weights(starts, 5, 0.3), [0.3, 0.3, 0.7, 0.7])
    np.testing.assert_allclose(
        split_weights(starts, 4, 0.3), [0.3, 0.3, 0.7, 0.7]
    )  # segment 3 starts before 4
    np.testing.assert_allclose(split_weights(starts, None, 0.3), [0.3] * 4)
    np.testing.assert_allclose(split_weights(starts, 0, 0.3), [0.7] * 4)


def test_compact_merges_equal_neighbours():
    starts, coeffs = compact(np.array([0, 2, 4, 6]), np.array([[1.0, 0], [1, 0], [0, 1], [1, 0]]))
    np.testing.assert_array_equal(starts, [0, 4, 6])
    np.testing.assert_array_equal(coeffs, [[1, 0], [0, 1], [1, 0]])


def test_slerp_child_of_two_one_hot_members_by_hand():
    a = Member("a", np.array([0]), np.array([[1.0, 0.0]]))
    b = Member("b", np.array([0]), np.array([[0.0, 1.0]]))
    # orthogonal (cos 0, omega pi/2), w 0.25: before the split t = 0.25 -> (sin(3pi/8), sin(pi/8)); after 0.75
    child = slerp_child(a, b, 3, 0.25, 0.0, "c")
    np.testing.assert_array_equal(child.starts, [0, 3])
    np.testing.assert_allclose(child.coeffs, [[0.9238795325, 0.3826834324], [0.3826834324, 0.9238795325]])
    plain = slerp_child(a, b, None, 0.25, 0.0, "c")
    np.testing.assert_array_equal(plain.starts, [0])
    np.testing.assert_allclose(plain.coeffs, [[0.9238795325, 0.3826834324]])
    # parallel: linear; at w 0.5 both halves get (1/2, 1/2) and merge into one segment
    flat = slerp_child(a, b, 3, 0.5, 1.0, "c")
    np.testing.assert_array_equal(flat.starts, [0])
    np.testing.assert_allclose(flat.coeffs, [[0.5, 0.5]])
    # cos 0.5 (omega pi/3), w 0.5: 1/sqrt(3) each; a split at 0 gives t = 1 - w everywhere
    np.testing.assert_allclose(slerp_child(a, b, 0, 0.5, 0.5, "c").coeffs, [[3**-0.5, 3**-0.5]])
    np.testing.assert_allclose(slerp_child(a, b, 0, 0.0, 0.0, "c").coeffs, [[0.0, 1.0]], atol=1e-15)


def test_slerp_child_of_piecewise_members_uses_the_union_of_segments():
    a = Member("a", np.array([0, 4]), np.array([[1.0, 0.0], [0.0, 1.0]]))
    b = Member("b", np.array([0, 6]), np.array([[0.0, 1.0], [1.0, 0.0]]))
    child = slerp_child(a, b, 2, 0.25, 1.0, "c")  # linear: (1 - t) a + t b
    np.testing.assert_array_equal(child.starts, [0, 2, 4, 6])
    np.testing.assert_allclose(child.coeffs, [[0.75, 0.25], [0.25, 0.75], [0.0, 1.0], [0.75, 0.25]])


# ----------------------------------------------------------------------------------------- strategy

N_SAMPLES = 30


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("m2n2_pool")
    gen = torch.Generator().manual_seed(0)
    return [
        str(save_digits_checkpoint(torch.randn(19210, generator=gen) * 0.05, root / f"s{i}"))
        for i in range(3)
    ]


@pytest.fixture(scope="module")
def space(sources) -> ModelSpace:
    return ModelSpace(sources[0], sources, chunk="tensor")


def fake_samples(cid: str) -> np.ndarray:
    return (np.random.default_rng(int(cid[1:])).random(N_SAMPLES) < 0.4).astype(float)


def ok(c: Candidate) -> Result:
    row = fake_samples(c.id)
    return Result(c.id, np.array([row.mean()]), samples=row)


def make(space, store: Path | None = None, seed: int = 0, **options) -> M2N2:
    if store is not None:
        options.setdefault("mutation_std", 0.01)
        options["store_dir"] = str(store)
    options.setdefault("pop_size", 5)
    return M2N2(space, seed=seed, **options)


def test_first_asks_are_the_seeds_as_one_hot_mixtures(space, sources):
    s = make(space)
    batch = s.ask(3)
    for i, c in enumerate(batch):
        assert isinstance(c.recipe, Mixture) and c.parents == () and c.generation == 0
        assert c.recipe.models == sources and c.recipe.size == 19210
        assert c.recipe.starts == [0] and c.recipe.coefficients == [np.eye(3)[i].tolist()]
        assert c.info == {"seed": sources[i]}
        assert Candidate.from_json(c.to_json()).recipe == c.recipe


def test_first_asks_are_the_seeds_as_copies_in_store_mode(space, sources, tmp_path):
    s = make(space, tmp_path / "members")
    batch = s.ask(3)
    for i, c in enumerate(batch):
        assert isinstance(c.recipe, Offspring) and c.parents == ()
        assert c.recipe.parents == [sources[i]] and c.recipe.noise_std == 0
        assert c.recipe.save == str(tmp_path / "members" / c.id)


def test_children_asked_before_any_tell_in_store_mode_read_only_what_exists(space, sources, tmp_path):
    """More workers than seeds: children are asked while the seeds are still being evaluated, so their parents
    must be the seeds' pool models (the seeds' store entries do not exist yet)."""
    s = make(space, tmp_path / "members", pop_size=6)
    batch = s.ask(6)
    seeds = {c.id: c.recipe.parents[0] for c in batch[:3]}
    for c in batch[3:]:
        assert c.generation > 0 and set(c.parents) <= set(seeds)
        assert c.recipe.parents == [seeds[p] for p in c.parents]
    mixed = make(space, pop_size=6).ask(6)  # mixture mode: children of pending seeds are exact mixtures
    assert all(isinstance(c.recipe, Mixture) for c in mixed)


def _reference_archive(pop_size: int, alpha: float):
    """An independent replay of the replacement rule: slots and score rows."""
    slots: list[str | None] = [None] * pop_size
    rows = np.zeros((pop_size, N_SAMPLES))

    def tell(cid: str, row: np.ndarray) -> None:
        full = np.vstack([rows, row])
        z = full.sum(axis=0)
        z = np.where(z == 0, 1.0, z)
        f = (full / z**alpha).sum(axis=1)
        k = int(np.flatnonzero(f == f.min())[0])
        if k < pop_size:
            slots[k], rows[k] = cid, row

    return slots, rows, tell


def drive(s: M2N2, n: int, *, in_flight: int = 3, fail_every: int = 0, evaluate=None, check=None) -> list:
    """Asynchronous pattern: keep `in_flight` candidates asked, tell the oldest and the newest alternately.
    Returns the call journal [(kind, payload)]."""
    journal, pending, step = [], [], 0
    while len(s.told) < n:
        while len(pending) < in_flight and len(s.asked) < n:
            batch = s.ask(1)
            if check:
                check("ask", batch[0])
            journal.append(("ask", [c.to_json() for c in batch]))
            pending += batch
        c = pending.pop(0 if step % 2 == 0 else -1)
        if evaluate:
            evaluate(c)
        r = Result(c.id, None, failed=True) if fail_every and int(c.id[1:]) % fail_every == 0 else ok(c)
        s.tell([r])
        if check:
            check("tell", r)
        journal.append(("tell", [r]))
        step += 1
    return journal


@pytest.mark.parametrize("mode", ["mixture", "store"])
@pytest.mark.parametrize(("alpha", "matchmaker"), [(1.0, True), (0.0, False)])
def test_children_come_from_the_archive_and_the_archive_follows_the_replacement_rule(
    space, tmp_path, mode, alpha, matchmaker
):
    s = make(space, tmp_path / "m" if mode == "store" else None, alpha=alpha, matchmaker=matchmaker)
    slots, rows, ref_tell = _reference_archive(5, alpha)
    children = 0

    def check(kind, obj):
        nonlocal children
        if kind == "ask" and obj.parents:
            children += 1
            if any(slots):  # before the first tell, children of the (pending) seeds
                assert set(obj.parents) <= {c for c in slots if c}
            assert len(obj.parents) == 2 and obj.generation >= 1
        elif kind == "tell":
            if not obj.failed:
                ref_tell(obj.id, obj.samples)
            assert s.archive() == [c for c in slots if c]
            np.testing.assert_array_equal(s.scores, rows)

    drive(s, 40, fail_every=7, check=check)
    assert children == 37 and len(s.archive()) == 5


def test_failed_results_are_discarded(space):
    s = make(space)
    seeds = s.ask(3)
    s.tell([ok(seeds[0])])
    before = (s.archive(), s.scores.copy())
    s.tell([Result(seeds[1].id, None, failed=True)])
    s.tell([Result(seeds[2].id, np.array([np.nan]), samples=fake_samples(seeds[2].id))])  # non-finite: failed
    assert s.archive() == before[0] == [seeds[0].id]
    np.testing.assert_array_equal(s.scores, before[1])


def test_missing_or_mismatched_samples_are_errors(space):
    s = make(space)
    a, b = s.ask(2)
    with pytest.raises(StrategyError, match="per-sample"):
        s.tell([Result(a.id, np.array([0.5]))])
    s2 = make(space)
    a, b = s2.ask(2)
    s2.tell([ok(a)])
    with pytest.raises(StrategyError, match="sample scores"):
        s2.tell([Result(b.id, np.array([0.5]), samples=np.ones(N_SAMPLES + 1))])


@pytest.mark.parametrize(
    "options",
    [
        {"crossover": False},  # mutation only, without mutation
        {"mutation_std": 0.01},  # mutation without a member store
        {"pop_size": 1},
        {"alpha": -1.0},
        {"mutation_std": -0.1, "store_dir": "x"},
        {"popsize": 4},  # unknown option
    ],
)
def test_invalid_options_raise(space, options):
    with pytest.raises(StrategyError):
        M2N2(space, **options)


def test_vector_space_is_rejected():
    from evomerge.space.base import Space

    class Box(Space):
        names = ("x",)
        lower, upper = np.zeros(1), np.ones(1)

        def decode(self, x):  # pragma: no cover
            raise AssertionError

    with pytest.raises(StrategyError, match="model space"):
        M2N2(Box())


def test_mutation_only_children_have_one_parent(space, tmp_path):
    s = make(space, tmp_path / "m", crossover=False)
    drive(s, 12)
    kids = [c for c in s.asked.values() if c.parents]
    assert kids and all(len(c.parents) == 1 and len(c.recipe.parents) == 1 for c in kids)
    assert all(c.recipe.noise_std == 0.01 and c.recipe.noise_seed is not None for c in kids)


def test_store_garbage_collection_keeps_exactly_what_can_be_used_again(space, sources, tmp_path):
    """Real directories: a candidate's entry is written when it is evaluated (before its tell, as a worker
    does); after every tell the store holds exactly the told entries that are in the archive or are a parent
    of a candidate still pending."""
    store = tmp_path / "members"
    s = make(space, store, pop_size=4)
    pending: set[str] = set()
    kept_for_pending = 0

    def evaluate(c: Candidate) -> None:
        for p in c.recipe.parents:  # what the worker reads exists
            assert Path(p).is_dir(), p
        out = Path(c.recipe.save)
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"x")

    def check(kind, obj):
        nonlocal kept_for_pending
        if kind == "ask":
            pending.add(obj.id)
            return
        pending.discard(obj.id)
        told_ids = set(s.told)
        parents_of_pending = {p for c in pending for p in s.asked[c].parents}
        expected = (set(s.archive()) | parents_of_pending) & told_ids
        assert {p.name for p in store.iterdir()} == expected
        kept_for_pending += len(expected - set(s.archive()))
        assert all(Path(src).is_dir() for src in sources)  # the pool is never touched

    drive(s, 60, in_flight=4, fail_every=9, evaluate=evaluate, check=check)
    assert kept_for_pending > 0  # a replaced member was kept while a pending child still needed it
    assert len(list(store.iterdir())) == 4


# ------------------------------------------------------------------------------------ determinism


def _asks(journal):
    return [c for kind, payload in journal if kind == "ask" for c in payload]


@pytest.mark.parametrize("mode", ["mixture", "store"])
def test_same_seed_same_asks_other_seed_differs(space, tmp_path, mode):
    store = tmp_path / "m" if mode == "store" else None
    first = _asks(drive(make(space, store, seed=1), 25))
    again = _asks(drive(make(space, store, seed=1), 25))
    other = _asks(drive(make(space, store, seed=2), 25))
    assert first == again
    assert first[3:] != other[3:]


@pytest.mark.parametrize("mode", ["mixture", "store"])
def test_replayed_calls_give_the_same_next_asks(space, tmp_path, mode):
    store = tmp_path / "m" if mode == "store" else None
    original = make(space, store, seed=4)
    journal = drive(original, 20, fail_every=6)
    fresh = make(space, store, seed=4)
    for kind, payload in journal:
        if kind == "ask":
            assert [c.to_json() for c in fresh.ask(len(payload))] == payload
        else:
            fresh.tell(payload)
    assert fresh.archive() == original.archive()
    assert [c.to_json() for c in fresh.ask(3)] == [c.to_json() for c in original.ask(3)]


# --------------------------------------------------------------------------------- engine runs (Ray)


@pytest.fixture(scope="module")
def halves(tmp_path_factory) -> list[str]:
    """The reference's pre-trained seeds: MLPs trained on digits 0-4 and 5-9."""
    root = tmp_path_factory.mktemp("halves")
    return [
        str(save_digits_checkpoint(train_digits_mlp({0, 1, 2, 3, 4}, steps=10, seed=42), root / "low")),
        str(save_digits_checkpoint(train_digits_mlp({5, 6, 7, 8, 9}, steps=10, seed=43), root / "high")),
    ]


def _engine_config(halves, run_dir: Path, store: bool):
    options = {"pop_size": 6, **({"mutation_std": 0.01} if store else {})}
    return run_config("m2n2", run_dir, halves[0], halves, space={"type": "model", "chunk": 1},
                      strategy={"name": "m2n2", "options": options}, candidates=40)  # fmt: skip


def _journal(run_dir: Path):
    return journal_records(run_dir)


def _comparable(run_dir: Path):
    """Candidates and results of a run, with the run dir's path (member store) taken out."""
    _, asked, results = _journal(run_dir)
    root = str(run_dir.resolve())
    cands = [{**c, "recipe": {k: (v.replace(root, "RUN") if isinstance(v, str) else
                                  [p.replace(root, "RUN") for p in v] if k == "parents" else v)
                              for k, v in c["recipe"].items()}} for c in asked]  # fmt: skip
    res = {k: (r["status"], r["scores"], r["objectives"], r["samples"]) for k, r in results.items()}
    return cands, res


def _archive_of(run_dir: Path, config):
    from evomerge.runtime.run import build_strategy, objectives_of
    from evomerge.runtime.search import Objectives, replay
    from evomerge.space import build_space

    base, sources = config.models.base, list(config.models.sources)
    objectives = Objectives(objectives_of(config))
    strategy = build_strategy(config, build_space(config, base, sources), objectives.items, run_dir)
    replay(_journal(run_dir)[0], strategy, objectives)
    return strategy.archive()


@pytest.fixture(scope="module", params=["mixture", "store"])
def engine_run(request, local_ray, halves, tmp_path_factory):
    from evomerge.runtime.run import create_run_dir, execute

    store = request.param == "store"
    config = _engine_config(halves, tmp_path_factory.mktemp(f"run_{request.param}") / "run", store)
    run_dir = create_run_dir(config, None, None)
    execute(run_dir, config)
    return request.param, config, run_dir


def test_engine_run_journal_rebuilds_the_archive_scores_exactly(engine_run, halves):
    from evomerge.checkpoints import Checkpoint
    from evomerge.evaluate.base import unpack_samples
    from evomerge.merge.members import apply_mixture_stacked, build_offspring, model_layout

    mode, config, run_dir = engine_run
    _, asked, results = _journal(run_dir)
    assert len(asked) == 40 and all(r["status"] == "ok" for r in results.values())
    archive = _archive_of(run_dir, config)
    recipes = {c["id"]: Candidate.from_json(c).recipe for c in asked}
    assert len(archive) == 6 and any(c["generation"] > 0 for c in asked if c["id"] in archive)

    pool = {ref: {n: Checkpoint(ref).read(n) for n in ("w1", "b1", "w2", "b2")} for ref in halves}
    model = DigitsMLP()
    layout = model_layout(model, [{n: t.shape for n, t in p.items()} for p in pool.values()])
    evaluator = DigitsSpec().build()
    rebuilt: dict[str, dict[str, torch.Tensor]] = dict(pool)  # store mode: every member, from its parents

    def build(cid: str) -> None:
        recipe = recipes[cid]
        if isinstance(recipe, Mixture):
            stacks = {n: torch.stack([pool[r][n] for r in halves]) for n in layout.names}
            apply_mixture_stacked(recipe, stacks, halves, model, layout)
        else:
            build_offspring(recipe, lambda ref, name: rebuilt[ref][name], model, layout)
            rebuilt[recipe.save] = {n: p.detach().clone() for n, p in model.named_parameters()}

    for c in asked:  # in ask order: parents before children
        build(c["id"])
        if c["id"] not in archive:
            continue
        ev = evaluator.evaluate(model)
        assert ev.scores == results[c["id"]]["scores"]
        np.testing.assert_array_equal(
            ev.samples["digits"], unpack_samples(results[c["id"]]["samples"]["digits"])
        )
        if mode == "store":  # the stored member is the rebuilt one, bit for bit
            for n, p in model.named_parameters():
                assert torch.equal(Checkpoint(recipes[c["id"]].save).read(n), p.detach())
    if mode == "store":  # garbage collection left exactly the archive in the store
        assert sorted(
            p.name for p in (run_dir / "members").iterdir() if not p.name.startswith(".")
        ) == sorted(archive)


def test_engine_resume_after_an_interruption_matches_the_uninterrupted_run(
    engine_run, halves, tmp_path, monkeypatch
):
    from evomerge.runtime import search as search_mod
    from evomerge.runtime.run import create_run_dir, execute

    mode, _, full_dir = engine_run
    run_dir = tmp_path / "interrupted"
    config = _engine_config(halves, run_dir, mode == "store")
    if mode == "mixture":  # the journal cut right after the 18th result: later tells and asks are lost
        shutil.copytree(full_dir, run_dir)
        lines = (run_dir / "journal.jsonl").read_text().splitlines(keepends=True)
        cut = [i for i, line in enumerate(lines) if '"event":"result"' in line][17]
        (run_dir / "journal.jsonl").write_text("".join(lines[: cut + 1]))
    else:  # a real crash: the member store is as the run left it
        create_run_dir(config, None, None)
        original, calls = search_mod.Search._tell, []

        def crashing(self, ids):
            calls.append(ids)
            if len(calls) == 18:
                raise RuntimeError("driver crash")
            original(self, ids)

        monkeypatch.setattr(search_mod.Search, "_tell", crashing)
        with pytest.raises(RuntimeError, match="driver crash"):
            execute(run_dir, config)
        monkeypatch.setattr(search_mod.Search, "_tell", original)
    partial = _journal(run_dir)[2]
    assert 10 <= len(partial) < 40
    execute(run_dir, config, resume=True)
    assert _comparable(run_dir) == _comparable(full_dir)
    assert _archive_of(run_dir, config) == _archive_of(full_dir, config)
    if mode == "store":
        names = sorted(p.name for p in (run_dir / "members").iterdir() if not p.name.startswith("."))
        assert names == sorted(p.name for p in (full_dir / "members").iterdir() if not p.name.startswith("."))
        for name in names:
            a, b = run_dir / "members" / name, full_dir / "members" / name
            assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
