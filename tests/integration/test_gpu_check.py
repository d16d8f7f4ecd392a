"""`make gpu-check`'s chain, on 2 CPU ranks and tiny: synthetic shards, pretraining under ZeRO-1,
ZeRO-2 and ZeRO-3 with bf16, activation checkpointing and model.compile, fine-tuning at twice the
resolution under ZeRO-3, evaluation; the table and the JSON line (the CUDA benchmark is skipped)."""

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT, launch_env

pytestmark = pytest.mark.integration


def test_gpu_check_chain_runs_on_the_cpu(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--device", "cpu",
                             "--work", str(tmp_path)], cwd=ROOT, env=launch_env(), capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    stages = {row["stage"]: row for row in figures["stages"]}
    assert list(stages) == ["pretrain-zero1", "pretrain-zero2", "pretrain-zero3", "finetune-zero3", "evaluate"]
    assert figures["pipeline_ok"] is True and all(row["exit"] == 0 for row in stages.values())
    for name in ["pretrain-zero1", "pretrain-zero2", "pretrain-zero3", "finetune-zero3"]:
        assert stages[name]["step"] == 4 and stages[name]["loss"] > 0
        # the demo configs validate, with an EMA: at the end of these short runs, compiled, at each ZeRO stage
        assert 0 <= stages[name]["val/top1"] <= 1 and 0 <= stages[name]["val_ema/top1"] <= 1
        resolved = (tmp_path / name / "config.yaml").read_text()
        assert "compile: true" in resolved and "activation_checkpointing: true" in resolved
    manifest = json.loads((tmp_path / "shards/val.json").read_text())
    assert stages["evaluate"]["num_samples"] == manifest["num_samples"]
    assert json.loads((tmp_path / "evaluate/report.json").read_text())["image_size"] == 32
