"""Memory plan figures of a 7B search with 8 experts, from Llama-2-7B's shapes alone (no checkpoint on disk):
the pool (8 experts + the base) in fp32 or bf16, on the GPU or in pinned host memory, a bf16 target, lm-eval at
the configured batch and the model's context length, on a given card; what fits and what would.

    python tools/plan_7b.py [--gpu-memory 80GiB] [--host-memory 2TiB] [--gpus-per-node 8] [--batch 64] [--seq 4096]
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from evomerge.cli import _parse_size
from evomerge.runtime import memory as mp

LLAMA2_7B = {
    "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
}  # fmt: skip
EXPERTS = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--gpu-memory", default="79.2GiB", help="one GPU's memory (79.2GiB: an H100 80GB as torch reports it)"
    )
    parser.add_argument("--host-memory", default="2TiB", help="the node's RAM")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--seq",
        type=int,
        nargs="+",
        default=[LLAMA2_7B["max_position_embeddings"], 1024],
        help="tokens per request planned for (the context length is lm-eval's worst case)",
    )
    args = parser.parse_args()

    base = mp.llama_infos(LLAMA2_7B, torch.bfloat16)
    infos = {f"expert{i}": base for i in range(EXPERTS)} | {"base": base}
    params = sum(t.nbytes for t in base.values()) // 2
    mem = mp.DeviceMemory("cuda", _parse_size(args.gpu_memory), 1, _parse_size(args.host_memory),
                          args.gpus_per_node, name=f"{args.gpu_memory} GPU")  # fmt: skip
    print(f"Llama-2-7B shapes ({params / 1e9:.2f}B params), {EXPERTS} experts + base = {len(infos)} pool models, "
          f"bf16 target, lm-eval batch {args.batch}; {args.gpu_memory} per GPU, one worker per GPU, "
          f"{args.gpus_per_node} per node sharing {args.host_memory} RAM")  # fmt: skip
    for seq in args.seq:
        settings = mp.Settings(model_dtype="bfloat16", batch_size=args.batch, seq_len=seq, gpu=True)
        headroom = mp.plan_memory(infos, LLAMA2_7B, settings, base="base").headroom
        parts = ", ".join(f"{k} {v / mp.GiB:.1f}" for k, v in headroom.items())
        print(
            f"\nrequests of {seq} tokens (evaluator headroom {sum(headroom.values()) / mp.GiB:.1f} GiB: {parts})"
        )
        head = f"{'pool':22} {'GPU GiB':>8} {'host GiB':>9} {'switch (est.)':>14}  verdict"
        print(head + "\n" + "-" * len(head))
        for pool_dtype in ("float32", "bfloat16"):
            for pool_device in ("auto", "cpu"):
                s = replace(settings, pool_dtype=pool_dtype, pool_device=pool_device)
                plan = mp.plan_memory(infos, LLAMA2_7B, s, base="base")
                seconds, _ = mp.switch_seconds(plan, mem)
                fits = not mp.shortfalls(plan, mem)
                verdict = (
                    "fits"
                    if fits
                    else "does not fit; fits with: " + "; ".join(mp.fixes(infos, LLAMA2_7B, s, mem))
                )
                where = "GPU" if pool_device == "auto" else "pinned host"
                print(f"{pool_dtype + ' on ' + where:22} {plan.device_bytes / mp.GiB:8.1f} "
                      f"{plan.host_bytes / mp.GiB:9.1f} {seconds * 1000:11.0f} ms  {verdict}")  # fmt: skip
    print(f"\nswitch estimates: task arithmetic over the pool at an assumed {mp.ASSUMED_BANDWIDTH['cuda'] / 1e12:.1f} "
          f"TB/s HBM, plus the pool over PCIe at an assumed {mp.ASSUMED_PCIE / 1e9:.0f} GB/s when it is on the host")  # fmt: skip


if __name__ == "__main__":
    main()
