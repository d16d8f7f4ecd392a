"""The pinned environment: what is installed is what constraints.txt records, so a fresh clone's
`make install` reproduces the set the tests passed with."""

from importlib.metadata import version

from tests.helpers import ROOT


def pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if line.strip() and not line.startswith("#"))


def test_installed_versions_are_the_pinned_ones():
    pinned = pins()
    assert {"torch", "torchvision", "deepspeed", "webdataset", "mlflow", "pydantic", "timm", "numpy"} <= pinned.keys()
    installed = {name: version(name).split("+")[0] for name in pinned}  # torch's local build label aside
    assert installed == pinned


def test_the_image_records_its_commit_for_mlflow(monkeypatch):
    from pipeline.tracking import git_commit

    assert len(git_commit()) == 40  # a checkout: git itself
    monkeypatch.setenv("VIT_PIPELINE_GIT_COMMIT", "0123abc")  # the Docker image: its build argument
    assert git_commit() == "0123abc"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "ARG GIT_COMMIT" in dockerfile and "VIT_PIPELINE_GIT_COMMIT=${GIT_COMMIT}" in dockerfile
    assert "-c constraints.txt" in dockerfile


def _lower_bound(spec: str) -> tuple[int, ...]:
    """The version a ``Requires-Python`` specifier starts at ('>=3.10,!=3.14.1' -> (3, 10))."""
    bounds = [part.strip()[2:] for part in spec.split(",") if part.strip().startswith(">=")]
    return max((tuple(int(x) for x in b.split(".")) for b in bounds), default=(0,))


def test_requires_python_is_what_the_pinned_wheels_need():
    """pyproject.toml's requires-python equals the highest floor among the pinned distributions:
    a lower one lets pip start an install on a Python the pins cannot satisfy."""
    import tomllib
    from importlib.metadata import metadata

    floors = {name: _lower_bound(metadata(name).get("Requires-Python") or "") for name in pins()}
    need = max(floors.values())
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert declared == ">=" + ".".join(map(str, need)), (declared, {n: f for n, f in floors.items() if f == need})


def test_the_docker_base_image_carries_the_pinned_torch():
    """The Dockerfile's base image tag is the pinned torch and the CUDA it was built for, so pip
    keeps the image's torch and DeepSpeed's ops build against the CUDA torch uses."""
    import re

    import torch

    base = re.compile(r"^FROM pytorch/pytorch:(\S+)-cuda(\d+)\.(\d+)-cudnn\d+-devel$", re.MULTILINE)
    found = base.search((ROOT / "Dockerfile").read_text())
    assert found, "the Dockerfile does not start from pytorch/pytorch:TORCH-cudaX.Y-cudnnN-devel"
    assert found.group(1) == pins()["torch"]
    cuda = torch.version.cuda  # the pinned build installed here, e.g. 13.2 for 2.15.0+cu132
    assert cuda and f"{found.group(2)}.{found.group(3)}" == cuda
