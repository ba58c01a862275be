"""The streamed merge's lookahead: same values in the same order, one job ahead only within the memory budget."""

import threading

import pytest

from evomerge.merge.lookahead import Lookahead


def _recording():
    threads: dict[str, str] = {}

    def compute(key: str) -> str:
        threads[key] = threading.current_thread().name
        return key.upper()

    return compute, threads


def test_values_come_in_order_and_the_next_job_runs_on_the_second_thread():
    costs = {"a": 1, "b": 1, "c": 1, "d": 1}
    compute, threads = _recording()
    with Lookahead(list(costs), compute, costs.__getitem__, budget=2) as ahead:
        assert [ahead.get(k) for k in costs] == ["A", "B", "C", "D"]
    assert threads["a"] == threading.current_thread().name  # nothing ran before the first ask
    assert all(threads[k].startswith("evomerge-lookahead") for k in "bcd")


def test_a_pair_over_the_budget_is_not_run_side_by_side():
    costs = {"small": 1, "big": 4, "tail": 1}  # budget = the largest job: small + big > 4, big + tail > 4
    compute, threads = _recording()
    with Lookahead(list(costs), compute, costs.__getitem__) as ahead:
        assert [ahead.get(k) for k in costs] == ["SMALL", "BIG", "TAIL"]
    assert all(not name.startswith("evomerge-lookahead") for name in threads.values())


def test_an_error_ahead_reaches_the_caller_at_its_turn():
    def compute(key: str) -> str:
        if key == "b":
            raise ValueError("b failed")
        return key

    with Lookahead(["a", "b", "c"], compute, lambda k: 1, budget=2) as ahead:
        assert ahead.get("a") == "a"
        with pytest.raises(ValueError, match="b failed"):
            ahead.get("b")


def test_close_waits_for_the_thread_and_drops_what_ran_ahead():
    release = threading.Event()

    def compute(key: str) -> str:
        if key == "b":
            release.wait(5)
        return key

    ahead = Lookahead(["a", "b"], compute, lambda k: 1, budget=2)
    assert ahead.get("a") == "a"  # "b" now runs ahead and blocks
    release.set()
    ahead.close()
    assert not ahead.ahead
