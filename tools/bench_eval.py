"""Evaluator overhead: LMEvalEvaluator.evaluate vs a plain batched greedy-decoding loop (the floor) over
the same prompts, on the zoo mix, in one run, one torch thread (a search worker's setting).

    python tools/bench_eval.py [--zoo zoo] [--tasks zoo_search] [--repeats 5] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=Path("zoo"))
    parser.add_argument("--tasks", default="zoo_search")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import os

    os.environ.setdefault("TQDM_DISABLE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluate.lmeval import LMEvalSpec
    from evomerge.zoo import build_zoo, greedy_exact_match, open_zoo

    paths = open_zoo(args.zoo) or build_zoo(args.zoo)
    model = AutoModelForCausalLM.from_pretrained(paths["expert_up"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(paths["base"])
    start = time.perf_counter()
    evaluator = LMEvalSpec(tasks=(args.tasks,), batch_size=args.batch_size).build()
    build = time.perf_counter() - start
    docs = [(doc["prompt"], doc["answer"]) for run in evaluator.runs for _, doc in run.docs]
    prompts, answers = [p for p, _ in docs], [a for _, a in docs]

    def floor() -> float:
        return float(greedy_exact_match(model, tok, prompts, answers, batch_size=args.batch_size).mean())

    def ours() -> float:
        r = evaluator.evaluate(model, tok)
        return float(sum(r.samples[t].sum() for t in r.samples) / len(prompts))

    assert abs(floor() - ours()) < 1e-12, "the evaluator and the floor disagree"
    timings = {"floor": [], "evaluator": []}
    for _ in range(args.repeats):
        for name, fn in (("floor", floor), ("evaluator", ours)):
            t = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - t)
    f, e = min(timings["floor"]), min(timings["evaluator"])
    print(
        f"{len(prompts)} prompts ({args.tasks}), batch {args.batch_size}, 1 torch thread; build once: {build:.2f} s"
    )
    print(f"floor (batched greedy decoding): {f * 1000:.0f} ms   evaluator: {e * 1000:.0f} ms   "
          f"overhead {(e - f) * 1000:.0f} ms per candidate   ratio {e / f:.2f}x")  # fmt: skip
    print(json.dumps({"prompts": len(prompts), "floor_s": f, "evaluator_s": e, "ratio": e / f}))


if __name__ == "__main__":
    main()
