"""Masked autoencoding on 2 CPU ranks under ZeRO-3, on unlabelled shards: exact resume, the
reconstruction validated, the encoder fine-tuned into a classifier and exported for timm, and the
mistakes a user makes with it (evaluating it directly, a classifier on unlabelled shards)."""

import json
import math

import pytest

from tests.helpers import metrics, run_deepspeed, train_args

pytestmark = pytest.mark.integration

MAE = ["objective=mae", "deepspeed.zero_stage=3", "mae.decoder_dim=32", "mae.decoder_depth=1", "mae.decoder_heads=2",
       "train.total_steps=6", "train.checkpoint_every=3", "train.eval_every=6", "train.ema_decay=null"]


def marker_of(run_dir):
    return json.loads((run_dir / "checkpoints/step00000006/complete.json").read_text())


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def mae(digits_images, digits_shards, tmp_path_factory):
    """An MAE pretrained 6 steps straight, and 3 + stop + 3 resumed, on the unlabelled digits; a
    classifier fine-tuned from it on the labelled ones."""
    out = tmp_path_factory.mktemp("mae")
    mae = [*MAE, f"knn.train_shards={digits_shards}/train.json", f"knn.eval_shards={digits_shards}/val.json"]
    straight = run_deepspeed("launch/train.py", 2, *train_args(digits_images, out, "straight", *mae))
    run_deepspeed("launch/train.py", 2, *train_args(digits_images, out, "resumed", *mae, "train.stop_at_step=3"))
    resumed = run_deepspeed("launch/train.py", 2, *train_args(digits_images, out, "resumed", *mae))
    finetune = run_deepspeed("launch/train.py", 2, *train_args(
        digits_shards, out, "finetune", "run.stage=finetune", f"finetune.init_from={out}/straight",
        "model.image_size=16", "train.total_steps=4", "train.eval_every=4", "deepspeed.zero_stage=2"))
    return {"out": out, "images": digits_images, "shards": digits_shards, "log": straight.stderr,
            "resumed_log": resumed.stderr, "finetune_log": finetune.stderr}


def test_mae_trains_on_unlabelled_shards_and_validates_the_reconstruction(mae):
    out = mae["out"]
    records = metrics(out / "straight")
    assert sorted(records) == list(range(1, 7))
    assert all(math.isfinite(r["loss"]) and "accuracy" not in r for r in records.values())
    assert records[6]["loss"] < records[1]["loss"]  # the decoder learns something in 6 steps
    validation = metrics(out / "straight", validation=True)[6]
    assert set(validation) >= {"val/loss", "knn/top1"} and math.isfinite(validation["val/loss"])
    assert 0.1 < validation["knn/top1"] <= 1.0  # the k-NN of the labelled digits, above chance
    # the reconstructions of the first validation images: masked, reconstructed, original
    from PIL import Image

    picture = Image.open(out / "straight/pictures/step00000006.png")
    assert picture.size == (8 * 96, 3 * 96)
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    run_id = marker_of(out / "straight")["mlflow_run_id"]
    assert [a.path for a in client.list_artifacts(run_id, "pictures")] == ["pictures/step00000006.png"]
    assert client.get_run(run_id).data.metrics["knn/top1"] == validation["knn/top1"]
    plan = json.loads((out / "straight/plan.json").read_text())
    assert plan["objective"] == "mae" and plan["train_shards"]["classes"] == 0
    assert marker_of(out / "straight")["objective"] == "mae"
    # fewer FLOPs an image than the classifier's: the encoder sees a quarter of the patches
    from pipeline.config import load_config
    from pipeline.train.objectives import Classification

    classifier = load_config("configs/demo/pretrain.yaml")
    assert plan["flops_per_image"] < Classification.flops_per_image(classifier)
    assert "no label" not in mae["log"]  # the unlabelled samples are not skipped


def test_mae_resume_is_exact_loss_for_loss(mae):
    straight, resumed = metrics(mae["out"] / "straight"), metrics(mae["out"] / "resumed")
    assert "resumed from" in mae["resumed_log"]
    assert [resumed[s]["loss"] for s in range(1, 7)] == [straight[s]["loss"] for s in range(1, 7)]
    for key in ("val/loss", "knn/top1"):
        assert metrics(mae["out"] / "resumed", validation=True)[6][key] == \
            metrics(mae["out"] / "straight", validation=True)[6][key]


def test_the_encoder_fine_tunes_into_a_classifier(mae):
    out = mae["out"]
    assert "without its decoder and mask token" in mae["finetune_log"]
    assert "pos_embed resampled" in mae["finetune_log"]  # 8 px -> 16 px
    validation = metrics(out / "finetune", validation=True)[4]
    assert 0.0 <= validation["val/top1"] <= 1.0
    marker = json.loads((out / "finetune/checkpoints/step00000004/complete.json").read_text())
    assert marker["objective"] == "classification" and marker["model"]["image_size"] == 16


def test_export_writes_the_encoder_for_timm(mae, tmp_path):
    import subprocess

    from safetensors.torch import load_file

    from tests.helpers import BIN, ROOT

    target = tmp_path / "encoder.safetensors"
    subprocess.run([str(BIN / "python"), str(ROOT / "launch/export.py"), "--checkpoint", str(mae["out"] / "straight"),
                    "--out", str(target)],
                   check=True, capture_output=True, text=True, cwd=ROOT)
    weights = load_file(target)
    assert "pos_embed" in weights and "blocks.0.attn.qkv.weight" in weights
    assert not [k for k in weights if k.startswith(("decoder_", "mask_token", "head"))]
    timm_args = json.loads(target.with_suffix(".json").read_text())
    assert timm_args["num_classes"] == 0


def test_evaluating_an_mae_checkpoint_says_to_fine_tune_first(mae):
    out = mae["out"]
    result = run_deepspeed("launch/evaluate.py", 2, *train_args(mae["shards"], out, "eval"),
                           "--checkpoint", str(out / "straight"), check=False)
    errors = error_lines(result)
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert "masked autoencoder" in errors[0] and "fine-tune it first" in errors[0]


def test_a_classifier_on_unlabelled_shards_is_one_error_line(mae):
    result = run_deepspeed("launch/train.py", 2, *train_args(mae["images"], mae["out"], "classifier"), check=False)
    errors = error_lines(result)
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert "carry no labels" in errors[0] and "train-000000.tar" in errors[0] and "objective=classification" in \
        errors[0]
    assert not (mae["out"] / "classifier/checkpoints").exists()
