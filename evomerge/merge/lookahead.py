"""The next output tensor computed on a second thread while the current one is merged or written.

A streamed merge alternates reading its inputs, doing the method's arithmetic and writing the result; on one
thread the two cores take turns. Torch's kernels and the positional reads release the GIL, so computing job i+1
beside job i keeps both busy. Memory stays bounded: a job runs ahead only when its cost and the current job's
together fit within the largest single job's cost, so the peak is never above what the largest job alone needs.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Lookahead(Generic[K, V]):
    """`get(keys[i])` returns `compute(keys[i])`; asked for in order, it starts `compute(keys[i + 1])` on a
    background thread when `cost(keys[i]) + cost(keys[i + 1])` fits the budget (default: the largest cost)."""

    def __init__(self, keys: Sequence[K], compute: Callable[[K], V], cost: Callable[[K], int],
                 budget: int | None = None) -> None:  # fmt: skip
        self.keys = list(keys)
        self.position = {k: i for i, k in enumerate(self.keys)}
        self.compute = compute
        self.costs = [cost(k) for k in self.keys]
        self.budget = max(self.costs, default=0) if budget is None else budget
        self.ahead: dict[K, Future[V]] = {}
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evomerge-lookahead")

    def get(self, key: K) -> V:
        i = self.position[key]
        running = self.ahead.pop(key, None)
        nxt = i + 1
        if (
            nxt < len(self.keys)
            and self.keys[nxt] not in self.ahead
            and self.costs[i] + self.costs[nxt] <= self.budget
        ):
            self.ahead[self.keys[nxt]] = self.pool.submit(self.compute, self.keys[nxt])
        return running.result() if running is not None else self.compute(key)

    def close(self) -> None:
        """Drop what runs ahead (an error, or the caller stopped early) and wait for the thread to finish."""
        for future in self.ahead.values():
            future.cancel()
        self.pool.shutdown(wait=True)
        self.ahead.clear()

    def __enter__(self) -> Lookahead[K, V]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
