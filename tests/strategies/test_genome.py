"""GENOME / GENOME+ (ALGORITHMS.md 4.4): operators on hand-computed cases, the strategy's ask/tell
behaviour over a model space, determinism, and an engine run (digits MLPs, Ray) resumed from its journal."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import journal_records, run_config

from evomerge.merge.mixture import Mixture
from evomerge.strategies import Candidate, Result, StrategyError
from evomerge.strategies.genome import (
    Genome,
    crossover,
    fitness_weights,
    mutate,
    pso_velocity,
    roulette_pair,
    roulette_probabilities,
    select,
    tournament,
)

torch.set_num_threads(1)

# ---------------------------------------------------------------------------------------- operators


def test_roulette_probabilities_by_hand():
    np.testing.assert_allclose(roulette_probabilities(np.array([1.0, 3.0])), [0.25, 0.75])
    np.testing.assert_allclose(roulette_probabilities(np.array([-1.0, 1.0])), [0.0, 1.0])  # shifted by -min
    np.testing.assert_allclose(roulette_probabilities(np.zeros(4)), [0.25] * 4)  # all zero: uniform


def test_roulette_pair_is_two_distinct_members():
    rng = np.random.default_rng(0)
    pairs = [roulette_pair(np.array([0.0, 0.0, 1.0]), rng) for _ in range(50)]
    assert all(a != b for a, b in pairs)
    assert all(a == 2 for a, _ in pairs)  # only member 2 has fitness; the second is uniform among the rest


def test_crossover_is_fitness_weighted_by_hand():
    assert fitness_weights(0.2, 0.6) == pytest.approx((0.25, 0.75))
    assert fitness_weights(0.0, 0.0) == (0.5, 0.5)
    assert fitness_weights(-1.0, 0.5) == (0.0, 1.0)
    a, b = np.array([[1.0, 0.0], [0.5, 0.5]]), np.array([[0.0, 1.0], [1.0, -1.0]])
    np.testing.assert_allclose(crossover(a, b, 0.2, 0.6), [[0.25, 0.75], [0.875, -0.625]])


def test_mutation_is_a_bernoulli_mask_times_gaussian_noise():
    x = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(mutate(x, np.random.default_rng(1), 0.0, 0.5), x)
    np.testing.assert_array_equal(mutate(x, np.random.default_rng(1), 1.0, 0.0), x)
    rng = np.random.default_rng(7)
    mask, noise = rng.random(x.shape) < 0.5, rng.normal(0.0, 0.3, x.shape)
    np.testing.assert_array_equal(mutate(x, np.random.default_rng(7), 0.5, 0.3), x + mask * noise)


def test_tournament_with_full_size_is_rank_order_and_always_fills():
    f = np.array([5.0, 1.0, 4.0, 3.0])
    assert tournament(f, 3, 4, np.random.default_rng(0)) == [0, 2, 3]
    got = tournament(f, 10, 3, np.random.default_rng(0))  # asks more than exist: every index once
    assert sorted(got) == [0, 1, 2, 3]


def test_select_keeps_the_elite_then_tournament_by_hand():
    f = np.array([0.1, 0.9, 0.5, 0.7, 0.3])
    # elite round(0.34 * 3) = 1 -> [1]; tournament of size 5 over the rest picks 3 then 2
    assert select(f, 3, 0.34, "tournament", 5, np.random.default_rng(0)) == [1, 3, 2]
    got = select(f, 3, 0.0, "roulette", 3, np.random.default_rng(0))  # elite at least one
    assert got[0] == 1 and len(set(got)) == 3
    assert select(f[:2], 3, 0.1, "tournament", 3, np.random.default_rng(0)) == [0, 1]


def test_pso_velocity_by_hand():
    one = np.ones(1)
    # C = 0.2 + 0.2 + 0.2 + 0.1 = 0.7; 0.2*1 + 0.2*(1-0) + 0.2*(2-0) - 0.1*(-1-0) = 0.9
    v = pso_velocity(one, 0 * one, one, 2 * one, -one, (1.0, 1.0, 1.0, 1.0))
    np.testing.assert_allclose(v, [0.9 / 0.7])
    v = pso_velocity(one, 0 * one, one, 2 * one, -one, (0.5, 0.0, 0.0, 1.0), (0.2, 0.2, 0.2, 0.2))
    np.testing.assert_allclose(v, [(0.1 + 0.2) / 0.3])


# ----------------------------------------------------------------------------------------- strategy


class FakeModelSpace:
    """What GENOME reads from a ModelSpace: pool models, base, delta, segment boundaries."""

    names: tuple[str, ...] = ()
    lower = upper = np.zeros(0)

    def __init__(self, k: int = 3, delta: bool = True) -> None:
        self.models = tuple(f"m{i}" for i in range(k))
        self.base = "base"
        self.delta = delta
        self.boundaries = np.array([0, 10, 25, 40])


def fitness_of(c: Candidate) -> float:
    return float(np.random.default_rng(int(c.id[1:])).random())


def ok(c: Candidate) -> Result:
    return Result(c.id, np.array([fitness_of(c)]))


def rows(c: Candidate) -> np.ndarray:
    """The candidate's expert coefficients on the space's 3 segments (base column dropped)."""
    mix = c.recipe
    assert isinstance(mix, Mixture)
    dense = np.array(
        [mix.coefficients[np.searchsorted(mix.starts, s, side="right") - 1] for s in (0, 10, 25)]
    )
    return dense[:, :-1]


def run(strategy: Genome, n: int, *, workers: int = 1) -> list[Candidate]:
    """The runtime's ordered pattern: ask(workers), then tell the oldest and ask one, until n are told."""
    asked = strategy.ask(workers)
    pending = list(asked)
    while len(strategy.told) < n:
        c = pending.pop(0)
        strategy.tell([ok(c)])
        new = strategy.ask(1)
        asked += new
        pending += new
    return asked


def test_first_the_experts_alone_then_pairs_with_fitness_weights():
    s = Genome(FakeModelSpace(), pop_size=4, seed=0)
    experts = s.ask(3)
    for k, c in enumerate(experts):
        np.testing.assert_array_equal(rows(c), np.eye(3)[[k] * 3])
        assert c.recipe.models == ["m0", "m1", "m2", "base"]
        np.testing.assert_allclose(np.array(c.recipe.coefficients)[:, -1], 0.0)  # delta: base gets 1 - sum
    s.tell([ok(c) for c in experts])
    f = {c.id: fitness_of(c) for c in experts}
    pairs = s.ask(4)
    for c in pairs:
        a, b = c.parents
        wa = f[a] / (f[a] + f[b]) if c.info["weights"] == "fitness" else c.info["w_a"]
        ia, ib = experts.index(next(e for e in experts if e.id == a)), [e.id for e in experts].index(b)
        expected = np.zeros(3)
        expected[ia], expected[ib] = wa, 1 - wa
        np.testing.assert_allclose(rows(c), [expected] * 3)
    assert [c.info["weights"] for c in pairs] == ["fitness"] * 3 + [
        "random"
    ]  # 3 distinct pairs, then repeats


def test_children_are_exact_operations_on_their_parents_rows():
    s = Genome(FakeModelSpace(), pop_size=4, seed=1, mutation_rate=0.5, gene_rate=0.5, sigma=0.1)
    asked = run(s, 40, workers=2)
    by_id = {c.id: c for c in asked}
    ops = {c.info["op"] for c in asked}
    assert {"expert", "init_pair", "crossover", "mutation"} <= ops
    for c in asked:
        if c.info["op"] == "crossover":
            a, b = (by_id[p] for p in c.parents)
            wa = c.info["w_a"]
            np.testing.assert_allclose(rows(c), wa * rows(a) + (1 - wa) * rows(b), atol=1e-12)
            assert wa == pytest.approx(fitness_weights(fitness_of(a), fitness_of(b))[0])
        if c.info["op"] == "mutation":
            assert rows(c).shape == rows(by_id[c.parents[0]]).shape
    assert len(s.population) == 4
    assert s.population[0].fitness == max(m.fitness for m in s.population)  # the elite first


def test_selection_keeps_the_best_ever_member():
    s = Genome(FakeModelSpace(), pop_size=3, seed=2)
    asked = run(s, 30)
    best = max((c for c in asked if c.id in s.told), key=fitness_of)
    assert best.id in [m.id for m in s.population] and s.best_member.id == best.id
    assert s.top_members(1) == [best.id]


def test_succession_moves_every_member_and_the_move_replaces_its_origin():
    s = Genome(FakeModelSpace(), pop_size=3, seed=3, succession=True, cross_rate=0.0, mutation_rate=0.0)
    asked = run(s, 3 + 3 + 3)  # experts, init pairs, one PSO step (told and selected)
    moves = [c for c in asked if c.info["op"] == "pso"]
    assert len(moves) >= 3 and moves[0].info["lam"] == 0.5
    pop = {m.id for m in s.population}
    assert not pop & {c.parents[0] for c in moves[:3]}  # each told move replaced its origin
    more = run(s, 12)
    assert any(c.info["op"] == "pso" and c.info["lam"] == pytest.approx(0.5 * 0.95) for c in more)


def test_pso_move_is_x_plus_lambda_v_with_the_documented_velocity():
    s = Genome(FakeModelSpace(k=2), pop_size=2, seed=4, succession=True, cross_rate=0.0, mutation_rate=0.0)
    for _ in range(2):  # experts, then the init pairs, each told and selected
        s.tell([ok(c) for c in s.ask(2)])
    origin = {m.id: (m.coeffs.copy(), m.velocity.copy(), m.best.copy()) for m in s.population}
    g_best = s.best_member.coeffs.copy()
    g_worst = min(s.population, key=lambda m: m.fitness).coeffs.copy()
    rng = np.random.default_rng()
    rng.bit_generator.state = s.rng.bit_generator.state
    for c in s.ask(2):  # r1..r4 drawn per member, in population order
        x, v, p = origin[c.parents[0]]
        v_new = pso_velocity(v, x, p, g_best, g_worst, rng.random(4))
        np.testing.assert_allclose(rows(c)[:, :2], x + 0.5 * v_new)


def test_early_stop_flag_after_steps_without_improvement():
    s = Genome(FakeModelSpace(), pop_size=3, seed=5, early_stop=1)

    def flat(c: Candidate) -> Result:
        return Result(c.id, np.array([1.0 if c.id == "c00001" else 0.5]))

    pending = s.ask(1)
    while len(s.told) < 25:
        c = pending.pop(0)
        s.tell([flat(c)])
        pending += s.ask(1)
    assert s.done and any(c.info.get("after_early_stop") for c in pending)


def test_failed_results_never_enter_the_population():
    s = Genome(FakeModelSpace(), pop_size=3, seed=6)
    pending = s.ask(1)
    while len(s.told) < 20:
        c = pending.pop(0)
        s.tell([Result(c.id, None, failed=True) if int(c.id[1:]) % 3 == 0 else ok(c)])
        pending += s.ask(1)
    assert all(not s.told[m.id].failed for m in s.population)


@pytest.mark.parametrize(
    "options",
    [{"cross_method": "ties"}, {"pop_size": 1}, {"selection": "best"}, {"cross_rate": 2.0}, {"phi": (1, 2)},
     {"nope": 1}],
)  # fmt: skip
def test_invalid_options_raise(options):
    with pytest.raises(StrategyError):
        Genome(FakeModelSpace(), **options)


def test_vector_space_is_rejected():
    from evomerge.space.base import Space

    class Box(Space):
        names, lower, upper = ("a",), np.zeros(1), np.ones(1)

        def decode(self, x):  # pragma: no cover
            raise NotImplementedError

    with pytest.raises(StrategyError, match="model space"):
        Genome(Box())


@pytest.mark.parametrize("succession", [False, True])
def test_same_seed_same_asks_and_replay_gives_the_same_next_asks(succession):
    def asks(seed):
        return [
            c.to_json()
            for c in run(
                Genome(FakeModelSpace(), seed=seed, pop_size=4, succession=succession), 30, workers=2
            )
        ]

    assert asks(0) == asks(0) and asks(0) != asks(1)
    a, b = (Genome(FakeModelSpace(), seed=0, pop_size=4, succession=succession) for _ in range(2))
    run(a, 20, workers=2)
    run(b, 20, workers=2)
    assert [c.to_json() for c in a.ask(2)] == [c.to_json() for c in b.ask(2)]


# --------------------------------------------------------------------------------- engine run (Ray)


@pytest.fixture(scope="module")
def digits_pool(tmp_path_factory) -> list[str]:
    from evomerge.evaluate.digits import save_digits_checkpoint, train_digits_mlp

    root = tmp_path_factory.mktemp("genome_pool")
    groups = [{0, 1, 2}, {3, 4, 5}, {6, 7, 8, 9}]
    return [str(save_digits_checkpoint(train_digits_mlp(g, steps=10, seed=40 + i), root / f"e{i}"))
            for i, g in enumerate(groups)]  # fmt: skip


def _config(pool, run_dir: Path):
    strategy = {"name": "genome", "options": {"pop_size": 4, "succession": True, "sigma": 0.1}}
    return run_config("genome", run_dir, pool[0], pool, space={"type": "model", "chunk": "tensor"},
                      strategy=strategy, candidates=24)  # fmt: skip


def _journal(run_dir: Path):
    _, asked, results = journal_records(run_dir)
    return asked, {cid: (e["status"], e["scores"]) for cid, e in results.items()}


def test_engine_run_resumes_exactly_from_its_journal(local_ray, digits_pool, tmp_path):
    from evomerge.runtime.run import create_run_dir, execute, resume

    config = _config(digits_pool, tmp_path / "full")
    full_dir = create_run_dir(config, None, None)
    execute(full_dir, config)
    asked, results = _journal(full_dir)
    assert len(asked) == 24 and all(status == "ok" for status, _ in results.values())
    assert {c["info"]["op"] for c in asked} >= {"expert", "init_pair", "pso"}

    cut_dir = tmp_path / "cut"  # the journal cut right after the 11th result: later tells and asks are lost
    shutil.copytree(full_dir, cut_dir)
    lines = (cut_dir / "journal.jsonl").read_text().splitlines(keepends=True)
    cut = [i for i, line in enumerate(lines) if '"event":"result"' in line][10]
    (cut_dir / "journal.jsonl").write_text("".join(lines[: cut + 1]))
    (cut_dir / "front.json").unlink()
    resume(cut_dir)
    assert _journal(cut_dir) == (asked, results)
