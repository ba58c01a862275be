"""`evomerge ui`: the MLflow UI on a run's store, bound to 127.0.0.1.

MLflow 3.17 facts measured here: `mlflow server` starts 4 workers (1.3 GB) by default; one worker with
`MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false` needs ~0.5 GB and starts in ~5 s. The UI opens experiments in
its GenAI view; `?workflowType=machine_learning` on `#/experiments/<id>/runs` shows the runs table.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from evomerge.errors import ConfigError


def store_uri(run_dir: Path | None, tracking_uri: str | None) -> str:
    if tracking_uri:
        return tracking_uri
    if run_dir is None:
        raise ConfigError("give a run directory or --tracking-uri")
    db = Path(run_dir).resolve() / "mlflow.db"
    if not db.exists():
        raise ConfigError(f"{run_dir}: no mlflow.db (was the run made with tracking enabled?)")
    return f"sqlite:///{db}"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def server_command(uri: str, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host,
            "--port", str(port), "--workers", "1"]  # fmt: skip


def start_server(
    uri: str, *, host: str = "127.0.0.1", port: int = 5000, timeout: float = 90.0
) -> subprocess.Popen:
    """Start `mlflow server` and wait until it answers; the caller owns the process (terminate it)."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(server_command(uri, host, port), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace")[-600:] if proc.stderr else ""
            raise ConfigError(f"mlflow server exited with code {proc.returncode}: {err.strip()}")
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise ConfigError(f"mlflow server did not answer on {host}:{port} within {timeout:.0f} s")


def experiment_url(host: str, port: int, experiment_id: str | None) -> str:
    base = f"http://{host}:{port}"
    if experiment_id is None:
        return base
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def run_experiment_id(uri: str, run_dir: Path | None) -> str | None:
    """The experiment of the run dir's parent run (tagged with the run dir), else the newest experiment."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiments = client.search_experiments()
    if run_dir is not None:
        target = str(Path(run_dir).resolve())
        for exp in experiments:
            runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`evomerge.run_dir` = '{target}'",
                                      max_results=1)  # fmt: skip
            if runs:
                return exp.experiment_id
    named = [e for e in experiments if e.name != "Default"]
    return max(named, key=lambda e: e.creation_time or 0).experiment_id if named else None
