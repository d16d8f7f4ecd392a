"""The device script's CPU form, where the lent GPU machine will run it: the wheels `make wheels`
writes (for this machine's Python) install offline with --no-index --no-deps beside only the
packages that machine has (torch and its kin, numpy, pillow, pyyaml, einops, tqdm, psutil,
nvidia-ml-py, safetensors, timm; no deepspeed, webdataset, pydantic, simplejpeg or mlflow), and
`benchmarks/gpu_first.py --device cpu --tiny` runs every phase there, one JSON line each."""

import importlib.metadata
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.helpers import ROOT, launch_env

pytestmark = pytest.mark.integration

# Distributions on the lent machine's image (the device's KINDS.md) that this project's code or
# torch may load; everything else of .venv stays out of the bare environment.
LENT = {"torch", "torchvision", "timm", "numpy", "pillow", "pyyaml", "einops", "tqdm", "psutil", "nvidia-ml-py",
        "safetensors", "packaging", "msgpack", "ninja", "py-cpuinfo", "typing-extensions", "filelock", "fsspec",
        "jinja2", "markupsafe", "networkx", "sympy", "mpmath", "setuptools", "triton", "matplotlib", "contourpy",
        "cycler", "fonttools", "kiwisolver", "pyparsing", "python-dateutil", "six", "huggingface-hub"}
PHASES = ["env", "eager-H14", "eager-L16", "eager-H14mae", "compiled-H14", "compiled-L16", "correctness", "decode",
          "launcher"]


def lent(name: str) -> bool:
    name = name.lower().replace("_", "-")
    return name in LENT or name.startswith(("nvidia-", "cuda-"))


def bare_environment(tmp: Path) -> Path:
    """A venv without pip whose only packages are links to .venv's copies of the lent machine's."""
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(tmp / "bare")], check=True)
    site = Path(sysconfig.get_paths()["purelib"])
    links = tmp / "lent"
    links.mkdir()
    for dist in importlib.metadata.distributions(path=[str(site)]):
        if not lent(dist.metadata["Name"]):
            continue
        for top in {Path(f).parts[0] for f in dist.files or [] if not Path(f).parts[0].startswith("..")}:
            if (site / top).exists() and not (links / top).exists():
                (links / top).symlink_to(site / top)
    bare_site = next((tmp / "bare/lib").glob("python3*/site-packages"))
    (bare_site / "lent.pth").write_text(f"{links}\n")
    return tmp / "bare/bin/python"


def test_wheels_install_offline_and_the_tiny_form_runs_every_phase(tmp_path):
    wheels = tmp_path / "wheels"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    made = subprocess.run(["make", "-o", "install", "wheels", f"WHEELS={wheels}", f"WHEEL_PY={version}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-3000:]
    assert sum(p.stat().st_size for p in wheels.iterdir()) < 20e6
    python = bare_environment(tmp_path)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target", str(site),
                    *map(str, wheels.glob("*.whl"))], check=True, timeout=300)
    env = launch_env(PYTHONPATH=str(site))
    missing = subprocess.run([str(python), "-c", "import mlflow"], env=env, capture_output=True, text=True)
    assert missing.returncode != 0  # the bare environment is really bare

    results = tmp_path / "gpu_first.jsonl"
    run = subprocess.run([str(python), "benchmarks/gpu_first.py", "--device", "cpu", "--tiny", "--results",
                          str(results)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["phase"] for r in records] == PHASES, run.stdout[-3000:] + run.stderr[-3000:]
    failed = {r["phase"]: r for r in records if not r["ok"]}
    assert not failed, failed
    assert run.returncode == 0 and json.loads(run.stdout.strip().splitlines()[-1])["failed"] == []
    by_phase = {r["phase"]: r for r in records}
    assert by_phase["correctness"]["max_rel_diff_vs_cpu"] <= by_phase["correctness"]["tolerance"]
    assert by_phase["compiled-H14"]["block_graphs"] <= 2 and by_phase["compiled-H14"]["block_fallbacks"] == 0
    assert by_phase["launcher"]["resumed"] and by_phase["eager-L16"]["images_per_s"] > 0
    assert by_phase["eager-H14mae"]["objective"] == "mae" and by_phase["eager-H14mae"]["images_per_s"] > 0
    assert by_phase["decode"]["pixel_max_diff_500x375"] <= 32  # the same crops: JPEG decoders differ a little
