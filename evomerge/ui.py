"""`evomerge ui`: the MLflow UI on a run's store, bound to 127.0.0.1.

MLflow 3.17 facts measured here: `mlflow server` starts 4 workers (1.3 GB) by default; one worker with
`MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false` needs ~0.5 GB and starts in ~5 s. The UI opens experiments in
its GenAI view; `?workflowType=machine_learning` on `#/experiments/<id>/runs` shows the runs table.

The server runs in its own session (a Ctrl-C in the terminal reaches `evomerge ui` alone, which then stops
it); `mlflow server` runs uvicorn as a child process. Ended by SIGTERM (a process manager) or SIGHUP (the
terminal closed), `evomerge ui` would die at once and leave both running and the port taken: it exits with
128 + the signal's number instead, and on its way out (atexit) stops the server's whole process group.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import threading
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
    uri: str,
    *,
    host: str = "127.0.0.1",
    port: int = 5000,
    timeout: float = 90.0,
    stop_on_signals: bool = True,
) -> subprocess.Popen:
    """Start `mlflow server` and wait until it answers; the caller owns the process (`stop_server` it).
    `stop_on_signals`: SIGTERM and SIGHUP end this process, and so the server (main thread only)."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(server_command(uri, host, port), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    atexit.register(stop_server, proc)  # however this process exits (but SIGKILL), no server outlives it
    if stop_on_signals and threading.current_thread() is threading.main_thread():
        exit_on(STOP_SIGNALS)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace")[-600:] if proc.stderr else ""
            stop_server(proc)  # a worker it may have left
            raise ConfigError(f"mlflow server exited with code {proc.returncode}: {err.strip()}")
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    stop_server(proc)
    raise ConfigError(f"mlflow server did not answer on {host}:{port} within {timeout:.0f} s")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def stop_server(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop the server's whole process group (it leads one: `start_new_session`), not just `mlflow server`:
    a uvicorn worker left behind keeps the port. SIGTERM first (mlflow forwards it, uvicorn shuts down
    cleanly), SIGKILL for what is left after `timeout` seconds. Idempotent."""
    if not _signal_group(proc.pid, signal.SIGTERM):
        proc.poll()
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
    _signal_group(proc.pid, signal.SIGKILL)  # a straggler that outlived its parent


def _signal_group(pgid: int, sig: int) -> bool:
    """Send sig to a process group; False when the group has no process left."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):  # gone (or the id reused by another user's process)
        return False
    return True


def exit_on(signals: tuple[int, ...]) -> None:
    """On any of `signals`, exit with 128 + the signal's number (the shell's code for a death by that signal)
    by raising SystemExit: `finally` blocks and the atexit hook that stops the server run on the way, where
    the default action would kill this process at once and orphan the server. The handler does not stop the
    server itself: it may interrupt `proc.wait()`, whose lock a nested wait would deadlock on. A second
    signal (SIGHUP after SIGTERM) is ignored so that it cannot cut that cleanup short."""

    def handler(signum: int, _frame: object) -> None:
        for sig in signals:
            signal.signal(sig, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    for sig in signals:
        signal.signal(sig, handler)


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
