"""The driver's side of live tracking: `MLflowTracker`, an observer of the search that starts the tracking
process (`evomerge.tracking.process`) and tells it when the search ends."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import evomerge
from evomerge.config import Objective, RunConfig
from evomerge.errors import one_line
from evomerge.tracking.state import read_state, write_state
from evomerge.tracking.store import default_uri

log = logging.getLogger(__name__)


# The tracking process's first lines: read the spec, then wait (cheaply: no imports, a poll of the journal's
# new bytes every 0.25 s) until the first result, the end of the search, a word from the driver or
# `startup_wait` seconds, so that importing MLflow (~2 s of CPU) and opening the store do not compete with
# the workers' start-up for the CPU; then the real work.
_BOOT = """
import json, os, select, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle; it then closes us
if hasattr(os, "nice"):
    os.nice(19)  # background work: the driver and the workers (Ray runs them at nice 15) come first
spec = json.loads(sys.stdin.readline())
path, offset = spec["run_dir"] + "/journal.jsonl", 0
deadline = time.monotonic() + spec["startup_wait"]
while time.monotonic() < deadline:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
    except OSError:
        chunk = b""
    if b'"event":"result"' in chunk or b'"event":"end"' in chunk:
        break
    offset += max(len(chunk) - 32, 0)
    if select.select([sys.stdin], [], [], 0.25)[0]:
        break
from evomerge.tracking.process import serve
serve(spec)
"""


class MLflowTracker:
    """Live tracking of a search (see the module doc), in a separate process so that MLflow and matplotlib
    never compete with the driver for the GIL: the process follows the journal (the record of the run; the
    search calls observers after each journal write) and writes to the store, coalescing each flush into one
    `log_batch` per run. The hooks cost nothing (`on_end` writes one line to the process's stdin to have the
    final flush start at once, overlapping Ray's teardown); `close` waits for it. `resumed`: the journal
    already holds events (the process attaches to the run's parent and syncs what is missing)."""

    def __init__(
        self,
        run_dir: str | Path,
        config: RunConfig,
        *,
        objectives: Sequence[Objective] | None = None,
        gene_names: Sequence[str] = (),
        models: dict[str, Any] | None = None,
        resumed: bool = False,
        uri: str | None = None,
        flush_seconds: float = 0.5,
        artifact_every: int = 50,
        artifact_seconds: float = 60.0,
        startup_wait: float = 30.0,
    ) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.uri = uri or config.tracking.uri or default_uri(self.run_dir)
        spec = {
            "run_dir": str(self.run_dir),
            "uri": self.uri,
            "config": config.model_dump(mode="json"),
            "objectives": None if objectives is None else [o.model_dump() for o in objectives],
            "gene_names": list(gene_names),
            "models": models,
            "resumed": resumed,
            "flush_seconds": flush_seconds,
            "artifact_every": artifact_every,
            "artifact_seconds": artifact_seconds,
        }
        spec["startup_wait"] = 0.0 if resumed else startup_wait
        package_root = str(Path(evomerge.__file__).resolve().parent.parent)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
        }
        self._proc: subprocess.Popen[bytes] | None = None
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                env=env,
                cwd=str(self.run_dir),
            )
            self._send(json.dumps(spec))
        except OSError as e:
            log.warning(
                "MLflow tracking not started (%s); bring the store up to date later with `evomerge sync %s`",
                one_line(e),
                self.run_dir,
            )
            write_state(self.run_dir, uri=self.uri, needs_sync=True, gene_names=list(gene_names))

    def _send(self, line: str) -> None:
        if self._proc is None or self._proc.stdin is None or self._proc.stdin.closed:
            return
        with contextlib.suppress(OSError):  # the tracking process is gone; close() reports it
            self._proc.stdin.write(line.encode() + b"\n")
            self._proc.stdin.flush()

    def on_ask(self, candidates: list[Any]) -> None:
        """Nothing: the tracking process reads the ask from the journal."""

    def on_result(self, event: dict[str, Any], candidate: Any) -> None:
        """Nothing: the tracking process reads the result from the journal."""

    def on_rescore(self, event: dict[str, Any]) -> None:
        """Nothing: the tracking process reads the rescore from the journal."""

    def on_end(self, state: object) -> None:
        self._send("end")

    def close(self, timeout: float = 120.0) -> bool:
        """Final flush; True when the store is up to date. After `timeout` seconds the tracking process is
        stopped and the store marked as needing `evomerge sync`."""
        if self._proc is None:
            return False
        self._send("close")
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        try:
            code = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
            log.warning(
                "MLflow tracking did not finish within %.0f s; run `evomerge sync %s`", timeout, self.run_dir
            )
            write_state(self.run_dir, needs_sync=True)
            return False
        if code != 0 and not read_state(self.run_dir).get("needs_sync"):
            log.warning(
                "MLflow tracking process exited with code %s; run `evomerge sync %s`", code, self.run_dir
            )
            write_state(self.run_dir, needs_sync=True)
        return code == 0
