"""`<run dir>/tracking.json`: where the run's store is and whether it needs `evomerge sync` (written
atomically: the driver and the tracking process both update it)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

STATE_FILE = "tracking.json"


def read_state(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def write_state(run_dir: Path, **updates: Any) -> None:
    state = {**read_state(run_dir), **updates, "updated": time.time()}
    tmp = run_dir / f".{STATE_FILE}.{os.getpid()}.{threading.get_ident()}.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, run_dir / STATE_FILE)
