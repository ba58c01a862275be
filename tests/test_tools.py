"""Every script in tools/ runs end to end at a tiny size, as its own process, so a benchmark cannot rot unnoticed
(two once crashed before measuring anything). The figures themselves are in docs/benchmarks.md."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _run(script: str, *args: str, expect: int = 0, timeout: float = 300) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([sys.executable, str(TOOLS / script), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)  # fmt: skip
    assert done.returncode == expect, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def test_every_tool_has_a_smoke_test():
    here = Path(__file__).read_text()
    assert all(f'"{p.name}"' in here for p in TOOLS.glob("*.py")), "a tool without a smoke test below"


def test_bench_engine(tmp_path):
    out = _run("bench_engine.py", "--skip-switch", "--candidates", "4", "--strategies", "random",
               "--max-workers", "2", "--sleep", "0.01", "--batch-candidates", "24", "--work", str(tmp_path))  # fmt: skip
    assert (
        "driver overhead per candidate" in out and "worker-pool scaling" in out and "batched dispatch" in out
    )


def test_bench_tracking():
    out = _run("bench_tracking.py", "--candidates", "12", "--tracked", "4")
    assert '"tracking"' in out and "drain" in out


def test_bench_eval(quick_zoo):
    out = _run(
        "bench_eval.py", "--zoo", str(quick_zoo["base"].parent), "--tasks", "zoo_rev", "--repeats", "1"
    )
    assert "zoo_rev" in out or "lm-eval" in out


def test_bench_merge(tmp_path):
    out = _run("bench_merge.py", "--tiny", "--methods", "ties", "della", "--work", str(tmp_path))
    assert "evomerge" in out and "mergekit" in out and "random" in out
    assert "bf16_95m" in out and "fp32_111m" in out
    assert "read every shard once: cold" in out and "merge / floor" in out  # the streamed row and its floor


def test_bench_stream(tmp_path):
    out = _run(
        "bench_stream.py", "--gib", "0.005", "--hidden", "64", "--vocab", "256", "--work", str(tmp_path)
    )
    assert "peak" in out.lower()


def test_bench_hub(tmp_path):
    out = _run("bench_hub.py", "--repeats", "1", "--hidden", "32", "--layers", "2", "--work", str(tmp_path))
    assert "tensors bit-identical: True" in out


def test_plan_7b():
    out = _run("plan_7b.py")
    assert "fits" in out and "Llama-2-7B shapes" in out


@pytest.mark.skipif(bool(os.environ.get("CUDA_VISIBLE_DEVICES")), reason="on a GPU machine it would measure")
def test_bench_gpu_without_cuda_says_so():
    """bench_gpu.py measures on CUDA only; here it must say so, not crash."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: run tools/bench_gpu.py itself")
    out = _run("bench_gpu.py", expect=2)
    assert "no CUDA device here" in out
