"""`evomerge ui` stops its MLflow server however it is terminated: SIGTERM (a process manager) and SIGHUP
(the terminal closed) leave no `mlflow server` or uvicorn process behind and the port free. No browser needed."""

import contextlib
import errno
import signal
import socket
import subprocess
from pathlib import Path

import psutil
import pytest
from helpers import evomerge_command, free_ports, spawn


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    """A run directory holding only a sqlite MLflow store with one experiment (what `ui` needs)."""
    from mlflow import MlflowClient

    run_dir = tmp_path_factory.mktemp("ui-signals")
    MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}").create_experiment("t")
    return run_dir


def _port_free(port: int) -> bool:
    """Nothing answers on the port and a new server could listen on it (as uvicorn binds: SO_REUSEADDR)."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) != errno.ECONNREFUSED:
            return False
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
    return True


def _kill(procs: list[psutil.Process]) -> None:
    """Cleanup of what this test started (by pid), whatever the outcome."""
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_ui_stops_its_server_on_termination_signals(store_dir, sig):
    [port] = free_ports()
    proc = spawn(evomerge_command("ui", store_dir, "--port", port), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                 text=True)  # fmt: skip
    tree: list[psutil.Process] = []
    try:
        line = proc.stdout.readline()  # printed once the server answers
        assert line.startswith("MLflow UI: "), (line, proc.poll(), proc.stderr.read() if proc.poll() else "")
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert tree, "no server process under `evomerge ui`"
        assert not _port_free(port)
        proc.send_signal(sig)  # the evomerge process only, as a process manager or the closing tty sends it
        code = proc.wait(timeout=15)
        _gone, alive = psutil.wait_procs(tree, timeout=5)
        assert not alive, f"left running: {[(p.pid, p.cmdline()) for p in alive]}"
        assert _port_free(port)
        assert code == 128 + sig  # the shell's convention for a death by signal
    finally:
        if proc.poll() is None:
            proc.kill()
        _kill(tree)
        proc.wait(timeout=10)
