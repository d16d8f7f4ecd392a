"""2 CPU ranks through the deepspeed launcher: ZeRO-2 and ZeRO-3, bf16, activation checkpointing,
accumulation of 2, exact resume, resume on fewer ranks, signal-triggered saves, bad losses."""

import json
import math
import shutil
import signal
import subprocess
import time

from pathlib import Path

import psutil
import pytest
import yaml

from tests.helpers import ROOT, deepspeed_cmd, launch_env, metrics, run_deepspeed, train_args

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def runs(request, digits_shards, tmp_path_factory):
    """Per ZeRO stage: 8 steps straight, and 4 steps + stop + resume + 4 steps, both with an EMA
    and validation every 4 steps; the first half of the resumed run validates at step 3 too, which
    must change nothing in training."""
    stage = request.param
    out = tmp_path_factory.mktemp(f"zero{stage}")
    common = [f"deepspeed.zero_stage={stage}", "train.ema_decay=0.9", "eval.micro_batch_size=128"]
    run_deepspeed("launch/train.py", 2, *train_args(digits_shards, out, "straight", *common, "train.eval_every=4"))
    first = run_deepspeed("launch/train.py", 2, *train_args(digits_shards, out, "resumed", *common,
                                                            "train.eval_every=3", "train.stop_at_step=4"))
    second = run_deepspeed("launch/train.py", 2, *train_args(digits_shards, out, "resumed", *common,
                                                             "train.eval_every=4"))
    return {"stage": stage, "out": out, "straight": out / "straight", "resumed": out / "resumed",
            "logs": first.stdout + first.stderr + second.stdout + second.stderr}


def test_training_runs_and_logs_every_step(runs):
    records = metrics(runs["straight"])
    assert sorted(records) == list(range(1, 9))
    for record in records.values():
        for key in ["loss", "lr", "grad_norm", "images_per_s", "tflops_per_device", "mfu", "data_wait_frac",
                    "max_memory_gb", "data/skipped", "accuracy"]:
            assert key in record
        assert record["images_per_s"] > 0 and record["grad_norm"] > 0 and record["data/skipped"] == 0
    assert records[8]["loss"] < records[1]["loss"]
    ds = json.loads((runs["straight"] / "checkpoints/step00000008/complete.json").read_text())
    assert ds["world_size"] == 2 and ds["zero_stage"] == runs["stage"] and ds["model"]["variant"] == "pico/2"


def test_exact_resume_loss_for_loss(runs):
    straight, resumed = metrics(runs["straight"]), metrics(runs["resumed"])
    assert sorted(resumed) == list(range(1, 9))
    for step in range(1, 9):
        assert resumed[step]["loss"] == pytest.approx(straight[step]["loss"], rel=1e-6, abs=1e-7), step
        assert resumed[step]["lr"] == pytest.approx(straight[step]["lr"])
    assert "resumed from" in runs["logs"] and "at step 4" in runs["logs"]


def test_validation_and_ema_resume_exactly(runs):
    """Validation lines at the interval and at the end; the EMA saved at step 4 resumes exactly."""
    straight, resumed = metrics(runs["straight"], validation=True), metrics(runs["resumed"], validation=True)
    assert sorted(straight) == [4, 8] and sorted(resumed) == [3, 8]  # the first half stopped at 4: 4 % 3 != 0
    for key in ("val/top1", "val/top5", "val/loss", "val_ema/top1", "val_ema/top5", "val_ema/loss"):
        assert resumed[8][key] == pytest.approx(straight[8][key], rel=1e-6), key
    assert straight[8]["val/loss"] < straight[4]["val/loss"]
    assert straight[8]["val_ema/loss"] != straight[8]["val/loss"]
    assert all(record["val/time_s"] > 0 for record in straight.values())
    assert list((runs["straight"] / "checkpoints/step00000008/ema").glob("rank*.safetensors"))


def test_resume_on_fewer_ranks(runs, tmp_path):
    """2 ranks -> 1 rank through DeepSpeed's universal checkpoint; the EMA is re-sliced from the
    two ranks' files."""
    work = copy_checkpoint(runs["resumed"], 8, tmp_path / "one-rank")
    result = run_deepspeed("launch/train.py", 1, *train_args(
        _shards_of(runs), tmp_path, "one-rank", f"deepspeed.zero_stage={runs['stage']}", "train.total_steps=10",
        "train.ema_decay=0.9", "train.eval_every=10"))
    assert (work / "checkpoints/step00000008_universal").is_dir()
    records = metrics(work)
    assert sorted(records) == [9, 10]
    straight = metrics(runs["straight"])
    # The weights carried over: a fresh model's first loss is ln(10) (its head is zero); this one
    # continues where the 2-rank run left off.
    assert straight[1]["loss"] == pytest.approx(math.log(10), abs=1e-3)
    assert records[9]["loss"] < math.log(10) - 0.01
    assert records[9]["loss"] == pytest.approx(metrics(runs["resumed"])[8]["loss"], abs=0.05)
    assert "restarts at epoch" in result.stdout + result.stderr  # the data stream says what it did
    assert "holds no EMA" not in result.stdout + result.stderr
    # the EMA carried over (re-sliced from 2 ranks' files) and lags the weights a little
    ema = metrics(work, validation=True)[10]
    assert ema["val_ema/loss"] == pytest.approx(ema["val/loss"], abs=0.1) and ema["val_ema/loss"] != ema["val/loss"]


def copy_checkpoint(run_dir: Path, step: int, new_run_dir: Path) -> Path:
    """A new run directory holding one checkpoint of another run."""
    tag = f"step{step:08d}"
    shutil.copytree(run_dir / "checkpoints" / tag, new_run_dir / "checkpoints" / tag)
    return new_run_dir


def _shards_of(runs) -> Path:
    config = yaml.safe_load((runs["straight"] / "config.yaml").read_text())
    return Path(config["data"]["train_shards"]).parent


def test_checkpoint_of_another_model_is_refused(runs, tmp_path):
    copy_checkpoint(runs["straight"], 8, tmp_path / "other")
    result = run_deepspeed("launch/train.py", 1, *train_args(_shards_of(runs), tmp_path, "other",
                           "model.variant=mu/2"), check=False)
    assert result.returncode != 0
    assert "is of another model (variant: checkpoint 'pico/2', config 'mu/2')" in result.stdout + result.stderr


@pytest.mark.parametrize("runs", [2], indirect=True, ids=["zero2"])
def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(runs, tmp_path):
    """Every loss non-finite from step 5: two steps skipped (max_bad_steps=2), without their
    update; the third stops the run; the step-4 checkpoint is the only one, untouched."""
    work = copy_checkpoint(runs["resumed"], 4, tmp_path / "nan")
    result = run_deepspeed("launch/train.py", 2, *train_args(_shards_of(runs), tmp_path, "nan",
                           "data.mean=[.nan, .nan, .nan]", "train.max_bad_steps=2"), check=False)
    logs = result.stdout + result.stderr
    assert result.returncode != 0
    assert "non-finite loss at step 5: its update was skipped (1 of 2 allowed)" in logs
    assert "non-finite loss at step 6: its update was skipped (2 of 2 allowed)" in logs
    assert "non-finite loss at step 7 (on at least one rank)" in logs
    assert (work / "checkpoints/step00000004/complete.json").is_file()
    assert sorted(p.name for p in (work / "checkpoints").iterdir() if p.name.startswith("step")) == ["step00000004"]


def test_signal_on_one_rank_saves_on_all_and_exits_for_requeue(digits_shards, tmp_path):
    args = train_args(digits_shards, tmp_path, "preempted", "train.total_steps=400")
    launcher = subprocess.Popen(deepspeed_cmd("launch/train.py", 2, *args), cwd=ROOT, env=launch_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "preempted"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not ((run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= 3):
            time.sleep(0.5)
        # The ranks are the children of deepspeed.launcher.launch (their children are data workers).
        launch = next(p for p in psutil.Process(launcher.pid).children(recursive=True)
                      if "deepspeed.launcher.launch" in " ".join(p.cmdline()))
        ranks = launch.children()
        assert len(ranks) == 2, [p.cmdline() for p in ranks]
        rank1 = next(p for p in ranks if "--local_rank=1" in " ".join(p.cmdline()))
        rank1.send_signal(signal.SIGUSR1)  # one rank only: the other must follow at the same step
        output, _ = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 75, output[-3000:]
    saved = [p for p in (run_dir / "checkpoints").iterdir() if (p / "complete.json").is_file()]
    assert len(saved) == 1
    step = json.loads((saved[0] / "complete.json").read_text())["step"]
    assert 3 <= step < 400 and max(metrics(run_dir)) <= step
    assert "received SIGUSR1" in output and "exiting with 75" in output


def test_fewer_shards_than_ranks_x_workers_train_with_one_notice(digits_shards, tmp_path):
    shards = len(list(digits_shards.glob("train-*.tar")))
    result = run_deepspeed("launch/train.py", 2, *train_args(digits_shards, tmp_path, "few", "data.num_workers=8",
                                                             "train.total_steps=2"))
    output = result.stdout + result.stderr
    assert f"data.train_shards: {shards} shards for 2 ranks x 8 workers = 16 streams" in output
    assert output.count("Shards are resampled") == 1  # rank 0 says it once
    assert sorted(metrics(tmp_path / "few")) == [1, 2]


def test_gpu_decode_trains_as_the_cpu_path(tmp_path):
    """data.decode=gpu on 2 CPU ranks (JPEGs left encoded by the workers, decoded in the training
    process): the same losses as data.decode=cpu, since the boxes of these 12 px JPEGs at 8 px go
    through the same decoder."""
    from pipeline.data.sources import synthetic_source
    from pipeline.data.writer import write_shards

    write_shards(synthetic_source(160, side=12), tmp_path / "jpegs", val_fraction=0.2, max_count=40, progress=False)
    losses = {}
    for mode in ("cpu", "gpu"):
        result = run_deepspeed("launch/train.py", 2, *train_args(tmp_path / "jpegs", tmp_path, mode,
                                                                 f"data.decode={mode}", "train.total_steps=3"))
        losses[mode] = [metrics(tmp_path / mode)[step]["loss"] for step in (1, 2, 3)]
        assert ("data.decode=gpu on cpu: JPEGs are decoded in the training process"
                in result.stdout + result.stderr) == (mode == "gpu")
    assert losses["gpu"] == pytest.approx(losses["cpu"], rel=1e-6), losses
