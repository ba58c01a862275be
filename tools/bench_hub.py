"""A merge YAML naming hub ids vs the same YAML naming directories, in one run: wall time and equality.

Builds a random Llama family (a base and three experts) under --work, puts each model in a hand-built Hugging
Face cache (`models--org--name/{refs,snapshots}`, files hard-linked) and runs `evomerge merge` (as a separate
process, `HF_HUB_OFFLINE=1`) on a TIES YAML twice: models named by directory, and by hub id (`org/name`, one of
them `@main`). Prints both times, their ratio, whether the tensors are bit-identical, and what the output's
evomerge_recipe.yaml records.

    python tools/bench_hub.py [--work /tmp/evomerge_hub] [--repeats 3] [--hidden 512] [--layers 8]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_to_cache(cache: Path, repo_id: str, model: Path) -> None:
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(model, repo / "snapshots" / COMMIT, copy_function=os.link)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)


def ties(base: str, models: list[str]) -> dict:
    return {"merge_method": "ties", "base_model": base, "dtype": "float32", "parameters": {"normalize": True},
            "models": [{"model": m, "parameters": {"weight": 0.5, "density": 0.5}} for m in models]}  # fmt: skip


def merge(config: dict, out: Path, env: dict[str, str]) -> float:
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config))
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "evomerge", "merge", str(path), str(out)], env=env, check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - t0


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/evomerge_hub"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from evomerge.zoo import make_random_family

    shutil.rmtree(args.work, ignore_errors=True)
    family = make_random_family(args.work / "models", vocab=4096, hidden=args.hidden, layers=args.layers)
    cache = args.work / "hf"
    for name, path in family.items():
        add_to_cache(cache, f"org/{name}", path)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    experts = [n for n in family if n != "base"]
    by_dir = ties(str(family["base"]), [str(family[n]) for n in experts])
    by_id = ties("org/base", [f"org/{n}" + ("@main" if i == 0 else "") for i, n in enumerate(experts)])
    times: dict[str, list[float]] = {"directories": [], "hub ids": []}
    for _ in range(args.repeats):  # interleaved, so drift in the machine's load hits both alike
        times["directories"].append(merge(by_dir, args.work / "by_dir", env))
        times["hub ids"].append(merge(by_id, args.work / "by_id", env))
    a, b = load_dir(args.work / "by_dir"), load_dir(args.work / "by_id")
    identical = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    params = sum(t.numel() for t in a.values())
    print(
        f"TIES over a base + {len(experts)} experts of {params / 1e6:.1f}M parameters (fp32), best of {args.repeats}"
    )
    for name, ts in times.items():
        print(f"  evomerge merge, models by {name:<11}: {min(ts):6.2f} s")
    print(f"  ratio hub ids / directories: {min(times['hub ids']) / min(times['directories']):.3f}")
    print(f"  tensors bit-identical: {identical}")
    recorded = yaml.safe_load((args.work / "by_id" / "evomerge_recipe.yaml").read_text())
    print(f"  recorded: base_model {recorded['base_model']}, first model {recorded['models'][0]['model']}")


if __name__ == "__main__":
    main()
