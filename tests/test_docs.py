"""The docs tell the truth where it can be checked: the commands marked runnable work as typed from
a fresh copy of the tree, their shown output is what they print, docs/config.md is what the schema
generates, and the planner's figures quoted in prose are what the planner says today."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import config_doc
from tests.helpers import ROOT, launch_env

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CHECKED = [*PAGES, ROOT / "benchmarks/RESULTS.md"]  # pages whose runnable blocks run
TREE = ["Makefile", "pyproject.toml", "constraints.txt", "pipeline", "launch", "configs", "slurm"]
FENCE = re.compile(r"<!-- (runnable|output) -->\n```[a-z]*\n(.*?)```", re.DOTALL)


def blocks(page: Path) -> list[tuple[str, str]]:
    """(script, expected output or '') for each runnable block of ``page``; an output block belongs
    to the runnable block before it."""
    found = []
    for kind, body in FENCE.findall(page.read_text()):
        if kind == "runnable":
            found.append([body, ""])
        else:
            assert found, f"{page.name}: an output block with no runnable block before it"
            found[-1][1] = body
    return [tuple(b) for b in found]


RUNNABLE = [(page, script, output) for page in CHECKED for script, output in blocks(page)]


def test_the_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    links = re.findall(r"\]\(([^)#]+)\)", readme)
    assert {f"docs/{p.name}" for p in PAGES[1:]} <= set(links), "a page of docs/ that README does not link"
    assert all((ROOT / link).exists() for link in links), [link for link in links if not (ROOT / link).exists()]
    assert len(RUNNABLE) >= 2 and any("export.py --help" in script for _, script, _ in RUNNABLE)


def in_order(expected: str, output: str) -> list[str]:
    """The expected lines (``...`` skips any number) that are not found, in order, in ``output``."""
    lines, at, missing = [line.rstrip() for line in output.splitlines()], 0, []
    for want in (line.rstrip() for line in expected.splitlines()):
        if want == "...":
            continue
        try:
            at = lines.index(want, at) + 1
        except ValueError:
            missing.append(want)
    return missing


@pytest.mark.parametrize("page, script, output", RUNNABLE,
                         ids=[f"{p.name}:{i}" for i, (p, _, _) in enumerate(RUNNABLE)])
def test_runnable_commands_work_as_typed(page, script, output, tmp_path):
    """Each block runs in a fresh copy of the tree whose .venv is this one, as a user would type it."""
    for name in TREE:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, tmp_path / name)
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=launch_env(),
                            capture_output=True, text=True, timeout=300)
    printed = result.stdout + result.stderr
    assert result.returncode == 0, f"{page.name}: exit {result.returncode}\n{script}\n{printed[-4000:]}"
    assert not in_order(output, printed), f"{page.name}: lines not printed: {in_order(output, printed)}\n{printed}"


def test_in_order_finds_lines_in_order_only():
    assert in_order("a\n...\nc", "a\nb\nc") == []
    assert in_order("c\na", "a\nb\nc") == ["a"]


def test_docs_config_md_is_generated_from_the_schema():
    assert config_doc.DOC.read_text() == config_doc.render(), \
        "docs/config.md is stale: run .venv/bin/python -m pipeline.config_doc"


def test_every_variable_the_slurm_scripts_read_is_documented():
    assert config_doc.script_variables() <= config_doc.ENVIRONMENT.keys(), \
        config_doc.script_variables() - config_doc.ENVIRONMENT.keys()


def test_the_planner_figures_quoted_in_prose_are_the_planners():
    """docs/training.md quotes the cost of an fp32 gradient reduction at 4 x 8 H100 for ViT-H/14."""
    from pipeline.config import load_config
    from pipeline.plan import Assumptions, plan
    from pipeline.train.run_plan import JobShape, resolve

    figures = {}
    for dtype in ("fp32", "bf16"):
        config = load_config("vit_h14.yaml", [f"deepspeed.reduce_dtype={dtype}"])
        figures[dtype] = plan(resolve(config, JobShape(4, 8), "train"), Assumptions())
    fp32, bf16 = figures["fp32"], figures["bf16"]
    quoted = (f"{fp32['step_time_s']:.3f} s instead of {bf16['step_time_s']:.3f} s per step, "
              f"{fp32['scaling_efficiency']['4']:.0%} instead\n  of {bf16['scaling_efficiency']['4']:.0%} scaling")
    assert quoted in (ROOT / "docs/training.md").read_text(), quoted
