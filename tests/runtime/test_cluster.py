"""A search on a real two-node Ray cluster: `ray start --head` and a second `ray start --address` on this
machine (one CPU each, so each node hosts exactly one worker), the driver being `evomerge run CONFIG
--address HOST:PORT` in its own process, as on a real cluster.

The nodes are `--block` processes in their own process groups, killed by group at teardown (never
`ray stop`, which would stop every Ray on the machine). The module-scoped `local_ray` of other test modules
may be running in this pytest process: nothing here touches it (no `ray.init` in this process).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from helpers import Q0_Q1, free_ports, kill_group, run_config_data, spawn, synthetic_evaluator

RAY = str(Path(sys.executable).parent / "ray")
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def _node_args(temp_dir: str) -> list[str]:
    agent, grpc, metrics, env_agent = free_ports(4)
    return ["--num-cpus=1", "--object-store-memory=100000000", "--node-ip-address=127.0.0.1",
            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={grpc}",
            f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={env_agent}",
            f"--temp-dir={temp_dir}", "--disable-usage-stats", "--include-log-monitor=false", "--block"]  # fmt: skip


def _wait_for_nodes(procs: list[subprocess.Popen], temp_dir: str) -> None:
    """Until every `ray start` says its node is up (the worker's only once it joined the head's GCS); a loaded
    2-core machine takes ~30 s for the second."""
    logs = [Path(temp_dir) / f"{name}.log" for name in ("head", "worker")]
    deadline = time.time() + 120
    while time.time() < deadline:
        if any(p.poll() is not None for p in procs):
            pytest.fail(f"a Ray node exited\n{_logs(temp_dir)}")
        if all(f.exists() and "Ray runtime started" in f.read_text(errors="replace") for f in logs):
            return
        time.sleep(0.5)
    pytest.fail(f"the cluster never came up\n{_logs(temp_dir)}")


@pytest.fixture
def two_node_cluster():
    temp_dir = tempfile.mkdtemp(prefix="evr", dir="/tmp")  # short: Ray's unix socket paths live under it
    port, client = free_ports(2)
    address = f"127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []

    def start(args: list[str], name: str) -> None:
        with open(Path(temp_dir) / f"{name}.log", "wb") as log:  # the child keeps its own descriptor
            procs.append(spawn([RAY, "start", *args, *_node_args(temp_dir)], env=ENV, stdout=log,
                               stderr=subprocess.STDOUT))  # fmt: skip

    try:
        start(["--head", f"--port={port}", f"--ray-client-server-port={client}", "--include-dashboard=false"],
              "head")  # fmt: skip
        start([f"--address={address}"], "worker")  # retries until the head's GCS answers
        _wait_for_nodes(procs, temp_dir)
        yield address, temp_dir
    finally:
        for proc in reversed(procs):  # each node's group: `ray start --block`, its raylet (and GCS), workers
            kill_group(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _logs(temp_dir: str) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in Path(temp_dir).glob("*.log"))


@pytest.mark.slow  # end to end: a second Ray node (~15 s)
def test_search_runs_on_both_nodes_of_a_cluster(two_node_cluster, pool, tmp_path):
    address, temp_dir = two_node_cluster
    run_dir = tmp_path / "run"
    config = run_config_data(
        "cluster",
        run_dir,
        pool["base"],
        [pool[e] for e in ("e0", "e1", "e2")],
        space={"type": "task_vector"},
        strategy={"name": "random"},
        evaluator=synthetic_evaluator("sleep", seconds=1.0),
        objectives=Q0_Q1,
        candidates=12,
        workers={"count": 2, "num_cpus": 1},
        seed=1,
    )  # one CPU per node: one worker on each
    cfg_file = tmp_path / "cluster.yaml"
    cfg_file.write_text(yaml.safe_dump(config))
    driver = subprocess.run([sys.executable, "-m", "evomerge", "run", str(cfg_file), "--address", address],
                            env=ENV, capture_output=True, text=True, timeout=150)  # fmt: skip
    assert driver.returncode == 0, driver.stdout[-3000:] + driver.stderr[-3000:] + _logs(temp_dir)
    events = [json.loads(line) for line in (run_dir / "journal.jsonl").read_text().splitlines()]
    results = [e for e in events if e["event"] == "result"]
    assert len(results) == 12 and all(r["status"] == "ok" for r in results)
    nodes = {r["node"] for r in results}
    where = [(r["id"], r["node"][:8], r["pid"], round(r["t"] - events[0]["t"], 1)) for r in results]
    assert len(nodes) == 2 and None not in nodes, where  # both nodes did work
    by_node = {n: {r["pid"] for r in results if r["node"] == n} for n in nodes}
    assert all(len(p) == 1 for p in by_node.values()), by_node  # one worker process per node
    assert os.getpid() not in {r["pid"] for r in results}
    assert events[-1]["event"] == "end" and (run_dir / "front.json").exists()


def test_cluster_configs_are_valid():
    """configs/cluster/: the example run config validates; the launcher YAML and the RayJob run evomerge."""
    from evomerge.config import load_config

    root = Path(__file__).parents[2] / "configs/cluster"
    cfg = load_config(root / "search.yaml")
    assert cfg.workers.num_gpus > 0 and cfg.workers.pool_dtype == "bfloat16"
    launcher = yaml.safe_load((root / "aws-gpu.yaml").read_text())
    assert {"head", "gpu_worker"} <= set(launcher["available_node_types"])
    assert any("cu1" in c for c in launcher["worker_setup_commands"])  # CUDA torch on GPU nodes
    assert any("whl/cpu" in c for c in launcher["head_setup_commands"])  # CPU torch on the head
    job = yaml.safe_load((root / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and "--address auto" in job["spec"]["entrypoint"]
    assert "evomerge resume" in job["spec"]["entrypoint"]


def test_the_example_search_fits_the_example_clusters_gpus():
    """configs/cluster/search.yaml on configs/cluster/aws-gpu.yaml's g5.12xlarge (4 x A10G 24 GiB, 192 GiB RAM):
    the memory plan of Qwen2.5-1.5B-shaped models (from their config, as the headers would list them) fits."""
    from evomerge.config import load_config
    from evomerge.references import parse_hub
    from evomerge.runtime import memory as mp

    cfg = load_config(Path(__file__).parents[2] / "configs/cluster/search.yaml")
    assert all(
        parse_hub(m).revision and len(parse_hub(m).revision) == 40
        for m in [cfg.models.base, *cfg.models.sources]
    )
    qwen = {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
            "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 131072}  # fmt: skip
    infos = {m: mp.llama_infos(qwen) for m in [*cfg.models.sources, cfg.models.base]}
    settings = mp.run_settings(cfg, qwen)
    assert settings.gpu and settings.seq_len == cfg.evaluator.max_length
    plan = mp.plan_memory(infos, qwen, settings)
    a10g = mp.DeviceMemory(
        "cuda", 24 * mp.GiB, workers_per_device=1, host_total=192 * mp.GiB, workers_per_node=4
    )
    assert not mp.shortfalls(plan, a10g), mp.breakdown(plan)
    unbounded = mp.plan_memory(infos, qwen, replace(settings, seq_len=131072))  # without max_length: refused
    assert mp.shortfalls(unbounded, a10g) and "evaluator.max_length" in mp.refusal(
        unbounded, a10g, infos, qwen
    )
