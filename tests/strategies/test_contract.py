"""Every registered strategy against the ask/tell contract of evomerge/strategies/base.py.

One toy space (4 genes in an uneven box), one cheap 2-objective problem (maximize -|x - a|^2 and
-|x - b|^2; the Pareto front is the segment [a, b]), the same calls for every strategy: tests are
parametrized over the registry and pass `num_workers` wherever a strategy takes it, as the runtime does.
"""

from __future__ import annotations

import inspect
import json
import logging
import random
import subprocess
import sys
import threading

import numpy as np
import pytest

from evomerge.merge.recipe import ModelSource, Recipe
from evomerge.space.base import Space
from evomerge.strategies import STRATEGIES, Candidate, Result, Strategy, StrategyError

# model-space strategies (m2n2) have no genome and need per-sample scores: tests/strategies/test_m2n2.py
NAMES = [n for n in STRATEGIES.names() if not getattr(STRATEGIES.get(n), "model_space", False)]
IN_FLIGHT = 4  # candidates evaluated at once by the simulated scheduler
BUDGET = 120
A = np.array([0.2, 0.8, -0.5, 1.0])
B = np.array([0.6, 0.3, 0.4, 1.8])


class ToySpace(Space):
    names = ("weight_a", "weight_b", "shift", "scale")
    lower = np.array([0.0, 0.0, -1.0, 0.5])
    upper = np.array([1.0, 1.0, 1.0, 2.0])

    def decode(self, x: np.ndarray) -> Recipe:
        x = self.clip(x)
        return Recipe(
            merge_method="linear",
            models=[
                ModelSource(model="a", parameters={"weight": float(x[0])}),
                ModelSource(model="b", parameters={"weight": float(x[1])}),
            ],
        )


SPACE = ToySpace()


def objectives(x: np.ndarray) -> np.ndarray:
    return np.array([-np.sum((x - A) ** 2), -np.sum((x - B) ** 2)])


def make(name: str, seed: int = 0, workers: int = IN_FLIGHT, **options) -> Strategy:
    cls = STRATEGIES.get(name)
    if "num_workers" in inspect.signature(cls).parameters:
        options.setdefault("num_workers", workers)
    return cls(SPACE, n_objectives=2, seed=seed, budget=BUDGET, **options)


def evaluate(c: Candidate, fail_every: int = 0) -> Result:
    k = int(c.id[1:])
    if fail_every and k % fail_every == 0:
        return Result(c.id, None, failed=True)
    if fail_every and k % fail_every == 1:
        return Result(c.id, np.array([np.nan, -1.0]))
    return Result(c.id, objectives(c.genome))


def drive(s: Strategy, n_evals: int, *, fail_every: int = 0, disturb: bool = False) -> list[tuple]:
    """The asynchronous pattern: ask(2) while at most IN_FLIGHT - 2 are in flight, then tell one result,
    alternately the oldest and the newest. Stops with candidates still in flight. Returns the journal."""
    journal: list[tuple] = []
    pending: list[Candidate] = []
    step = 0
    while len(s.told) < n_evals:
        if len(pending) <= IN_FLIGHT - 2:
            batch = s.ask(2)
            journal.append(("ask", [(c.id, c.genome.copy()) for c in batch]))
            pending += batch
        r = evaluate(pending.pop(0 if step % 2 == 0 else -1), fail_every)
        s.tell([r])
        journal.append(("tell", [r]))
        step += 1
        if disturb:  # other code drawing from the global generators must not matter
            np.random.random()
            random.random()
    return journal


def replay(s: Strategy, journal: list[tuple]) -> None:
    for kind, payload in journal:
        if kind == "ask":
            got = s.ask(len(payload))
            for c, (cid, genome) in zip(got, payload, strict=True):
                assert c.id == cid
                np.testing.assert_array_equal(c.genome, genome)
        else:
            s.tell(payload)


def asked_genomes(journal: list[tuple]) -> np.ndarray:
    return np.array([g for kind, payload in journal if kind == "ask" for _, g in payload])


def hypervolume_2d(points: np.ndarray, ref: tuple[float, float]) -> float:
    pts = points[(points[:, 0] > ref[0]) & (points[:, 1] > ref[1])]
    hv, prev = 0.0, ref[1]
    for f1, f2 in pts[np.argsort(-pts[:, 0])]:
        if f2 > prev:
            hv, prev = hv + (f1 - ref[0]) * (f2 - prev), f2
    return hv


# ---------------------------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", NAMES)
def test_rounds_to_budget_stay_in_bounds_and_decode(name):
    s = make(name)
    journal = drive(s, 60)
    genomes = asked_genomes(journal)
    assert genomes.shape == (len(s.asked), SPACE.dim)
    assert np.all(genomes >= SPACE.lower) and np.all(genomes <= SPACE.upper)
    assert len(set(s.asked)) == len(s.asked)
    for c in s.asked.values():
        assert c.recipe == SPACE.decode(c.genome)
        back = Candidate.from_json(json.loads(json.dumps(c.to_json())))  # what the journal stores
        assert back.id == c.id and back.recipe == c.recipe
        np.testing.assert_array_equal(back.genome, c.genome)
    assert s.best() is not None and not s.best()[1].failed


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_gives_same_asks_another_seed_differs(name):
    np.random.seed(1)
    first = asked_genomes(drive(make(name, seed=0), 30, disturb=True))
    np.random.seed(2)
    again = asked_genomes(drive(make(name, seed=0), 30))
    other = asked_genomes(drive(make(name, seed=1), 30))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first[: len(other)], other[: len(first)])


@pytest.mark.parametrize("name", NAMES)
def test_replayed_calls_give_the_same_next_asks(name):
    np.random.seed(3)
    original = make(name)
    journal = drive(original, 40, fail_every=7, disturb=True)
    np.random.seed(4)
    fresh = make(name)
    replay(fresh, journal)  # checks every replayed ask as the runtime does
    for _ in range(3):  # the resumed run continues exactly like the original
        a, b = original.ask(1)[0], fresh.ask(1)[0]
        assert a.id == b.id
        np.testing.assert_array_equal(a.genome, b.genome)
        original.tell([evaluate(a)])
        fresh.tell([evaluate(b)])


@pytest.mark.parametrize("name", NAMES)
def test_a_sequential_run_with_one_worker_replays(name):
    """ask(1)/tell(1) with num_workers=1 (nevergrad then picks sequential algorithms, e.g. Cobyla)."""

    def run(s: Strategy, n: int) -> list[tuple]:
        journal = []
        for _ in range(n):
            c = s.ask(1)[0]
            r = evaluate(c, fail_every=9)
            s.tell([r])
            journal += [("ask", [(c.id, c.genome.copy())]), ("tell", [r])]
        return journal

    before = set(threading.enumerate())
    original = make(name, workers=1)
    journal = run(original, 30)
    assert all(t.daemon for t in set(threading.enumerate()) - before)  # exiting never waits for them
    fresh = make(name, workers=1)
    replay(fresh, journal)
    np.testing.assert_array_equal(original.ask(1)[0].genome, fresh.ask(1)[0].genome)


@pytest.mark.parametrize("name", NAMES)
def test_nan_inf_and_failed_results_are_recorded_as_failed(name):
    s = make(name)
    a, b, c = s.ask(2) + s.ask(1)
    s.tell([Result(a.id, np.array([np.nan, 0.0])), Result(b.id, np.array([-np.inf, 1.0]))])
    s.tell([Result(c.id, None, failed=True)])
    for x in (a, b, c):
        assert s.told[x.id].failed and s.told[x.id].objectives is None
    drive(s, 40, fail_every=3)  # failures spread over whole generations
    assert sum(r.failed for r in s.told.values()) >= 3 + 40 // 3


@pytest.mark.parametrize("name", NAMES)
def test_only_failures_do_not_crash(name):
    s = make(name)
    pending = s.ask(2)
    for _ in range(25):
        c = pending.pop(0)
        s.tell([Result(c.id, None, failed=True)])
        pending += s.ask(1)
    assert s.best() is None
    assert all(SPACE.lower[i] <= g <= SPACE.upper[i] for c in pending for i, g in enumerate(c.genome))


@pytest.mark.parametrize("name", NAMES)
def test_telling_an_unknown_id_raises(name):
    s = make(name)
    s.ask(1)
    with pytest.raises(StrategyError, match="unknown candidate id 'nope'"):
        s.tell([Result("nope", np.zeros(2))])


@pytest.mark.parametrize("name", NAMES)
def test_a_repeated_tell_is_ignored(name):
    once, twice = make(name), make(name)
    for s in (once, twice):
        s.ask(2)
    for s in (once, twice):
        for c in list(s.asked.values()):
            s.tell([evaluate(c)])
    twice.tell([Result("c00001", np.array([5.0, 5.0]))])  # a different value, ignored
    assert np.array_equal(twice.told["c00001"].objectives, once.told["c00001"].objectives)
    nexts = [s.ask(2) for s in (once, twice)]
    for x, y in zip(*nexts):
        np.testing.assert_array_equal(x.genome, y.genome)


@pytest.mark.parametrize("name", NAMES)
def test_a_wrong_objective_count_raises_and_leaves_the_batch_untold(name):
    s = make(name)
    a, b = s.ask(2)
    with pytest.raises(StrategyError, match="expected 2 objectives"):
        s.tell([evaluate(a), Result(b.id, np.zeros(3))])
    assert not s.told
    s.tell([evaluate(a), evaluate(b)])
    assert set(s.told) == {a.id, b.id}


@pytest.mark.parametrize("name", NAMES)
def test_an_unknown_option_is_an_error_naming_it(name):
    with pytest.raises(StrategyError, match="popsizee"):
        make(name, popsizee=8)


@pytest.mark.parametrize("name", NAMES)
def test_improves_on_its_initial_candidates(name):
    """Single-objective strategies close half the weighted-sum gap to the optimum left by the best of their
    first 8 candidates; multi-objective ones close a third of the hypervolume gap to the true front."""
    t = np.linspace(0, 1, 2001)[:, None]
    front = np.array([objectives(x) for x in A + t * (B - A)])
    ref = (-2.0, -2.0)
    for seed in (0, 1):
        s = make(name, seed=seed)
        drive(s, BUDGET)
        order = sorted(s.told, key=lambda i: int(i[1:]))
        values = np.array([s.told[i].objectives for i in order])
        if s.multi_objective:
            first, final, best = (hypervolume_2d(v, ref) for v in (values[:8], values, front))
            assert (final - first) / (best - first) > 1 / 3, (seed, first, final, best)
        else:
            sums = values @ s.weights
            first, final, best = sums[:8].max(), sums.max(), -np.sum((A - B) ** 2) / 2
            assert (final - first) / (best - first) > 1 / 2, (seed, first, final, best)


@pytest.mark.parametrize("name", NAMES)
def test_leaves_global_generators_and_root_logging_alone(name):
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    np.random.seed(7)
    random.seed(7)
    expected = (np.random.get_state()[1].copy(), random.getstate())
    drive(make(name), 30)
    np.testing.assert_array_equal(np.random.get_state()[1], expected[0])
    assert random.getstate() == expected[1]
    assert root.handlers == handlers and root.level == level


# ---------------------------------------------------------------------------------------------- options


def test_importing_the_registry_imports_neither_nevergrad_nor_optuna():
    code = "import sys, evomerge.strategies; print('nevergrad' in sys.modules, 'optuna' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize(
    "name", [n for n in NAMES if "num_workers" in inspect.signature(STRATEGIES.get(n)).parameters]
)
def test_asking_beyond_num_workers_raises_instead_of_hanging(name):
    s = make(name, num_workers=2)
    s.ask(2)
    with pytest.raises(StrategyError, match="num_workers=2"):
        s.ask(1)


@pytest.mark.parametrize("sigma", [0.02, 0.08])
def test_cma_sigma_is_the_first_step_as_a_fraction_of_each_range(sigma):
    s = make("cma", sigma=sigma, popsize=64, num_workers=64)
    genomes = np.array([c.genome for c in s.ask(64)])
    ratio = genomes.std(axis=0) / (SPACE.upper - SPACE.lower) / sigma
    assert np.all((ratio > 0.7) & (ratio < 1.4)), ratio
    np.testing.assert_allclose(genomes.mean(axis=0), SPACE.initial(), atol=4 * sigma)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("cma", {"popsize": 1}, "popsize must be an integer >= 2"),
        ("cma", {"sigma": 0.0}, "sigma must be a positive number"),
        ("cma", {"num_workers": 0}, "num_workers must be an integer >= 1"),
        ("nsga2", {"population_size": 1}, "population_size must be an integer >= 2"),
        ("tpe", {"n_startup_trials": -1}, "n_startup_trials must be an integer >= 0"),
    ],
)
def test_bad_option_values_are_errors_quoting_the_value(name, options, message):
    with pytest.raises(StrategyError, match=message):
        make(name, **options)


def test_ngopt_needs_a_budget():
    with pytest.raises(StrategyError, match="needs a budget"):
        STRATEGIES.get("ngopt")(SPACE, n_objectives=2, seed=0)
