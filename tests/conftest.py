import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)

from helpers import make_pool  # noqa: E402


@pytest.fixture(scope="session")
def pool(tmp_path_factory) -> dict[str, Path]:
    """A tiny random Llama base and three experts near it (fp32, 4 layers, vocab 64)."""
    return make_pool(tmp_path_factory.mktemp("pool"))


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """The trained demo zoo (seed 0): {'base': ..., 'expert_rev': ..., ...}; built once per session (~2.5 min)."""
    from evomerge.zoo import build_zoo

    return build_zoo(tmp_path_factory.mktemp("zoo"), seed=0)


@pytest.fixture(scope="session")
def quick_zoo(tmp_path_factory) -> dict[str, Path]:
    """The zoo's architecture, tokenizer, tasks and layout, trained for a few dozen steps (~10 s): for the
    tests of plumbing (runs, export, tracking, the terminal), which need real zoo models but not skilled
    ones. Tests of what the experts learned use `zoo` and are marked slow."""
    from evomerge.zoo import ZooSettings, build_zoo

    quick = ZooSettings(base_steps=60, expert_steps=20, warmup=5)
    return build_zoo(tmp_path_factory.mktemp("quick_zoo"), seed=0, settings=quick)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray (2 CPUs) for the tests of a module, unless one is already running."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    if started:
        ray.shutdown()
