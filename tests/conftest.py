import os
from pathlib import Path

import pytest
import torch

# Two cores: keep intra-op threads from fighting the multi-rank tests.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def write_yaml(tmp_path):
    """Write a YAML file under tmp_path and return its path."""

    def write(name: str, text: str):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    return write


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    from pipeline.data.sources import digits_source
    from pipeline.data.writer import write_shards

    out = tmp_path_factory.mktemp("digits")
    write_shards(digits_source(), out, val_fraction=0.2, max_count=100, progress=False)
    return out


@pytest.fixture(scope="session")
def digits_images(tmp_path_factory) -> Path:
    """The digits of ``digits_shards`` (the same split), without labels."""
    from pipeline.data.sources import digits_source
    from pipeline.data.writer import write_shards

    out = tmp_path_factory.mktemp("digits-images")
    write_shards(digits_source(), out, val_fraction=0.2, max_count=100, progress=False, unlabelled=True)
    return out


# `make test` runs two pytest-xdist workers. Most of a multi-rank test's time is process start,
# imports and waiting on servers, so two run side by side in well under twice the time of one.
# A module goes to one worker, so its module fixtures (a shared training run) run once; both SLURM
# modules go to the same one, since each starts daemons on this machine. They go first, then the
# other tiers heaviest first, so that no long module starts last.
SHARED_WORKER = {"tests/system/test_slurm.py": "slurm", "tests/system/test_slurm_multinode.py": "slurm"}
TIERS = ("system", "integration")


def _module(nodeid: str) -> str:
    return nodeid.split("::")[0]


def pytest_collection_modifyitems(config, items):
    def order(item) -> tuple[bool, int]:
        tier = next((i for i, name in enumerate(TIERS) if item.get_closest_marker(name)), len(TIERS))
        return _module(item.nodeid) not in SHARED_WORKER, tier

    items.sort(key=order)  # stable: tests keep their order within a module


def pytest_xdist_make_scheduler(config, log):
    """xdist's load-by-scope scheduling, a scope being a module or SHARED_WORKER's group.
    (Its --dist loadgroup marks do not reach the scheduler under pytest 9.2, whose node ids
    no longer come from the attribute that xdist 3.8 rewrites.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return SHARED_WORKER.get(_module(nodeid), _module(nodeid))

    return ByModule(config, log)
