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
