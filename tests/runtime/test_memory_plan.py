"""The memory plan (evomerge.runtime.memory) and `workers.pool_device: cpu`, on the CPU.

The plan's figures come from safetensors headers alone; here they are checked against what the engine really
allocates for the tiny pool, a run that cannot fit is refused in one line before any worker starts, `evomerge
plan` prints the table, and a pool kept on another device than the target (streamed per tensor) gives the
same merge as one on the target's device.
"""

import math

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from evomerge.checkpoints import Checkpoint
from evomerge.cli import app
from evomerge.config import parse_config
from evomerge.errors import ConfigError
from evomerge.merge import engine
from evomerge.merge.engine import ResidentPool, apply_in_place
from evomerge.merge.mergekit_io import recipe_from_dict
from evomerge.runtime import memory as mp

runner = CliRunner()
MiB = 1024**2


def _refs(pool, *names):
    return [str(pool[n]) for n in names]


def _config(pool, batch=8, **workers):
    return {
        "models": {"base": str(pool["base"]), "sources": _refs(pool, "e0", "e1", "e2")},
        "evaluator": {"type": "lmeval", "tasks": ["zoo_search"], "batch_size": batch},
        "budget": {"candidates": 2},
        "workers": workers,
        "tracking": {"enabled": False},
    }


def _held(pool: ResidentPool) -> int:
    stored = [*pool.stacked.values(), *(t for tensors in pool.tensors.values() for t in tensors.values())]
    return sum(t.nbytes for t in stored)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pool_and_target_bytes_are_what_the_engine_allocates(pool, tmp_path, dtype):
    """A source with another vocabulary: its embeddings are kept apart in their stored dtype, the rest stacked."""
    from helpers import make_llama

    wide = make_llama(tmp_path / "wide", 7, vocab=72)
    refs = [*_refs(pool, "e0", "e1"), str(wide), str(pool["base"])]
    infos = mp.pool_infos(refs[-1], refs[:-1])
    resident = ResidentPool.from_refs(refs, dtype=dtype)
    assert resident.tensors[str(wide)]  # the loose-tensor rule is exercised
    held, largest = mp.pool_bytes(infos, dtype)
    assert held == _held(resident)
    assert largest == max(s.nbytes for s in resident.stacked.values())
    model = AutoModelForCausalLM.from_pretrained(pool["base"]).to(dtype)
    assert mp.target_bytes(infos[refs[-1]], dtype) == sum(t.nbytes for t in model.state_dict().values())


def test_stacking_targets_are_the_deepest_models_the_space_can_build(pool):
    """As the worker builds them (from the base's config at another depth); the base's own depth (4) is the
    resident target, so the next one down is planned instead."""
    base = Checkpoint(pool["base"])
    model_config = AutoModelForCausalLM.from_pretrained(pool["base"]).config
    sizes = {}
    for depth in (9, 8, 3):
        model_config.num_hidden_layers = depth
        model = AutoModelForCausalLM.from_config(model_config)
        sizes[depth] = sum(t.nbytes for t in model.state_dict().values())
    assert mp.stacking_bytes(base.tensors, torch.float32, max_depth=9, cache=2) == sizes[9] + sizes[8]
    assert mp.stacking_bytes(base.tensors, torch.float32, max_depth=4, cache=1) == sizes[3]
    assert mp.stacking_bytes(base.tensors, torch.float32, max_depth=None) == 0


def test_evaluator_headroom_formula():
    cfg = {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
           "intermediate_size": 256, "vocab_size": 72, "max_position_embeddings": 128}  # fmt: skip
    seq = mp.context_length(cfg)
    parts = mp.evaluator_headroom(cfg, batch=8, seq=seq, dtype=torch.bfloat16)
    tokens, head_dim = 8 * 128, 16
    assert parts["kv cache"] == 2 * 3 * tokens * 2 * head_dim * 2
    assert parts["logits"] == 2 * tokens * 72 * 2
    assert parts["activations"] == tokens * (2 * 64 + (4 + 2 * 2) * head_dim + 3 * 256) * 2
    assert mp.evaluator_headroom(cfg, 16, seq, torch.bfloat16)["kv cache"] == 2 * parts["kv cache"]
    assert mp.evaluator_headroom({"model_type": "digits_mlp"}, 8, seq, torch.float32) == {}
    assert mp.context_length({}) == mp.DEFAULT_CONTEXT


def test_pool_on_the_host_moves_the_pool_off_the_gpu():
    infos = {m: mp.llama_infos({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "vocab_size": 1000}) for m in ("a", "b", "base")}  # fmt: skip
    on_gpu = mp.plan_memory(infos, {}, mp.Settings(gpu=True))
    on_host = mp.plan_memory(infos, {}, mp.Settings(gpu=True, pool_device="cpu"))
    assert on_host.host_bytes == on_gpu.pool and on_gpu.host_bytes == 0
    assert on_host.device_bytes == on_gpu.device_bytes - on_gpu.pool + on_host.stream
    assert on_host.stream == 3 * 1000 * 64 * 4  # the largest stack: embeddings of the 3 models in fp32
    cpu_workers = mp.plan_memory(
        infos, {}, mp.Settings(pool_device="cpu")
    )  # CPU workers: the host is the device
    assert cpu_workers.host_bytes == 0 and cpu_workers.stream == 0
    small_host = mp.DeviceMemory("cuda", 2 * 1024**3, 1, host_total=on_host.pool - 1, workers_per_node=1)
    (problem,) = mp.shortfalls(on_host, small_host)
    assert "pinned host pool" in problem


def test_refusal_is_one_line_with_the_figures_and_what_would_fit(pool):
    cfg = parse_config(_config(pool, batch=256, count=4, num_gpus=0.25), "run.yaml")
    base, sources = str(pool["base"]), _refs(pool, "e0", "e1", "e2")
    infos = mp.pool_infos(base, sources)
    model_config = Checkpoint(base).config
    settings = mp.run_settings(cfg, model_config)
    assert (
        settings.gpu
        and settings.batch_size == 256
        and settings.seq_len == model_config["max_position_embeddings"]
    )
    plan = mp.plan_memory(infos, model_config, settings, base=base)
    # four workers share a GPU that holds exactly three of them: fewer workers per GPU or a smaller batch fit
    gpu = mp.DeviceMemory("cuda", 3 * plan.device_bytes, 4, name="test GPU")
    with pytest.raises(ConfigError) as info:
        mp.check_run(cfg, base, sources, memory=gpu)
    message = str(info.value)
    assert "\n" not in message
    assert f"needs {mp.fmt_bytes(plan.device_bytes)} of GPU memory" in message
    assert f"has {mp.fmt_bytes(gpu.per_worker)} (test GPU, 4 workers per GPU)" in message
    assert "workers.num_gpus: 0.333 (3 per GPU)" in message
    assert "evaluator.batch_size: " in message
    length = int(message.split("evaluator.max_length: ")[1].split()[0])  # shorter requests fit too
    assert 0 < length < settings.seq_len
    bounded = parse_config({**_config(pool, batch=256, count=4, num_gpus=0.25), "evaluator": {
        "type": "lmeval", "tasks": ["zoo_search"], "batch_size": 256, "max_length": length}}, "run.yaml")  # fmt: skip
    assert mp.run_settings(bounded, model_config).seq_len == length
    mp.check_run(bounded, base, sources, memory=gpu)
    assert mp.check_run(cfg, base, sources, memory=mp.DeviceMemory("cuda", 4 * plan.device_bytes, 4)) == plan
    assert (
        mp.check_run(cfg, base, sources, memory=mp.DeviceMemory("cuda", None, 4)) == plan
    )  # unknown: no check


def test_probe_asks_a_node_that_can_host_a_worker(local_ray, pool):
    import ray

    cfg = parse_config(_config(pool, count=4), "run.yaml")
    mem = mp.probe_memory(cfg, timeout=30)
    cpus = int(ray.cluster_resources()["CPU"])
    assert (mem.kind, mem.device_total, mem.workers_per_node) == ("cpu", mp.host_memory(), min(4, cpus))
    assert mem.per_worker == mp.host_memory() // min(4, cpus)
    if not ray.cluster_resources().get("GPU"):  # GPU workers and no GPU in the cluster: the check is skipped
        assert mp.probe_memory(parse_config(_config(pool, num_gpus=1), "run.yaml")) is None


def test_a_run_that_cannot_fit_stops_before_any_worker(pool, tmp_path, monkeypatch):
    """`evomerge run`: one line, exit 2, no worker pool, no run dir left behind."""
    from evomerge.runtime import run

    def no_pool(*args, **kwargs):
        raise AssertionError("a worker pool was created")

    monkeypatch.setattr(run, "WorkerPool", no_pool)
    monkeypatch.setattr(
        mp, "local_memory", lambda config: mp.DeviceMemory("cpu", MiB, 2, MiB, 2, name="tiny")
    )
    path = tmp_path / "run.yaml"
    data = {
        **_config(pool),
        "evaluator": {"type": "digits"},
        "output": str(tmp_path / "out"),
    }  # no lm-eval tasks to load
    path.write_text(yaml.safe_dump(data))
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "memory plan: each worker needs" in lines[0], result.output
    assert "(tiny, 2 workers per node)" in lines[0]
    assert not (tmp_path / "out").exists()


def test_plan_command_prints_the_table(pool, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_config(pool)))
    result = runner.invoke(app, ["plan", str(path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    out = result.output
    for needle in ("memory per worker (host RAM, this machine)", "pool", "target", "evaluator kv cache",
                   "total on host", "workers: 2, 2 per node", "candidate switch (estimate):", "fits"):  # fmt: skip
        assert needle in out, (needle, out)
    assert f"base: {pool['base']}" in out and f"source: {pool['e2']}" in out


def test_plan_command_for_gpu_workers(pool, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_config(pool, num_gpus=1, pool_device="cpu")))
    unknown = runner.invoke(app, ["plan", str(path)], terminal_width=200)
    assert unknown.exit_code == 0, unknown.output
    assert "GPU memory: unknown (pass --address to probe" in unknown.output
    assert "pinned host" in unknown.output and "stream buffer" in unknown.output
    small = runner.invoke(app, ["plan", str(path), "--gpu-memory", "520MiB"], terminal_width=200)
    assert small.exit_code == 1, small.output
    assert "memory plan: each worker needs" in small.output and "evaluator.batch_size: " in small.output
    bad = runner.invoke(app, ["plan", str(path), "--gpu-memory", "lots"])
    assert bad.exit_code == 2 and "--gpu-memory" in bad.output


# ------------------------------------------------------------------------------------------ pool_device


def _recipes(pool):
    experts, base = _refs(pool, "e0", "e1", "e2"), str(pool["base"])
    whole = recipe_from_dict({
        "merge_method": "task_arithmetic", "base_model": base,
        "models": [{"model": e, "parameters": {"weight": w}} for e, w in zip(experts, (0.5, 0.3, 0.4))],
    })  # fmt: skip  # the whole pool in pool order: one stacked mv per tensor
    part = recipe_from_dict({
        "merge_method": "linear", "models": [{"model": e, "parameters": {"weight": 0.5}} for e in experts[:2]],
    })  # fmt: skip  # two of the pool: merge_tensor on the streamed inputs
    return [*experts, base], [whole, part]


def test_streamed_pool_equals_the_resident_one_bit_for_bit(pool):
    refs, recipes = _recipes(pool)
    resident = ResidentPool.from_refs(refs)
    host = ResidentPool.from_refs(refs, device="cpu", pin=True)  # pinning needs CUDA: ignored here
    for recipe in recipes:
        a, b = (AutoModelForCausalLM.from_pretrained(pool["base"]) for _ in range(2))
        apply_in_place(recipe, resident, a)
        apply_in_place(recipe, host, b)
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name


def test_streaming_moves_each_input_to_the_targets_device(pool, monkeypatch):
    """A target on the meta device: every stack and every tensor the merge reads arrives there first."""
    refs, recipes = _recipes(pool)
    host = ResidentPool.from_refs(refs)
    seen = []
    fetch, combine_into = host.fetch, engine.combine_into

    def spy_fetch(ref, name, device):
        out = fetch(ref, name, device)
        seen.append(("read", name, out.device.type))
        return out

    def spy_combine(coefficients, stacked, target):
        seen.append(("stack", tuple(stacked.shape), stacked.device.type))
        return combine_into(coefficients, stacked, target)

    monkeypatch.setattr(host, "fetch", spy_fetch)
    monkeypatch.setattr(engine, "combine_into", spy_combine)
    monkeypatch.setattr(engine, "_check_finite", lambda job, out: None)  # meta tensors have no values
    config = AutoModelForCausalLM.from_pretrained(pool["base"]).config
    for recipe in recipes:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        apply_in_place(recipe, host, model)
    stacks = [s for s in seen if s[0] == "stack"]
    reads = [s for s in seen if s[0] == "read"]
    assert len(stacks) == len(host.stacked) and len(reads) == 2 * len(host.stacked)
    assert {device for *_, device in seen} == {"meta"}
    streamed = host.stacks_on("meta")
    name = next(iter(host.stacked))
    assert streamed[name].device.type == "meta" and streamed[name] is streamed[name]  # kept for its segments
    assert host.stacks_on("cpu") is host.stacked


def test_backend_with_the_pool_on_the_host_merges_the_same(tmp_path):
    """A worker built with `pool_device: cpu` (digits, on the CPU) gives the default worker's merges."""
    from evomerge.digits_mlp import DigitsMLP
    from evomerge.evaluate.digits import DigitsSpec, save_digits_checkpoint
    from evomerge.merge.mixture import Mixture
    from evomerge.runtime.worker import MergeBackendSpec

    paths = []
    for seed in range(3):
        torch.manual_seed(seed)
        paths.append(str(save_digits_checkpoint(DigitsMLP(), tmp_path / f"m{seed}")))
    backends = [MergeBackendSpec(paths[0], (paths[1], paths[2]), DigitsSpec(), pool_device=where).build()
                for where in ("auto", "cpu")]  # fmt: skip
    mix = Mixture(models=paths[1:], starts=[0, 100], coefficients=[[0.5, 0.5], [0.2, 0.9]],
                  size=backends[0].layout.size)  # fmt: skip
    a, b = (backend.merge(mix) for backend in backends)
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_pinned_host_pool_streamed_to_the_gpu_equals_a_gpu_pool(pool):
    refs, recipes = _recipes(pool)
    on_gpu = ResidentPool.from_refs(refs, device="cuda")
    pinned = ResidentPool.from_refs(refs, device="cpu", pin=True)
    assert all(s.is_pinned() for s in pinned.stacked.values())
    for recipe in recipes:
        a, b = (AutoModelForCausalLM.from_pretrained(pool["base"]).to("cuda") for _ in range(2))
        apply_in_place(recipe, on_gpu, a)
        apply_in_place(recipe, pinned, b)
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name


def test_llama_infos_have_llama_2_7b_parameter_count():
    cfg = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "vocab_size": 32000}  # fmt: skip
    infos = mp.llama_infos(cfg)
    assert sum(math.prod(i.shape) for i in infos.values()) == 6_738_415_616


def test_a_non_linear_space_plans_its_merge_working_set(pool):
    """TIES & co. gather a tensor's K inputs in fp32 plus the result: (K + 1) x numel x 4 of the largest one."""
    base, sources = str(pool["base"]), _refs(pool, "e0", "e1", "e2")
    infos = mp.pool_infos(base, sources)
    model_config = Checkpoint(base).config
    linear = mp.run_settings(parse_config(_config(pool), "run.yaml"), model_config)
    layerwise = parse_config({**_config(pool), "space": {"type": "layerwise", "method": "ties"}}, "run.yaml")
    tied = mp.run_settings(layerwise, model_config)
    assert linear.linear and not tied.linear
    numel = max(math.prod(i.shape) for i in infos[base].values())
    assert mp.plan_memory(infos, model_config, linear).merge == 0
    plan = mp.plan_memory(infos, model_config, tied)
    assert plan.merge == (len(infos) + 1) * numel * 4 and "merge working set" in mp.breakdown(plan)
