"""The memory plan: what each search worker will hold, from the safetensors headers alone, checked against the
memory its device has before any model is loaded (a 7B search that cannot fit should stop in a second with the
settings that would fit, not after minutes of loading with a CUDA out-of-memory error).

Per worker, in bytes (`plan_memory`):

- pool: the resident sources as `ResidentPool` lays them out. Every floating tensor that all K pool models
  (the sources and the base) have with one shape is stacked: K x numel x itemsize(`pool_dtype`); any other
  tensor is kept per model in its stored dtype. With `workers.pool_device: cpu` the pool lives in (pinned)
  host memory and the GPU holds one streamed stack at a time (`stream`: the largest one).
- target: the base's parameters in `model_dtype` (non-floating tensors at their stored size).
- stacking: layer-stacking targets (data-flow space): a worker keeps up to `STACKED_CACHE` targets of other
  depths, planned as the deepest ones the space can decode (every slot a hop), in `model_dtype`.
- evaluator headroom at batch B and sequence length S (the evaluator's `max_length` when it has one, else the
  model's context length: the longest request lm-eval builds), T = B x S tokens, in `model_dtype`:
    KV cache     2 x layers x T x kv_heads x head_dim         (a forward with use_cache keeps one)
    logits       2 x T x vocab                                (the logits and lm-eval's log_softmax of them)
    activations  T x (2 hidden + (heads + 2 kv_heads) head_dim + 3 intermediate)
                 (one decoder layer's working set under no_grad: residual, normed input, q/k/v, the MLP's
                 gate, up and product; SDPA attention never materializes S x S)
  This is a worst case: most tasks' requests are far shorter than the context length; `evaluator.max_length`
  bounds it (lm-eval then left-truncates longer requests, so the plan holds). The digits MLP's is negligible (0).
- merge working set: a non-linear method (TIES, DARE, SLERP, ...: any space but task_vector and model) merges
  each tensor from its K inputs gathered in fp32, plus the result: (K + 1) x numel x 4 of the largest tensor.
- CUDA context: `CUDA_CONTEXT` per GPU worker (CUDA runtime, cuBLAS workspace).

Assumptions: the run's workers have their devices to themselves (the plan compares with total memory, not
what is free now); a worker uses one GPU (`device: cuda` is the first visible one, even with `num_gpus` > 1),
shared by floor(1 / num_gpus) workers; CPU workers share the node's RAM. Loading transients (one tensor at a
time on the device; the fp32 base on the host while the target loads) are not counted.

The estimated candidate switch (task arithmetic over the pool): every pool byte read and every target byte
written once at the device's memory bandwidth, plus, with `pool_device: cpu`, every pool byte over PCIe
(copies and the merge run in order on one stream, so the times add). Measured bandwidths when a probe ran,
else the assumed figures below: an estimate, not a measurement (tools/bench_gpu.py measures it).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from evomerge.checkpoints import TensorInfo
from evomerge.errors import ConfigError

log = logging.getLogger(__name__)

GiB = 1024**3
CUDA_CONTEXT = GiB // 2  # per GPU worker process
LINEAR_SPACES = (
    "task_vector",
    "model",
)  # their candidates: one matrix-vector product per tensor, no working set
DEFAULT_CONTEXT = 2048  # lm-eval's max_length when a config names none
ASSUMED_BANDWIDTH = {"cuda": 2.0e12, "cpu": 1.0e10}  # bytes read + written per second, when not measured
ASSUMED_PCIE = 2.5e10  # pinned host -> device, PCIe 4.0 x16 in practice
PROBE_TIMEOUT = 60.0  # seconds a memory probe may wait for a GPU node before the check is skipped
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------- from headers


def _nbytes(info: TensorInfo, dtype: torch.dtype | None = None) -> int:
    """Bytes of a tensor stored as `dtype` (floating tensors only; others keep their stored dtype)."""
    as_dtype = dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
    return math.prod(info.shape) * as_dtype.itemsize


def pool_bytes(infos: Mapping[str, Mapping[str, TensorInfo]], dtype: torch.dtype) -> tuple[int, int]:
    """(bytes of the resident pool, bytes of its largest stack) for the pool models' tensors in pool order,
    laid out as `ResidentPool` does (the stacking rule is the same)."""
    models = list(infos.values())
    first = models[0]
    stacked = {
        n for n, i in first.items()
        if i.dtype.is_floating_point and all(n in m and m[n].shape == i.shape for m in models)
    }  # fmt: skip
    stacks = [len(models) * _nbytes(first[n], dtype) for n in stacked]
    loose = sum(_nbytes(i) for m in models for n, i in m.items() if n not in stacked)
    return sum(stacks) + loose, max(stacks, default=0)


def target_bytes(base: Mapping[str, TensorInfo], dtype: torch.dtype) -> int:
    return sum(_nbytes(i, dtype) for i in base.values())


def stacking_bytes(base: Mapping[str, TensorInfo], dtype: torch.dtype, max_depth: int | None,
                   cache: int | None = None) -> int:  # fmt: skip
    """The layer-stacking targets a worker may keep: the `cache` deepest depths up to `max_depth` other than
    the base's own (that one is the resident target)."""
    from evomerge.merge.engine import LAYER

    if not max_depth:
        return 0
    if cache is None:
        from evomerge.runtime.worker import STACKED_CACHE as cache
    layers = {int(m["idx"]) for n in base if (m := LAYER.match(n))}
    if not layers:
        return 0
    inside = sum(_nbytes(i, dtype) for n, i in base.items() if LAYER.match(n))
    outside = target_bytes(base, dtype) - inside
    depth = max(layers) + 1
    per_layer = inside / depth
    depths = [d for d in range(max_depth, 0, -1) if d != depth][:cache]
    return int(sum(outside + d * per_layer for d in depths))


def _first(cfg: Mapping[str, Any], *keys: str) -> int | None:
    return next((int(cfg[k]) for k in keys if cfg.get(k)), None)


def _text(cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    return cfg.get("text_config") or cfg  # composite configs nest the language model


def context_length(cfg: Mapping[str, Any]) -> int:
    """The longest request lm-eval builds for this model (its own resolution order, then its default)."""
    return _first(_text(cfg), "n_positions", "max_position_embeddings", "n_ctx") or DEFAULT_CONTEXT


def evaluator_headroom(cfg: Mapping[str, Any], batch: int, seq: int, dtype: torch.dtype) -> dict[str, int]:
    """KV cache, logits and activations of one batch (module docstring); {} for a model that is not a
    transformer LM (the digits MLP)."""
    c = _text(cfg)
    hidden = _first(c, "hidden_size", "n_embd", "d_model")
    if not hidden:
        return {}
    layers = _first(c, "num_hidden_layers", "n_layer", "num_layers") or 1
    heads = _first(c, "num_attention_heads", "n_head") or 1
    kv = _first(c, "num_key_value_heads") or heads
    head_dim = _first(c, "head_dim") or hidden // heads
    inter = _first(c, "intermediate_size", "n_inner", "ffn_dim") or 4 * hidden
    vocab = _first(c, "vocab_size") or 0
    tokens, size = batch * seq, dtype.itemsize
    return {
        "kv cache": 2 * layers * tokens * kv * head_dim * size,
        "logits": 2 * tokens * vocab * size,
        "activations": tokens * (2 * hidden + (heads + 2 * kv) * head_dim + 3 * inter) * size,
    }


def llama_infos(cfg: Mapping[str, Any], dtype: torch.dtype = torch.bfloat16) -> dict[str, TensorInfo]:
    """The tensors of a Llama-shaped checkpoint with this config, as its safetensors headers would list them:
    plans for a model that is not on disk (tools/plan_7b.py)."""
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    kv_dim = cfg.get("num_key_value_heads", heads) * cfg.get("head_dim", h // heads)
    shapes = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv_dim, h),
            p + "self_attn.v_proj.weight": (kv_dim, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })  # fmt: skip
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (vocab, h)})
    return {
        n: TensorInfo(s, dtype, "model.safetensors", nbytes=math.prod(s) * dtype.itemsize)
        for n, s in shapes.items()
    }


# ---------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Settings:
    """The run settings a plan depends on (the ones a refusal suggests changing)."""

    pool_dtype: str = "float32"
    model_dtype: str = "float32"
    pool_device: str = "auto"
    batch_size: int = 64
    seq_len: int = DEFAULT_CONTEXT
    max_depth: int | None = None  # deepest layer-stacking target (data-flow space); None: no stacking
    gpu: bool = False  # GPU workers (else the device is the host)
    evaluator: str = "lmeval"
    linear: bool = True  # candidates are linear combinations of the pool (task_vector, model spaces)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes one worker holds (module docstring)."""

    settings: Settings
    pool: int
    target: int
    stacking: int
    headroom: dict[str, int] = field(default_factory=dict)
    stream: int = 0  # on the GPU: one streamed stack (pool_device: cpu)
    context: int = 0  # CUDA context
    merge: int = 0  # a non-linear method's fp32 working set for the largest tensor

    @property
    def pool_on_host(self) -> bool:
        return self.settings.gpu and self.settings.pool_device == "cpu"

    @property
    def device_bytes(self) -> int:
        """What the worker's device holds (the host's RAM for CPU workers)."""
        pool = 0 if self.pool_on_host else self.pool
        held = self.target + self.stacking + sum(self.headroom.values()) + self.stream + self.context
        return pool + held + self.merge

    @property
    def host_bytes(self) -> int:
        """Pinned host memory of a GPU worker's pool (pool_device: cpu); 0 otherwise."""
        return self.pool if self.pool_on_host else 0


def plan_memory(infos: Mapping[str, Mapping[str, TensorInfo]], model_config: Mapping[str, Any],
                settings: Settings, base: str | None = None) -> MemoryPlan:  # fmt: skip
    """The plan of one worker from the pool models' tensor infos (pool order, `base` among them; default:
    the last, as workers order the pool) and the base's config."""
    s = settings
    pool, largest = pool_bytes(infos, DTYPES[s.pool_dtype])
    base_infos = infos[base if base is not None else list(infos)[-1]]
    model_dtype = DTYPES[s.model_dtype]
    headroom = (
        evaluator_headroom(model_config, s.batch_size, s.seq_len, model_dtype)
        if s.evaluator == "lmeval"
        else {}
    )
    k = len(infos)  # a non-linear method merges from its K inputs in fp32, plus the result
    work = 0 if s.linear else largest // DTYPES[s.pool_dtype].itemsize * 4 * (k + 1) // k
    return MemoryPlan(
        s, pool, target_bytes(base_infos, model_dtype), stacking_bytes(base_infos, model_dtype, s.max_depth),
        headroom, stream=largest if s.gpu and s.pool_device == "cpu" else 0, context=CUDA_CONTEXT if s.gpu else 0,
        merge=work,
    )  # fmt: skip


@dataclass(frozen=True)
class DeviceMemory:
    """The memory a worker can use: one device of `device_total` bytes (a GPU; the node's RAM for CPU
    workers) shared by `workers_per_device` workers; `host_total` is the node's RAM (where a GPU worker's
    `pool_device: cpu` pool lives), shared by `workers_per_node`. None: unknown."""

    kind: str  # cuda | cpu
    device_total: int | None
    workers_per_device: int = 1
    host_total: int | None = None
    workers_per_node: int | None = None
    name: str = ""
    source: str = ""  # where the figures come from
    bandwidth: float | None = None  # measured device copy bandwidth, bytes read + written per second
    pcie: float | None = None  # measured pinned host -> device bandwidth

    @property
    def per_worker(self) -> int | None:
        return None if self.device_total is None else self.device_total // self.workers_per_device

    @property
    def host_per_worker(self) -> int | None:
        if self.host_total is None or not self.workers_per_node:
            return None
        return self.host_total // self.workers_per_node


def fmt_bytes(n: float) -> str:
    """GiB, or MiB / KiB for small models (the zoo)."""
    for unit, scale in (("GiB", GiB), ("MiB", 1024**2)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1024:.1f} KiB"


def shortfalls(plan: MemoryPlan, mem: DeviceMemory) -> list[str]:
    """What does not fit, one phrase each; [] when the plan fits (or the memory is unknown)."""
    out = []
    where = "GPU memory" if plan.settings.gpu else "host memory"
    if mem.per_worker is not None and plan.device_bytes > mem.per_worker:
        n = mem.workers_per_device
        share = f"{n} worker{'s' if n > 1 else ''} per {'GPU' if plan.settings.gpu else 'node'}"
        out.append(
            f"each worker needs {fmt_bytes(plan.device_bytes)} of {where} ({breakdown(plan)}) but has "
            f"{fmt_bytes(mem.per_worker)} ({mem.name or mem.kind}, {share})"
        )
    if plan.host_bytes and mem.host_per_worker is not None and plan.host_bytes > mem.host_per_worker:
        out.append(
            f"the pinned host pool needs {fmt_bytes(plan.host_bytes)} per worker but the node's RAM gives "
            f"{fmt_bytes(mem.host_per_worker)} ({mem.workers_per_node} workers per node)"
        )
    return out


def breakdown(plan: MemoryPlan) -> str:
    s = plan.settings
    parts = [] if plan.pool_on_host else [f"pool {fmt_bytes(plan.pool)}"]
    parts.append(f"target {fmt_bytes(plan.target)}")
    if plan.stacking:
        parts.append(f"stacking targets {fmt_bytes(plan.stacking)}")
    if plan.headroom:
        parts.append(
            f"evaluator {fmt_bytes(sum(plan.headroom.values()))} at batch {s.batch_size} x {s.seq_len} tokens"
        )
    if plan.stream:
        parts.append(f"stream buffer {fmt_bytes(plan.stream)}")
    if plan.merge:
        parts.append(f"merge working set {fmt_bytes(plan.merge)}")
    if plan.context:
        parts.append(f"CUDA context {fmt_bytes(plan.context)}")
    return " + ".join(parts)


def _fits(plan: MemoryPlan, mem: DeviceMemory) -> bool:
    return not shortfalls(plan, mem)


def _fewer(mem: DeviceMemory, n: int) -> DeviceMemory:
    """The same node with n workers per device (and proportionally fewer per node)."""
    per_node = mem.workers_per_node and max(1, mem.workers_per_node * n // mem.workers_per_device)
    return replace(mem, workers_per_device=n, workers_per_node=per_node)


def _largest(infos: Any, cfg: Mapping[str, Any], s: Settings, mem: DeviceMemory, setting: str) -> int | None:
    """The largest value below the configured one of `setting` (batch_size or seq_len) that fits (None: not
    even 1)."""
    lo, hi = 0, getattr(s, setting) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _fits(plan_memory(infos, cfg, replace(s, **{setting: mid})), mem):
            lo = mid
        else:
            hi = mid - 1
    return lo or None


def fixes(infos: Any, cfg: Mapping[str, Any], s: Settings, mem: DeviceMemory) -> list[str]:
    """Settings that would fit, each changed alone, with what the worker then holds; when none does, the
    first combination that does, or what even the smallest setting needs."""

    def fit(settings: Settings, m: DeviceMemory = mem) -> bool:
        return _fits(plan_memory(infos, cfg, settings), m)

    def need(settings: Settings) -> str:
        p = plan_memory(infos, cfg, settings)
        host = f", {fmt_bytes(p.host_bytes)} pinned host" if p.host_bytes else ""
        return f"{fmt_bytes(p.device_bytes)}{host}"

    out = []
    if s.pool_dtype == "float32" and fit(bf16 := replace(s, pool_dtype="bfloat16")):
        out.append(f"workers.pool_dtype: bfloat16 ({need(bf16)})")
    if s.gpu and s.pool_device != "cpu" and fit(host := replace(s, pool_device="cpu")):
        out.append(f"workers.pool_device: cpu ({need(host)})")
    for n in range(mem.workers_per_device - 1, 0, -1):
        if fit(s, _fewer(mem, n)):
            what = f"workers.num_gpus: {1 / n:.3g} ({n} per GPU)" if s.gpu else f"workers.count: {n} per node"
            out.append(f"{what} ({need(s)})")
            break
    lm = s.evaluator == "lmeval"
    if lm and (batch := _largest(infos, cfg, s, mem, "batch_size")):
        out.append(f"evaluator.batch_size: {batch} ({need(replace(s, batch_size=batch))})")
    if lm and (length := _largest(infos, cfg, s, mem, "seq_len")):
        out.append(f"evaluator.max_length: {length} ({need(replace(s, seq_len=length))})")
    if out:
        return out
    least = replace(s, pool_dtype="bfloat16", pool_device="cpu" if s.gpu else s.pool_device)
    if (
        lm and s.seq_len > DEFAULT_CONTEXT
    ):  # a long context is the usual culprit: requests of lm-eval's default
        least = replace(least, seq_len=DEFAULT_CONTEXT)
    alone = _fewer(mem, 1)
    batch = (
        _largest(infos, cfg, replace(least, batch_size=s.batch_size + 1), alone, "batch_size") if lm else None
    )
    if batch or (not lm and fit(least, alone)):
        combo = [] if s.pool_dtype == "bfloat16" else ["workers.pool_dtype: bfloat16"]
        combo += ["workers.pool_device: cpu"] if s.gpu and s.pool_device != "cpu" else []
        combo += (
            [] if mem.workers_per_device == 1 else ["workers.num_gpus: 1" if s.gpu else "one worker per node"]
        )
        combo += [f"evaluator.max_length: {least.seq_len}"] if least.seq_len != s.seq_len else []
        combo += [f"evaluator.batch_size: {batch}"] if batch else []
        return [" + ".join(combo) + f" ({need(replace(least, batch_size=batch or s.batch_size))})"]
    floor = plan_memory(infos, cfg, replace(least, batch_size=1))
    return [f"none (a bf16 pool at batch 1 x {least.seq_len} tokens still needs {fmt_bytes(floor.device_bytes)}): "
            "use fewer sources, a shorter evaluator.max_length or a larger device"]  # fmt: skip


def refusal(plan: MemoryPlan, mem: DeviceMemory, infos: Any, cfg: Mapping[str, Any]) -> str | None:
    """The one-line refusal when the plan does not fit (None when it fits or the memory is unknown)."""
    problems = shortfalls(plan, mem)
    if not problems:
        return None
    return f"memory plan: {'; '.join(problems)}. Settings that fit: {'; '.join(fixes(infos, cfg, plan.settings, mem))}"


def switch_seconds(plan: MemoryPlan, mem: DeviceMemory) -> tuple[float, str]:
    """Estimated task-arithmetic candidate switch (module docstring) and how it was estimated."""
    bandwidth = mem.bandwidth or ASSUMED_BANDWIDTH["cuda" if plan.settings.gpu else "cpu"]
    seconds = (plan.pool + plan.target) / bandwidth
    how = f"{'measured' if mem.bandwidth else 'assumed'} {bandwidth / 1e9:.0f} GB/s memory bandwidth"
    if plan.pool_on_host:
        pcie = mem.pcie or ASSUMED_PCIE
        seconds += plan.pool / pcie
        how += f" + pool over PCIe at {'measured' if mem.pcie else 'assumed'} {pcie / 1e9:.0f} GB/s"
    return seconds, how


# ---------------------------------------------------------------------------------------- a run config


def pool_infos(base: str, sources: list[str]) -> dict[str, dict[str, TensorInfo]]:
    """Tensor infos of the pool models in the order workers hold them ([sources..., base]), headers only."""
    from evomerge.checkpoints import open_source

    return {r: dict(open_source(r, base=base).tensors) for r in dict.fromkeys([*sources, base])}


def run_settings(config: Any, model_config: Mapping[str, Any], space: Any = None) -> Settings | None:
    """The plan's settings for a run config (None: a function evaluator holds no model)."""
    ev, w = config.evaluator, config.workers
    if ev.type == "function":
        return None
    seq = ev.max_length or context_length(model_config)
    gpu = gpu_workers(config)
    linear = config.space.type in LINEAR_SPACES
    return Settings(w.pool_dtype, w.model_dtype, w.pool_device, ev.batch_size, seq,
                    getattr(space, "n_slots", None), gpu, ev.type, linear)  # fmt: skip


def host_memory() -> int:
    """This machine's RAM in bytes."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def gpu_workers(config: Any) -> bool:
    """Whether the run's workers hold their models on a GPU (they reserve one and the device is not the CPU)."""
    return config.workers.num_gpus > 0 and not config.device.startswith("cpu")


def workers_per_gpu(config: Any) -> int:
    """Workers that share one GPU: floor(1 / num_gpus) for a fraction (at most the worker count), else 1."""
    g = config.workers.num_gpus
    return max(1, min(config.workers.count, math.floor(1 / g + 1e-9))) if 0 < g < 1 else 1


def local_memory(config: Any) -> DeviceMemory:
    """CPU workers on this machine: a local Ray puts every worker here (run.init_ray sizes it so)."""
    ram, n = host_memory(), config.workers.count
    return DeviceMemory("cpu", ram, n, ram, n, name="host RAM", source="this machine")


def gpu_memory(config: Any, total: int, name: str = "") -> DeviceMemory:
    """GPU workers on a card of `total` bytes (`evomerge plan --gpu-memory`); the node's RAM is unknown."""
    return DeviceMemory("cuda", total, workers_per_gpu(config), name=name or f"a {fmt_bytes(total)} GPU",
                        source="given")  # fmt: skip


def _timed(fn: Any, sync: Any) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def copy_bandwidth(device: str, mib: int = 256) -> float:
    """Bytes read + written per second by a device-local copy."""
    a = torch.empty(mib * 1024**2, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    sync = torch.cuda.synchronize if a.is_cuda else (lambda: None)
    return 2 * a.numel() / _timed(lambda: b.copy_(a), sync)


def pcie_bandwidth(mib: int = 256) -> float:
    """Bytes per second of a pinned host -> GPU copy (the streamed pool's floor)."""
    a = torch.empty(mib * 1024**2, dtype=torch.uint8, pin_memory=True)
    b = torch.empty_like(a, device="cuda")
    return a.numel() / _timed(lambda: b.copy_(a, non_blocking=True), torch.cuda.synchronize)


def _probe(measure: bool) -> dict[str, Any]:
    """Runs on a worker's node (as a Ray task with a worker's resources): its GPU and RAM."""
    import ray

    out: dict[str, Any] = {"node": ray.get_runtime_context().get_node_id(), "host_total": host_memory()}
    if torch.cuda.is_available() and ray.get_gpu_ids():
        out.update(gpu_total=torch.cuda.mem_get_info()[1], gpu_name=torch.cuda.get_device_name())
        if measure:
            out.update(bandwidth=copy_bandwidth("cuda"), pcie=pcie_bandwidth())
    elif measure:
        out.update(bandwidth=copy_bandwidth("cpu", 64))
    return out


def probe_memory(
    config: Any, *, measure: bool = False, timeout: float = PROBE_TIMEOUT
) -> DeviceMemory | None:
    """Ask a node that can host a worker (a Ray task with the worker's resources; Ray must be initialized)
    for its memory; None when no such node answers in `timeout` seconds (e.g. the autoscaler has no GPU node
    up yet), so the check is skipped rather than blocking the run."""
    import ray

    w = config.workers
    gpu = gpu_workers(config)
    if gpu and not ray.cluster_resources().get("GPU"):
        log.warning("memory plan not checked: the Ray cluster has no GPU yet")
        return None
    # max_calls=1: the task's process exits after it, so its CUDA context does not stay on the GPU
    task = ray.remote(num_cpus=w.num_cpus, num_gpus=w.num_gpus if gpu else 0, max_calls=1)(_probe)
    ref = task.remote(measure)
    try:
        info = ray.get(ref, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        log.warning("memory plan not checked: no node could run a worker-sized probe in %.0f s", timeout)
        return None
    node = next((n for n in ray.nodes() if n["NodeID"] == info["node"]), {"Resources": {}})
    res = node["Resources"]
    per_node = min(w.count, math.floor(res.get("CPU", w.num_cpus) / w.num_cpus + 1e-9))
    if gpu:
        if "gpu_total" not in info:
            return None
        per_node = min(per_node, math.floor(res.get("GPU", w.num_gpus) / w.num_gpus + 1e-9))
        return DeviceMemory("cuda", info["gpu_total"], workers_per_gpu(config), info["host_total"], max(1, per_node),
                            name=info["gpu_name"], source=f"probed on node {info['node'][:8]}",
                            bandwidth=info.get("bandwidth"), pcie=info.get("pcie"))  # fmt: skip
    per_node = max(1, per_node)
    return DeviceMemory("cpu", info["host_total"], per_node, info["host_total"], per_node, name="host RAM",
                        source=f"probed on node {info['node'][:8]}", bandwidth=info.get("bandwidth"))  # fmt: skip


def probes(config: Any, remote: bool = False) -> bool:
    """Whether the workers' memory must be asked of a Ray node (GPU workers, or CPU workers on a cluster)."""
    gpu = gpu_workers(config)
    return (gpu or remote) and config.evaluator.type != "function"


def check_run(config: Any, base: str, sources: list[str], space: Any = None, *, remote: bool = False,
              memory: DeviceMemory | None = None) -> MemoryPlan | None:  # fmt: skip
    """Refuse (ConfigError, one line) a run whose workers cannot hold what they will load; called before any
    worker starts. `memory`: the workers' memory as known (tests); else probed through Ray for GPU workers
    or `remote` (a cluster: CPU workers on other nodes), else this machine's RAM."""
    from evomerge.checkpoints import Checkpoint

    if config.evaluator.type == "function":  # no model: nothing to plan (nor any checkpoint to open)
        return None
    infos = pool_infos(base, sources)
    model_config = Checkpoint(base).config
    settings = run_settings(config, model_config, space)
    assert settings is not None
    if memory is None:
        memory = probe_memory(config) if probes(config, remote) else local_memory(config)
    plan = plan_memory(infos, model_config, settings, base=base)
    if memory is not None and (message := refusal(plan, memory, infos, model_config)):
        raise ConfigError(message)
    return plan
