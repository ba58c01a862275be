"""RacingPlan (evomerge/fidelity/plan.py) driven directly, without Ray or a model: synthetic per-item answers
go in as worker payloads (packed like a worker packs them), decisions come out as `rung` events. The search
loop's protocol is followed as evomerge.runtime.search does it: on_ask(cid, told before it), first(cid),
advance(cid, payload) until a final payload, on_result(result event), on_tell(cid)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from evomerge.evaluate.base import pack_samples, unpack_samples
from evomerge.fidelity.plan import ObjectiveMap, RacingPlan

SIZES = {"a": 300, "b": 300}
RUNGS = [20, 60]  # -> 20, 60, 300 items per task


def _plan(*, eta: float | None = 3.0, test: str = "none", multi: bool = False, seed: int = 0) -> RacingPlan:
    tasks = list(SIZES)
    omap = ObjectiveMap(tasks, np.ones(len(tasks)), np.ones(len(tasks)), multi)
    return RacingPlan(dict(SIZES), omap, rungs=RUNGS, eta=eta, test=test, alpha=0.1, seed=seed)


def _answers(p: float, seed: int) -> dict[str, np.ndarray]:
    """A candidate's 0/1 answer on every item of every task (item position -> score), success rate p."""
    rng = np.random.default_rng(seed)
    return {t: (rng.random(n) < p).astype(np.float64) for t, n in SIZES.items()}


class Driver:
    """The search loop's side of the protocol, journaling what the runtime journals (ask, rung, result,
    tell) so that a fresh plan can be rebuilt from it as `runtime.search.replay` does."""

    def __init__(self, plan: RacingPlan) -> None:
        self.plan = plan
        self.told = 0
        self.journal: list[dict[str, Any]] = []
        self.answers: dict[str, dict[str, np.ndarray]] = {}
        self.items: dict[str, dict[str, list[int]] | None] = {}

    def ask(self, cid: str, answers: dict[str, np.ndarray]) -> None:
        self.answers[cid] = answers
        self.journal.append({"event": "ask", "id": cid, "told_before": self.told})
        self.plan.on_ask(cid, self.told)
        self.items[cid] = self.plan.first(cid)

    def payload(self, cid: str) -> dict[str, Any]:
        """What a worker returns for the candidate's current slice of items."""
        items = self.items[cid]
        assert items is not None
        y = {t: self.answers[cid][t][pos] for t, pos in items.items()}
        return {"id": cid, "scores": {t: float(v.mean()) for t, v in y.items()},
                "samples": {t: pack_samples(v) for t, v in y.items()},
                "forward_passes": sum(len(v) for v in y.values()), "seconds": 0.5, "pid": 7}  # fmt: skip

    def step(self, cid: str) -> dict[str, Any]:
        """One worker answer: journals its rung event and returns it (and the result, when the race ends)."""
        step = self.plan.advance(cid, self.payload(cid))
        assert step.rung is not None
        self.journal.append(step.rung)
        if step.items is not None:
            assert step.final is None
            self.items[cid] = step.items
        else:
            assert step.final is not None
            self.items[cid] = None
            event = {"event": "result", "id": cid, "status": "ok", **step.final}
            self.journal.append(event)
            self.plan.on_result(event)
        return step.rung

    def race(self, cid: str) -> list[dict[str, Any]]:
        rungs = [self.step(cid)]
        while self.items[cid] is not None:
            rungs.append(self.step(cid))
        return rungs

    def tell(self, cid: str) -> None:
        self.journal.append({"event": "tell", "id": cid})
        self.plan.on_tell(cid)
        self.told += 1

    def result(self, cid: str) -> dict[str, Any]:
        return next(e for e in self.journal if e["event"] == "result" and e["id"] == cid)


def replay(plan: RacingPlan, journal: list[dict[str, Any]]) -> RacingPlan:
    for e in journal:
        if e["event"] == "ask":
            plan.on_ask(e["id"], e["told_before"])
        elif e["event"] == "rung":
            plan.replay_rung(e)
        elif e["event"] == "result":
            plan.on_result(e)
        elif e["event"] == "tell":
            plan.on_tell(e["id"])
    return plan


def _decisions(rungs: list[dict[str, Any]]) -> list[str]:
    return [r["decision"] for r in rungs]


# ---------------------------------------------------------------------------------------------- slices


def test_slices_are_disjoint_nested_prefixes_of_one_seeded_order_per_task():
    plan = _plan()
    slices = [plan.slice(r) for r in range(plan.n_rungs)]
    for t, n in SIZES.items():
        joined = np.concatenate([s[t] for s in slices])
        assert sorted(joined.tolist()) == list(range(n))  # every item exactly once
        assert [len(s[t]) for s in slices] == [20, 40, 240]
        assert np.array_equal(joined, plan.orders[t])
    assert not np.array_equal(plan.orders["a"], np.arange(300))  # shuffled, not lm-eval's document order
    assert np.array_equal(_plan().orders["a"], plan.orders["a"])  # the same order in a fresh plan
    assert not np.array_equal(_plan(seed=1).orders["a"], plan.orders["a"])
    assert plan.slice(plan.n_rungs) == {}  # nothing after the last rung


# ---------------------------------------------------------------------------------------------- decisions


def test_a_candidate_with_no_references_is_promoted_to_the_end_and_exact():
    d = Driver(_plan(test="wilcoxon"))
    d.ask("c1", _answers(0.0, 1))  # scores 0 on every item: nothing to compare with, so never stopped
    rungs = d.race("c1")
    assert _decisions(rungs) == ["promote", "promote", "done"]
    assert [r["items"] for r in rungs] == [{"a": 20, "b": 20}, {"a": 60, "b": 60}, {"a": 300, "b": 300}]
    assert [r["forward_passes"] for r in rungs] == [40, 80, 480]
    res = d.result("c1")
    assert res["fidelity"] == {"mode": "racing", "exact": True, "rung": 2, "stopped": False,
                               "items": {"a": 300, "b": 300}}  # fmt: skip
    assert res["forward_passes"] == 600 == sum(r["forward_passes"] for r in rungs)
    assert res["seconds"] == pytest.approx(1.5)  # the three slices' seconds
    # the final samples are per item in the shared order; the scores their means
    for t in SIZES:
        assert np.array_equal(unpack_samples(res["samples"][t]), d.answers["c1"][t][d.plan.orders[t]])
        assert res["scores"][t] == 0.0


def test_halving_stops_a_clearly_worse_candidate_once_there_are_rivals():
    d = Driver(_plan())  # halving only
    d.ask("good", _answers(0.8, 1))
    assert _decisions(d.race("good")) == ["promote", "promote", "done"]
    d.tell("good")
    d.ask("bad", _answers(0.1, 2))
    d.ask("better", _answers(0.95, 3))
    rungs = d.race("bad")
    assert _decisions(rungs) == ["stop"]
    res = d.result("bad")
    assert res["fidelity"]["exact"] is False and res["fidelity"]["stopped"] is True
    assert res["fidelity"]["items"] == {"a": 20, "b": 20} and res["forward_passes"] == 40
    assert res["scores"] == {t: float(d.answers["bad"][t][d.plan.orders[t][:20]].mean()) for t in SIZES}
    assert _decisions(d.race("better")) == ["promote", "promote", "done"]


def test_paired_test_alone_stops_only_against_an_exact_incumbent():
    d = Driver(_plan(eta=None, test="wilcoxon"))
    d.ask("weak", _answers(0.1, 1))  # no reference: runs to the end (exact)
    assert _decisions(d.race("weak")) == ["promote", "promote", "done"]
    d.tell("weak")
    d.ask("strong", _answers(0.9, 2))  # much better than the incumbent: never stopped by the test
    assert _decisions(d.race("strong")) == ["promote", "promote", "done"]
    d.tell("strong")
    d.ask("poor", _answers(0.1, 3))  # far below the incumbent ("strong") on 40 paired items
    assert _decisions(d.race("poor")) == ["stop"]
    d.tell("poor")
    d.ask("level", _answers(0.9, 4))  # as good as the incumbent: not significantly worse
    assert d.race("level")[-1]["decision"] == "done"


def test_the_reference_set_is_the_candidates_told_before_the_ask():
    """Candidate B is asked before A is told; C after. B and C give the same answers. A finishes first (in
    the uninterrupted order or in any other), yet only C is compared with A: B's race is the one it has
    with no references at all."""
    weak = _answers(0.1, 2)
    d = Driver(_plan())
    d.ask("A", _answers(0.9, 1))
    d.ask("B", weak)
    d.race("A")
    d.tell("A")
    d.ask("C", weak)
    b, c = d.race("B"), d.race("C")
    assert _decisions(b) == ["promote", "promote", "done"]  # A was not told when B was asked
    assert _decisions(c) == ["stop"]  # C is compared with A
    # B's race is exactly the one it runs in a plan where A never existed
    alone = Driver(_plan())
    alone.ask("B", weak)
    assert [(r["decision"], r["items"]) for r in alone.race("B")] == [(r["decision"], r["items"]) for r in b]
    assert alone.result("B")["scores"] == d.result("B")["scores"]


def test_a_candidate_told_later_never_changes_an_earlier_asked_decision():
    """D is asked with 2 candidates told; 3 more strong ones are told after that ask. D's decision is the
    same as when those 3 never exist."""

    def run(extra: bool) -> list[str]:
        d = Driver(_plan())
        for i, p in enumerate((0.2, 0.3)):
            d.ask(f"r{i}", _answers(p, 10 + i))
            d.race(f"r{i}")
            d.tell(f"r{i}")
        d.ask("D", _answers(0.5, 20))
        if extra:
            for i in range(3):
                d.ask(f"x{i}", _answers(0.95, 30 + i))
                d.race(f"x{i}")
                d.tell(f"x{i}")
        return _decisions(d.race("D"))

    assert run(False) == run(True) == ["promote", "promote", "done"]


def test_multi_objective_halving_keeps_a_specialist_and_stops_a_dominated_candidate():
    d = Driver(_plan(multi=True))
    for i, (pa, pb) in enumerate(((0.9, 0.1), (0.1, 0.9), (0.6, 0.6))):
        d.ask(f"r{i}", {"a": _answers(pa, i)["a"], "b": _answers(pb, 50 + i)["b"]})
        d.race(f"r{i}")
        d.tell(f"r{i}")
    d.ask("dominated", {"a": _answers(0.05, 7)["a"], "b": _answers(0.05, 8)["b"]})
    d.ask("specialist", {"a": _answers(1.0, 9)["a"], "b": _answers(0.0, 10)["b"]})
    assert _decisions(d.race("dominated")) == ["stop"]
    assert _decisions(d.race("specialist"))[0] == "promote"


# ---------------------------------------------------------------------------------------------- replay


def _live_run(test: str = "wilcoxon") -> Driver:
    """Eight candidates, two racing at a time in ask order (as two workers with `ordered` scheduling):
    ask 2; each result is told in ask order and followed by one ask."""
    d = Driver(_plan(test=test))
    quality = [0.5, 0.6, 0.3, 0.7, 0.55, 0.2, 0.65, 0.62]
    for i in range(2):
        d.ask(f"c{i}", _answers(quality[i], i))
    nxt, running = 2, ["c0", "c1"]
    while running:
        # alternate slices between the running candidates (results arrive interleaved)
        for cid in list(running):
            d.step(cid)
            if d.items[cid] is None:
                running.remove(cid)
                d.tell(cid)
                if nxt < len(quality):
                    d.ask(f"c{nxt}", _answers(quality[nxt], nxt))
                    running.append(f"c{nxt}")
                    nxt += 1
    return d


def test_replaying_the_journal_gives_the_same_next_decisions():
    """Cut the journal before each `rung` event, rebuild a fresh plan from the head (as resume does) and score
    the same slice again: the same event and, when the race ends there, the same result."""
    live = _live_run()
    replayed, mid_race = [], 0
    for cut in [i for i, e in enumerate(live.journal) if e["event"] == "rung"]:
        head, expected = live.journal[:cut], live.journal[cut]
        cid = expected["id"]
        fresh = replay(_plan(test="wilcoxon"), head)
        # the next slice of the candidate whose rung comes next is the one the live run scored
        prior = sum(1 for e in head if e["event"] == "rung" and e["id"] == cid)
        assert fresh.first(cid) == fresh.slice(prior) and fresh.settled(cid) is None
        mid_race += prior > 0
        d = Driver(fresh)
        d.answers = live.answers
        d.items[cid] = fresh.first(cid)
        again = d.step(cid)
        assert again == expected, cut
        replayed.append(again["decision"])
        if again["decision"] != "promote":
            mine = {k: v for k, v in d.result(cid).items() if k != "seconds"}
            theirs = {k: v for k, v in live.result(cid).items() if k != "seconds"}
            assert mine == theirs, cut
    assert {"promote", "stop", "done"} <= set(replayed) and mid_race >= 4


def test_replaying_a_race_that_ended_without_its_result_does_not_score_more_items():
    """Killed between a candidate's last `rung` event (stop or done) and its `result`: the journal already
    holds everything its result is made of, so the replayed plan gives that result without a next slice."""
    live = _live_run()
    ended = [
        i for i, e in enumerate(live.journal) if e["event"] == "rung" and e["decision"] in ("stop", "done")
    ]
    assert {live.journal[i]["decision"] for i in ended} == {"stop", "done"}
    for i in ended:
        event = live.journal[i]
        fresh = replay(_plan(test="wilcoxon"), live.journal[: i + 1])
        final = fresh.settled(event["id"])
        assert final is not None
        theirs = live.result(event["id"])
        for key in ("scores", "samples", "forward_passes", "fidelity"):
            assert final[key] == theirs[key], (event["id"], key)
    # a race still going (last rung: promote) is not settled; nor is a finished one
    promoted = next(e for e in live.journal if e["event"] == "rung" and e["decision"] == "promote")
    cut = live.journal.index(promoted) + 1
    assert replay(_plan(test="wilcoxon"), live.journal[:cut]).settled(promoted["id"]) is None
    assert replay(_plan(test="wilcoxon"), live.journal).settled(promoted["id"]) is None
