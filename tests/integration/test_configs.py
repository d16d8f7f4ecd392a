"""Every shipped config runs through its own stage on 2 CPU ranks, tiny.

Configs are discovered with a glob, so a new one is covered without editing this file. A config
with ``eval.checkpoint`` is an evaluation config (``launch/evaluate.py``); the others train. A
fine-tune's ``finetune.init_from``, an evaluation's ``eval.checkpoint`` and a student's
``distill.teacher`` name the run directory of another shipped config, which runs first. Only the
model size (same patch size), the image size, data and output paths and the length are overridden; each config keeps its
ZeRO stage, precision, checkpointing, optimizer, schedule, layer decay, pre-logits and head reset.
The data are scikit-learn's digits, sharded with make_shards.py's defaults (one training shard).
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import CONFIG_DIR, load_config
from pipeline.dryrun import dry_run
from pipeline.model import parse_variant
from pipeline.train.consolidate import consolidated_state_dict

from tests.helpers import ROOT, metrics, run_deepspeed

pytestmark = pytest.mark.integration

CONFIGS = sorted(str(p.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.glob("**/*.yaml"))
# What a tiny run must not change: the config's own recipe.
KEPT = ["deepspeed.zero_stage", "deepspeed.precision", "deepspeed.activation_checkpointing",
        "deepspeed.grad_accum_dtype", "deepspeed.reduce_dtype", "optim.name", "optim.schedule",
        "optim.layer_decay", "optim.lr", "optim.weight_decay", "finetune.reset_head", "model.num_classes",
        "model.global_pool", "train.global_batch_size", "train.micro_batch_size", "train.ema_decay"]


def is_evaluation(config) -> bool:
    return config.eval.checkpoint is not None


def tiny_model(config) -> list[str]:
    """A 4-block, 64-wide model with the config's patch size, on a 2-4 patch grid (the ratio of
    fine-tuning to pretraining resolution kept roughly); demo-sized models are left alone."""
    size, patch = parse_variant(config.model.variant)
    grid = config.model.image_size // patch
    if grid <= 8:
        return []
    overrides = [f"model.variant=pico/{patch}", f"model.image_size={patch * round(2 * config.model.image_size / 224)}"]
    if config.model.pre_logits:
        overrides.append("model.pre_logits=64")
    return overrides


def run_size(config) -> int:
    """The image size a config runs at here (tiny_model's, where it shrinks the model)."""
    size = next((o.split("=")[1] for o in tiny_model(config) if o.startswith("model.image_size=")), None)
    return int(size) if size else config.model.image_size


def tiny_decoder(config) -> list[str]:
    """An MAE's decoder at the tiny model's scale: 1 block, 32 wide."""
    return ["mae.decoder_dim=32", "mae.decoder_depth=1", "mae.decoder_heads=2"] if config.objective == "mae" else []


def under(out: Path, path: str | None) -> str | None:
    """A relative path of the config, moved under this test's folder."""
    return None if path is None else str(out / path) if not Path(path).is_absolute() else path


def upstream(name: str) -> str | None:
    """The shipped config whose run directory this one starts from (or distills)."""
    config = load_config(name)
    source = config.eval.checkpoint if is_evaluation(config) else (
        config.finetune.init_from if config.run.stage == "finetune" else config.distill.teacher)
    if source is None:
        return None
    for other in CONFIGS:
        if other != name and str(load_config(other).run.run_dir) == str(Path(source)):
            return other
    raise AssertionError(f"{name}: {source} is not the run directory of any shipped config")


@pytest.fixture(scope="module")
def default_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits-defaults")
    subprocess.run([sys.executable, str(ROOT / "launch/make_shards.py"), "--source", "digits", "--out", str(out),
                    "--quiet"], check=True)
    assert len(json.loads((out / "train.json").read_text())["shards"]) == 1  # the defaults: one training shard
    return out


@pytest.fixture(scope="module")
def chain(default_shards, tmp_path_factory):
    """Runs a config (after the one it starts from) once; returns its run directory and output."""
    out = tmp_path_factory.mktemp("configs")
    done: dict[str, dict] = {}

    def run(name: str) -> dict:
        if name in done:
            return done[name]
        parent = upstream(name)
        if parent:
            first = run(parent)
            assert first["returncode"] == 0, f"{parent}, which {name} starts from, failed:\n{first['log'][-6000:]}"
        config = load_config(name)
        overrides = [f"run.output_dir={under(out, config.run.output_dir)}",
                     f"run.tracking_uri=sqlite:///{out}/mlflow.db",
                     f"data.train_shards={default_shards}/train.json", f"data.eval_shards={default_shards}/val.json",
                     *tiny_model(config), *tiny_decoder(config)]
        if config.knn.train_shards:
            overrides += [f"knn.train_shards={default_shards}/train.json", f"knn.eval_shards={default_shards}/val.json"]
        if is_evaluation(config):
            overrides.append(f"eval.checkpoint={under(out, config.eval.checkpoint)}")
            script, stage = "launch/evaluate.py", "evaluate"
        else:
            overrides += ["train.epochs=null", "train.total_samples=null", "train.total_steps=2",
                          "train.checkpoint_every=2", "train.log_every=1", "data.samples_per_epoch=null"]
            if config.run.stage == "finetune":
                overrides.append(f"finetune.init_from={under(out, config.finetune.init_from)}")
            if config.distill.teacher:
                overrides.append(f"distill.teacher={under(out, config.distill.teacher)}")
            script, stage = "launch/train.py", "train"
        # The plan the dry run prints for this job, resolved before the run (which then finds no checkpoint).
        _, report, dry = dry_run(str(CONFIG_DIR / name), overrides, stage=stage, nodes=1, gpus_per_node=2)
        result = run_deepspeed(script, 2, "--config", str(CONFIG_DIR / name), *overrides, check=False, timeout=900)
        done[name] = {"returncode": result.returncode, "log": result.stdout + result.stderr, "config": config,
                      "run_dir": Path(under(out, str(config.run.run_dir))), "parent": parent,
                      "dry_plan": dry.summary(), "dry_report": report}
        return done[name]

    return run


def marker_objective(run_dir: Path) -> str:
    return json.loads((run_dir / "checkpoints/step00000002/complete.json").read_text())["objective"]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_runs_through_its_stage(name, chain, default_shards):
    result = chain(name)
    assert result["returncode"] == 0, f"{name} failed:\n{result['log'][-6000:]}"
    config, run_dir, log = result["config"], result["run_dir"], result["log"]
    # The run was built from the plan its dry run printed: the same figures, DeepSpeed configs and
    # shard lists, on CPU ranks where the dry run assumes GPUs.
    built = json.loads((run_dir / "plan.json").read_text())
    assert built["job"].pop("device") == "cpu" and result["dry_plan"]["job"].pop("device") == "cuda"
    assert built == result["dry_plan"], result["dry_report"]
    assert built["problems"] == [] and built["job"]["world_size"] == 2
    if is_evaluation(config):
        report = json.loads((run_dir / "report.json").read_text())
        expected = json.loads((default_shards / "val.json").read_text())["num_samples"]
        assert report["num_samples"] + report["skipped"] == expected and report["world_size"] == 2
        assert 0 <= report["top1"] <= report["top5"] <= 1
        assert report["ema"] == config.eval.use_ema  # the EMA weights of the fine-tune, where the config asks
        return
    records = metrics(run_dir)
    assert sorted(records) == [1, 2] and all(math.isfinite(r["loss"]) for r in records.values())
    if config.distill.type != "none":  # the teacher's term in the loss, the teacher's work beside the MFU
        assert all(math.isfinite(r["loss/distill"]) and r["teacher_tflops_per_device"] > 0 for r in records.values())
        assert f"{config.distill.type} distillation" in log and built["teacher"]["path"]
    if config.train.eval_every:  # the interval is longer than the tiny run: validated once, at the end
        assert sorted(metrics(run_dir, validation=True)) == [2]
        if config.knn.train_shards:
            assert 0 <= metrics(run_dir, validation=True)[2]["knn/top1"] <= 1
    if config.objective == "mae":
        assert marker_objective(run_dir) == "mae" and (run_dir / "pictures/step00000002.png").is_file()
    assert (run_dir / "checkpoints/step00000002/ema").is_dir() == (config.train.ema_decay is not None)
    marker = json.loads((run_dir / "checkpoints/step00000002/complete.json").read_text())
    assert marker["zero_stage"] == config.deepspeed.zero_stage and marker["world_size"] == 2
    # The fp32 weights the next stage starts from are the trained ones: rounded, the bf16 module's
    # (saved whole at ZeRO 0-2).
    weights = consolidated_state_dict(run_dir)
    if config.deepspeed.zero_stage < 3:
        module = torch.load(run_dir / "checkpoints/step00000002/mp_rank_00_model_states.pt", weights_only=False)
        for key, value in module["module"].items():
            torch.testing.assert_close(weights[key].to(value.dtype), value, rtol=0, atol=0, msg=key)
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    for key in KEPT:
        section, field = key.split(".")
        assert resolved[section][field] == config.model_dump(mode="json")[section][field], key
    if config.run.stage == "finetune":
        parent = chain(result["parent"])["config"]
        if run_size(config) != run_size(parent):
            assert "pos_embed resampled" in log
        if parent.model.pre_logits and not config.model.pre_logits:
            assert "pre-logits layer dropped" in log
        if parent.objective == "mae":  # an encoder, without a head: the classifier's starts fresh
            assert "without its decoder and mask token" in log
        elif config.finetune.reset_head or parent.model.num_classes != config.model.num_classes:
            assert f"head re-initialised for {config.model.num_classes} classes" in log
