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
