"""M2N2 on sklearn digits (ALGORITHMS.md 4.3), through evomerge's engine: Ray workers, journal, MLflow.

    python experiments/m2n2_digits/run.py --part all --seeds 3            # writes results.csv, curves.csv, *.png

Part (a), from scratch: two N(0, 0.01^2) seed models, Gaussian mutation (sigma 0.01) on every child, members
kept in the run's member store; M2N2 vs GA (alpha = 0, no matchmaker) vs M2N2 without crossover, and CMA-ES
with CSA step-size adaptation (pycma, population 20, sigma0 0.01) in two variants: isotropic (`CMA_on: 0`,
the faithful proxy of the reference's full CMA-ES, whose covariance learning rates at D = 19,210 leave C at
the identity) and separable (`CMA_diagonal`). CMA-ES runs in-process: a 19,210-dim raw weight genome is not a
merge recipe, and 50,000 of them would make a 20 GB journal.
Part (b), merging two pre-trained halves (digits 0-4 / 5-9, Adam 3e-3, 10 full-batch steps): M2N2 and its
ablations (alpha = 0, no matchmaker, no split point), mixtures with exact element split points (`chunk: 1`),
plus the brute-force best SLERP of the pair (what the no-split ablation must approach).

Metric, as the reference logs it: test accuracy of the archive member with the best raw train accuracy,
recorded against forward passes (one child evaluation on the 1,437 training images = one pass).
"""

from __future__ import annotations

import argparse
import csv
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from evomerge.config import parse_config
from evomerge.digits_mlp import NUM_PARAMS, DigitsMLP
from evomerge.evaluate.base import unpack_samples
from evomerge.evaluate.digits import (
    DigitsSpec,
    flatten_params,
    load_flat_params,
    save_digits_checkpoint,
    train_digits_mlp,
)
from evomerge.journal import read_journal
from evomerge.runtime.run import create_run_dir, execute
from evomerge.space.model import ModelSpace
from evomerge.strategies.base import Result
from evomerge.strategies.m2n2 import M2N2

HERE = Path(__file__).resolve().parent
BATCH = 16  # workers.batch
SCRATCH = {  # part (a): name -> m2n2 options
    "m2n2": {"mutation_std": 0.01},
    "ga": {"mutation_std": 0.01, "alpha": 0.0, "matchmaker": False},
    "m2n2_no_crossover": {"mutation_std": 0.01, "crossover": False},
}
PRETRAINED = {  # part (b)
    "m2n2": {},
    "no_competition": {"alpha": 0.0},
    "no_matchmaker": {"matchmaker": False},
    "no_split": {"split_point": False},
}


def seed_models(root: Path, part: str, seed: int) -> list[str]:
    if part == "pretrained":
        low = save_digits_checkpoint(train_digits_mlp({0, 1, 2, 3, 4}, seed=seed), root / f"low{seed}")
        high = save_digits_checkpoint(
            train_digits_mlp({5, 6, 7, 8, 9}, seed=seed + 1000), root / f"high{seed}"
        )
        return [str(low), str(high)]
    gen = torch.Generator().manual_seed(seed)
    return [
        str(save_digits_checkpoint(torch.randn(NUM_PARAMS, generator=gen) * 0.01, root / f"init{seed}_{i}"))
        for i in range(2)
    ]


def run_m2n2(root: Path, part: str, name: str, options: dict, seed: int, budget: int) -> Path:
    sources = seed_models(root / "models", part, seed)
    run_dir = root / "runs" / f"{part}-{name}-s{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = parse_config({
        "name": f"m2n2-digits-{part}-{name}-s{seed}",
        "models": {"base": sources[0], "sources": sources},
        "space": {"type": "model", "chunk": 1},
        "strategy": {"name": "m2n2", "options": {"pop_size": 20, **options}},
        "evaluator": {"type": "digits", "report_test": True},
        "budget": {"forward_passes": budget},
        "workers": {"count": 2, "batch": BATCH},  # ~3 ms evaluations: many per worker call
        "tracking": {"enabled": True, "children": "front", "experiment": "m2n2-digits"},
        "seed": seed,
    }, "m2n2_digits")  # fmt: skip
    create_run_dir(config, None, run_dir)
    execute(run_dir, config)
    return run_dir


def archive_curve(run_dir: Path, every: int) -> list[tuple[int, float, float]]:
    """(forward passes, train acc, test acc) of the archive member with the best raw train accuracy, replaying
    the journal's tells through a fresh strategy (the archive is not in the journal, its rule is)."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    events = read_journal(run_dir / "journal.jsonl")
    space = ModelSpace(cfg["models"]["base"], cfg["models"]["sources"], chunk=1)
    opts = dict(cfg["strategy"]["options"])
    strategy = M2N2(space, seed=cfg["seed"], store_dir=str(run_dir / "replay-store-unused"), **opts)
    results, curve, passes, next_mark = {}, [], 0, 0
    for ev in events:
        if ev["event"] == "ask":
            strategy.ask(ev["n"])
        elif ev["event"] == "result":
            results[ev["id"]] = ev
        elif ev["event"] == "tell":
            told = []
            for cid in ev["ids"]:
                r = results[cid]
                passes += int(r.get("forward_passes", 0))
                ok = r["status"] == "ok"
                row = np.concatenate([unpack_samples(v) for v in r["samples"].values()]) if ok else None
                told.append(
                    Result(cid, np.array(r["objectives"]) if ok else None, failed=not ok, samples=row)
                )
            strategy.tell(told)
            if passes >= next_mark:
                best = max(strategy.archive(), key=lambda c: (results[c]["scores"]["digits"], c))
                curve.append(
                    (passes, results[best]["scores"]["digits"], results[best]["scores"]["digits_test"])
                )
                next_mark = passes + every
    shutil.rmtree(run_dir / "replay-store-unused", ignore_errors=True)
    return curve


CMA_VARIANTS = {  # pycma options on top of CSA, population 20, sigma0 0.01
    "cma_es_iso": {"CMA_diagonal": True, "CMA_on": 0},  # C stays the identity: the full CMA-ES proxy
    "cma_es_sep": {"CMA_diagonal": True},  # separable: a diagonal C, learning rate (D + 2) / 3 times full's
}


def run_cma(seed: int, budget: int, every: int, variant: str) -> list[tuple[int, float, float]]:
    """CMA-ES with CSA step-size adaptation (pycma) in one of CMA_VARIANTS, fitness -train acc; reported: the
    best point ever evaluated (as the reference's CMA-ES baseline)."""
    import cma

    torch.set_num_threads(1)
    train, test = DigitsSpec("train").build(), DigitsSpec("test").build()
    model = DigitsMLP()
    es = cma.CMAEvolutionStrategy(np.zeros(NUM_PARAMS), 0.01, {
        "popsize": 20, "seed": seed + 1, "AdaptSigma": cma.sigma_adaptation.CMAAdaptSigmaCSA,
        "verbose": -9, "maxfevals": budget, **CMA_VARIANTS[variant]})  # fmt: skip
    best, best_x, curve, passes, next_mark = -1.0, None, [], 0, 0
    while passes < budget:
        xs = es.ask()
        accs = [
            train.evaluate(load_flat_params(model, torch.tensor(x, dtype=torch.float32))).scores["digits"]
            for x in xs
        ]
        es.tell(xs, [-a for a in accs])
        passes += len(xs)
        i = int(np.argmax(accs))
        if accs[i] > best:
            best, best_x = accs[i], xs[i]
        if passes >= next_mark:
            test_acc = test.evaluate(
                load_flat_params(model, torch.tensor(best_x, dtype=torch.float32))
            ).scores["digits"]
            curve.append((passes, best, test_acc))
            next_mark = passes + every
    return curve


def best_slerp(root: Path, seed: int) -> tuple[float, float, float]:
    """Brute force over w of SLERP(low, high, w) (one global angle): (w, train acc, test acc) of the best."""
    from evomerge.merge.members import slerp_scales
    from evomerge.merge.target import load_target

    a, b = seed_models(root / "models", "pretrained", seed)
    va, vb = (flatten_params(load_target(p)[0]) for p in (a, b))
    cos = float(va.double() @ vb.double() / (va.double().norm() * vb.double().norm()))
    train, test, model = DigitsSpec("train").build(), DigitsSpec("test").build(), DigitsMLP()
    best = (0.0, -1.0, 0.0)
    for w in np.linspace(0, 1, 1001):
        sa, sb = slerp_scales(float(w), cos)
        load_flat_params(model, sa * va + sb * vb)
        acc = train.evaluate(model).scores["digits"]
        if acc > best[1]:
            best = (float(w), acc, test.evaluate(model).scores["digits"])
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["scratch", "pretrained", "all"], default="all")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=42)
    ap.add_argument("--scratch-budget", type=int, default=50_000)  # the paper's
    ap.add_argument("--pretrained-budget", type=int, default=10_000)
    ap.add_argument("--methods", nargs="*", help="only these (default: all of the part)")
    ap.add_argument("--root", type=Path, default=Path("/tmp/m2n2_digits"))
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    curves_file = args.out / "curves.csv"
    new = not curves_file.exists()
    with curves_file.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["part", "method", "seed", "forward_passes", "train_acc", "test_acc"])
        parts = ["pretrained", "scratch"] if args.part == "all" else [args.part]
        for seed in range(args.first_seed, args.first_seed + args.seeds):  # seed outermost: whole seeds
            for part in parts:
                wanted = set(args.methods or [*PRETRAINED, *SCRATCH, *CMA_VARIANTS, "slerp_grid"])
                if part == "pretrained" and "slerp_grid" in wanted:
                    wb, tr, te = best_slerp(args.root, seed)
                    w.writerow([part, "slerp_grid", seed, 0, tr, te])
                    print(
                        f"{part} slerp_grid seed {seed}: w {wb:.3f} train {tr:.4f} test {te:.4f}", flush=True
                    )
                variants = PRETRAINED if part == "pretrained" else SCRATCH
                budget = args.pretrained_budget if part == "pretrained" else args.scratch_budget
                every = max(budget // 100, 20)
                for name, options in variants.items():
                    if name not in wanted:
                        continue
                    t = time.time()
                    run_dir = run_m2n2(args.root, part, name, options, seed, budget)
                    seconds = time.time() - t
                    curve = archive_curve(run_dir, every)
                    shutil.rmtree(
                        run_dir / "members", ignore_errors=True
                    )  # tens of MB per run; the journal stays
                    for row in curve:
                        w.writerow([part, name, seed, *row])
                    f.flush()
                    print(f"{part} {name} seed {seed}: {curve[-1]}, search {seconds:.0f} s", flush=True)
                for variant in CMA_VARIANTS if part == "scratch" else []:
                    if variant not in wanted:
                        continue
                    t = time.time()
                    curve = run_cma(seed, budget, every, variant)
                    for row in curve:
                        w.writerow([part, variant, seed, *row])
                    f.flush()
                    print(f"{part} {variant} seed {seed}: {curve[-1]} in {time.time() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()
