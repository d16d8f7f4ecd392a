"""Pretrain (ZeRO-3) -> fine-tune at 2x resolution (ZeRO-3, activation checkpointing) ->
evaluate on 2 ranks -> export to timm, through the real launchers."""

import json
import math
import subprocess
import sys

import pytest
import timm
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from pipeline.config import ModelConfig
from pipeline.model import resample_pos_embed
from pipeline.train.checkpoint import checkpoint_dir
from pipeline.train.consolidate import consolidated_state_dict, read_pretrained
from pipeline.train.ema import read_ema_state

from tests.helpers import ROOT, metrics, run_deepspeed, train_args

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stages(digits_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("stages")
    common = ["deepspeed.zero_stage=3", "run.pipeline=stages-test", "run.system_metrics_interval=1"]
    run_deepspeed("launch/train.py", 2, *train_args(digits_shards, out, "pre", *common, "model.pre_logits=32"))
    finetune = run_deepspeed("launch/train.py", 2, *train_args(
        digits_shards, out, "ft", *common, "run.stage=finetune", f"finetune.init_from={out}/pre", "model.image_size=16",
        "optim.name=sgd", "optim.lr=1e-7", "optim.warmup_steps=0", "train.total_steps=2"))
    config = ROOT / "configs/demo/evaluate.yaml"
    evaluate = run_deepspeed("launch/evaluate.py", 2, "--config", str(config), "--checkpoint", str(out / "ft"),
                             f"run.output_dir={out}", "run.name=eval", f"run.tracking_uri=sqlite:///{out}/mlflow.db",
                             f"data.eval_shards={digits_shards}/val.json", "data.num_workers=2",
                             "eval.micro_batch_size=32", "run.pipeline=stages-test", "eval.log_model=true")
    return {"out": out, "shards": digits_shards, "finetune_log": finetune.stdout + finetune.stderr,
            "evaluate_log": evaluate.stdout + evaluate.stderr}


def test_finetune_resamples_pos_embed_from_a_zero3_checkpoint(stages):
    out = stages["out"]
    log = stages["finetune_log"]
    assert "pos_embed resampled (1, 17, 64) -> (1, 65, 64)" in log
    assert "pre-logits layer dropped" in log and "head re-initialised for 10 classes" in log
    pretrained = consolidated_state_dict(out / "pre")
    tuned = consolidated_state_dict(out / "ft")
    assert tuned["pos_embed"].shape == (1, 65, 64)
    # lr 1e-7: the fine-tuned weights are the pretrained ones, resampled where needed.
    close = dict(atol=2e-3, rtol=0)
    torch.testing.assert_close(tuned["pos_embed"], resample_pos_embed(pretrained["pos_embed"], (8, 8)), **close)
    torch.testing.assert_close(tuned["blocks.3.mlp.fc2.weight"], pretrained["blocks.3.mlp.fc2.weight"], **close)
    assert "pre_logits.fc.weight" not in tuned and tuned["head.weight"].shape == (10, 64)
    assert metrics(out / "ft")[1]["loss"] == pytest.approx(math.log(10), abs=1e-3)  # the new head starts at zero


def test_evaluation_counts_every_sample_once_on_two_ranks(stages):
    out = stages["out"]
    report = json.loads((out / "eval/report.json").read_text())
    expected = json.loads((stages["shards"] / "val.json").read_text())["num_samples"]
    assert report["num_samples"] == expected and report["skipped"] == 0 and report["world_size"] == 2
    for key in ("top1", "top5", "loss", "ece", "images_per_s"):
        assert key in report
    assert 0 <= report["top1"] <= report["top5"] <= 1 and 0 <= report["ece"] <= 1
    assert set(report["per_class_accuracy"]) == {str(i) for i in range(10)}
    assert (out / "eval/confusion_matrix.png").stat().st_size > 1000
    assert f"on {expected} images" in stages["evaluate_log"]
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    experiment = client.get_experiment_by_name("vit-pipeline-demo")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = {r.data.tags["stage"]: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["evaluate", "finetune", "pipeline", "pretrain"]
    assert runs["evaluate"].data.metrics["top1"] == pytest.approx(report["top1"])
    models = client.search_logged_models([experiment.experiment_id])
    evaluated = [m for m in models if m.source_run_id == runs["evaluate"].info.run_id]
    assert len(evaluated) == 1 and evaluated[0].model_type == "pyfunc", "eval.log_model: the weights, as a model"
    files = {a.path: a.file_size for a in client.list_logged_model_artifacts(evaluated[0].model_id, "data/weights")}
    assert set(files) == {f"data/weights/{f}" for f in ("model.safetensors", "model.json", "classifier.json")}
    assert files["data/weights/model.safetensors"] > 10_000
    assert {m.key: m.value for m in evaluated[0].metrics}["top1"] == pytest.approx(report["top1"])
    for stage in ("pretrain", "finetune"):  # every kept checkpoint is a LoggedModel of its run, with its step
        kept = [m for m in models if m.source_run_id == runs[stage].info.run_id]
        on_disk = checkpoint_dir(out / ("pre" if stage == "pretrain" else "ft"))
        assert [(m.tags["checkpoint"], m.params["step"]) for m in kept] == [(str(on_disk),
                                                                            str(int(on_disk.name[4:])))], stage
    assert {r.data.tags["pipeline"] for r in runs.values()} == {"stages-test"}
    parent = runs.pop("pipeline")
    assert parent.info.run_name == "stages-test" and parent.info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in runs.values()} == {parent.info.run_id}
    for stage, contexts in (("pretrain", {"training", "evaluation"}), ("finetune", {"training", "evaluation"}),
                            ("evaluate", {"evaluation"})):
        inputs = runs[stage].inputs.dataset_inputs
        assert {t.value for d in inputs for t in d.tags if t.key == "mlflow.data.context"} == contexts, stage
        assert {d.dataset.name for d in inputs} <= {f"{stages['shards'].name}/train", f"{stages['shards'].name}/val"}
    # one rank per node (here: one node) logs system metrics, every second here; the 2-step
    # fine-tune may end before MLflow's monitor publishes its first sample
    system = [k for k in runs["pretrain"].data.metrics if k.startswith("system/")]
    assert any(k.endswith("/cpu_utilization_percentage") for k in system), system
    assert any(k.endswith("/system_memory_usage_megabytes") for k in system), system


def test_export_loads_into_timm(stages, tmp_path):
    out = stages["out"]
    target = tmp_path / "ft.safetensors"
    subprocess.run([sys.executable, str(ROOT / "launch/export.py"), "--checkpoint", str(out / "ft"),
                    "--out", str(target)], check=True, capture_output=True, text=True)
    config = json.loads(target.with_suffix(".json").read_text())
    assert config["img_size"] == 16 and config["patch_size"] == 2 and config["num_classes"] == 10
    theirs = timm.models.vision_transformer.VisionTransformer(**config).eval()
    theirs.load_state_dict(load_file(str(target)), strict=True)
    from pipeline.model import create_vit

    ours = create_vit("pico/2", num_classes=10, image_size=16).eval()
    ours.load_state_dict(consolidated_state_dict(out / "ft"))
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(theirs(x), ours(x), rtol=1e-4, atol=1e-4)


def test_export_and_fine_tuning_can_take_the_ema_weights(stages, tmp_path):
    """The demo pretraining config keeps an EMA: export --ema and finetune.use_ema read it,
    assembled from both ranks' ZeRO-3 fragments; untrained (frozen) tensors would come as they are."""
    pre = stages["out"] / "pre"
    ema = {k: v.contiguous() for k, v in read_ema_state(checkpoint_dir(pre)).items()}
    weights = consolidated_state_dict(pre)
    chosen = consolidated_state_dict(pre, ema=True)
    assert chosen.keys() == weights.keys() == ema.keys()
    assert any(not torch.equal(ema[k], weights[k]) for k in ema)  # the EMA lags the weights
    for key, value in chosen.items():
        torch.testing.assert_close(value, ema[key], rtol=0, atol=0, msg=key)
    target = tmp_path / "ema.safetensors"
    subprocess.run([sys.executable, str(ROOT / "launch/export.py"), "--checkpoint", str(pre), "--out", str(target),
                    "--ema"], check=True, capture_output=True, text=True)
    exported = load_file(str(target))
    torch.testing.assert_close(exported["blocks.0.attn.qkv.weight"].float(), ema["blocks.0.attn.qkv.weight"])
    # what finetune.use_ema loads: the EMA, adapted to 16 px (pos_embed resampled, pre-logits dropped)
    adapted = read_pretrained(pre, ModelConfig(variant="pico/2", image_size=16, num_classes=10), ema=True)
    torch.testing.assert_close(adapted["blocks.3.mlp.fc2.weight"].contiguous(), ema["blocks.3.mlp.fc2.weight"])
    torch.testing.assert_close(adapted["pos_embed"].contiguous(), resample_pos_embed(ema["pos_embed"], (8, 8)))


class _Payload:
    """A pickle that, when unpickled, creates ``marker``: what a stranger's checkpoint could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_whose_pickle_runs_code_is_refused_everywhere(stages, tmp_path):
    """A ZeRO-3 checkpoint with one optimizer file replaced by a pickle that would create a marker
    file is refused by fine-tuning's init_from, evaluation and export (each through its launcher,
    one rank), naming the file and the type; so are a stage-0 and a BF16-optimizer layout read in
    process. The marker never appears; the untouched checkpoint still loads."""
    import os
    import shutil

    from pipeline.train.distributed import free_port
    from pipeline.train.safe_load import UntrustedCheckpoint

    marker = tmp_path / "pwned"
    source = checkpoint_dir(stages["out"] / "pre")
    poisoned = tmp_path / "run/checkpoints" / source.name
    shutil.copytree(source, poisoned)
    victim = sorted(poisoned.glob("*optim_states.pt"))[-1]  # not the first, which the layout check reads
    torch.save({"optimizer_state_dict": _Payload(marker), "ds_version": "0.19.8"}, victim)

    out, shards = tmp_path / "out", stages["shards"]
    common = [f"run.output_dir={out}", "run.tracking_uri=none", "data.num_workers=0"]
    runs = {
        "export": ["launch/export.py", "--checkpoint", str(poisoned), "--out", str(out / "model.safetensors")],
        "evaluate": ["launch/evaluate.py", "--config", "configs/demo/evaluate.yaml", "--checkpoint", str(poisoned),
                     f"data.eval_shards={shards}/val.json", "model.pre_logits=32", "model.image_size=8", *common],
        "finetune": ["launch/train.py", "--config", "configs/demo/finetune.yaml", f"finetune.init_from={poisoned}",
                     f"data.train_shards={shards}/train.json", f"data.eval_shards={shards}/val.json",
                     "train.total_steps=1", *common],
    }
    env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_PORT=str(free_port()))
    env.pop("RANK", None)
    for name, cmd in runs.items():
        result = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        text = result.stdout + result.stderr
        assert result.returncode != 0, f"{name} loaded a poisoned checkpoint:\n{text[-3000:]}"
        assert victim.name in text and "posix.system" in text, f"{name}:\n{text[-3000:]}"
        assert not marker.exists(), f"{name} ran the pickle"

    stage0 = tmp_path / "stage0/checkpoints/step00000001"
    stage0.mkdir(parents=True)
    shutil.copy(source / "complete.json", stage0)
    torch.save({"module": _Payload(marker)}, stage0 / "mp_rank_00_model_states.pt")
    bf16 = tmp_path / "bf16/checkpoints/step00000001"
    shutil.copytree(stage0, bf16)
    torch.save({"optimizer_state_dict": _Payload(marker)}, bf16 / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    for layout in (stage0, bf16):
        with pytest.raises(UntrustedCheckpoint, match="posix.system"):
            consolidated_state_dict(layout)
    assert not marker.exists()
    assert consolidated_state_dict(source)["pos_embed"].shape == (1, 17, 64)  # ours still loads


def test_each_user_mistake_is_one_error_line_on_two_ranks(stages, tmp_path):
    """Each mistake through the deepspeed launcher on 2 ranks: exactly one 'error:' line (rank 0's),
    no traceback, exit status 2; --debug shows the traceback. The launches run side by side (each
    mostly imports, and its other rank waits before it exits)."""
    import shutil

    from tests.helpers import deepspeed_cmd, launch_env

    shards, out = stages["shards"], tmp_path / "out"
    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    next(broken.glob("train-*.tar")).unlink()

    runs = iter(range(100))  # a run directory each: the launches run at once

    def train(*extra):
        return ("launch/train.py", *train_args(shards, out, f"mistake{next(runs)}", "run.tracking_uri=none", *extra))

    evaluate = ("launch/evaluate.py", "--config", "configs/demo/evaluate.yaml", "--checkpoint",
                str(stages["out"] / "pre"), f"data.eval_shards={shards}/val.json", f"run.output_dir={out}",
                "run.tracking_uri=none")
    mistakes = {
        "mistyped key": (train("optim.lrr=1e-3"), "did you mean 'optim.lr'"),
        "bad value": (train("optim.lr=fast"), "optim.lr"),
        "missing manifest": (train("data.train_shards=/nonexistent/train.json"), "/nonexistent/train.json"),
        "missing shard": (train(f"data.train_shards={broken}/train.json"), "missing shard"),
        "another model": (evaluate + ("model.variant=mu/4",), "does not fit this model"),
        "tracking URI": (train("run.tracking_uri=sqlite:////nonexistent/dir/mlflow.db"), "/nonexistent/dir"),
        "init_from": (train("run.stage=finetune", "finetune.init_from=/nonexistent/run"), "/nonexistent/run"),
    }
    launched = {name: subprocess.Popen(deepspeed_cmd(script, 2, *args), cwd=ROOT, env=launch_env(), text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                for name, ((script, *args), _) in mistakes.items()}
    for name, (_, expected) in mistakes.items():
        result = launched[name]
        text, _ = result.communicate(timeout=600)
        errors = [line for line in text.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, f"{name}: {errors}\n{text[-3000:]}"
        assert expected in text[text.index(errors[0]):], f"{name}: {text[-3000:]}"  # the message, with its detail lines
        assert "Traceback" not in text and result.returncode != 0, f"{name}:\n{text[-3000:]}"
    debug = subprocess.run([sys.executable, "launch/train.py", "--debug", *train("optim.lrr=1")[1:]], cwd=ROOT,
                           env=launch_env(), capture_output=True, text=True, timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_overrides_are_taken_before_and_after_the_checkpoint(stages, tmp_path):
    """launch/evaluate.py --config X OVERRIDE --checkpoint RUN OVERRIDE: both take effect."""
    from tests.helpers import launch_env

    result = subprocess.run([sys.executable, "launch/evaluate.py", "--config", "configs/demo/evaluate.yaml",
                             f"run.output_dir={tmp_path}", "--checkpoint", str(stages["out"] / "pre"),
                             "run.name=late", "run.tracking_uri=none", f"data.eval_shards={stages['shards']}/val.json",
                             "model.pre_logits=32", "model.image_size=8", "data.num_workers=0"],
                            cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "late/report.json").read_text())["num_samples"] > 0
