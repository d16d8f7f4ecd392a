"""The evaluation stage: a checkpoint or weights file evaluated on ``data.eval_shards`` at any
resolution and any ZeRO stage (:mod:`pipeline.train.evaluation` does the work), reported to
``report.json``, a confusion-matrix PNG and an MLflow run, with the weights as an MLflow model
where asked."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import deepspeed
import torch

from pipeline.config import Config
from pipeline.data import Normalize, resolve_shards
from pipeline.errors import MissingInput, WrongInput
from pipeline.model import build_model
from pipeline.tracking import Tracker, describe_shards, pipeline_id, stage_tags, tracking_uri, ui_url
from pipeline.train.checkpoint import checkpoint_dir
from pipeline.train.consolidate import pretrained, read_pretrained
from pipeline.train.distributed import DistEnv, gather_placements, rank_device
from pipeline.train.evaluation import Tally, eval_stream, plot_confusion, run_eval
from pipeline.train.run_plan import JobShape, RunPlan, resolve

log = logging.getLogger(__name__)


def eval_model(plan: RunPlan, source: str, device: torch.device) -> torch.nn.Module:
    """The model at ``model.image_size`` with the weights of ``source`` (read on rank 0; its EMA
    weights with ``eval.use_ema``; pos_embed resampled when the resolution differs; the classes
    must match), in eval mode and the plan's precision: a plain module on the device at ZeRO 0-2,
    a partitioned DeepSpeed engine at ZeRO-3 (the plan's evaluation DeepSpeed config). A
    distilled model gives both heads' logits."""
    c = plan.config
    weights = pretrained(source, c.model, same_head=True, ema=c.eval.use_ema)
    zero3 = plan.eval_deepspeed is not None  # the plan's ZeRO-3 evaluation config
    model = build_model(c.model, device=device, ds_config=plan.eval_deepspeed, zero3=zero3, weights=weights)
    model.separate_heads = model.distilled  # the report scores each head besides their average
    if not zero3:
        return model.to(plan.dtype).eval()
    engine, *_ = deepspeed.initialize(model=model, config=plan.eval_deepspeed)
    engine.eval()  # returns None, unlike Module.eval
    return engine


def evaluate(config: Config, env: DistEnv, checkpoint: str | None = None) -> dict:
    """Evaluate on ``data.eval_shards``; rank 0 writes ``report.json`` (and a confusion-matrix
    PNG) to the run directory and an MLflow run tagged ``stage=evaluate``. Returns the report.
    Raises :class:`Preempted` on every rank once any rank has received SIGUSR1/SIGTERM."""
    source = checkpoint or config.eval.checkpoint
    if not source:
        raise WrongInput("nothing to evaluate: pass --checkpoint or set eval.checkpoint")
    if not str(source).endswith(".safetensors"):
        try:
            checkpoint_dir(source)
        except MissingInput as e:
            raise MissingInput(f"{'--checkpoint' if checkpoint else 'eval.checkpoint'}: {e}") from None
    c = config
    device = rank_device(env)
    plan = resolve(config, JobShape.of(gather_placements(env, device), device), "evaluate").check()
    if env.is_main:
        plan.write(config.run.run_dir)
    model = eval_model(plan, str(source), device)
    stream, classes = eval_stream(config, env, plan.eval_shards), plan.eval_shards.classes
    tally = Tally(c.model.num_classes, device)
    start = time.perf_counter()
    run_eval(model, stream, tally, Normalize(c.data.mean, c.data.std, device), plan.dtype, zero3=plan.zero3,
             show=env.is_main)
    elapsed = time.perf_counter() - start
    tally.all_reduce()
    tally.check_complete(stream.num_samples)
    report = tally.report(classes)
    report.update(images_per_s=report["num_samples"] / elapsed, checkpoint=str(source), ema=c.eval.use_ema,
                  image_size=c.model.image_size, world_size=env.world_size)
    if env.is_main:
        write_report(config, report, tally, classes)
    return report


def write_report(config: Config, report: dict, tally: Tally, classes: list[str]) -> None:
    run_dir = config.run.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(uri=tracking_uri(config.run.tracking_uri), experiment=config.run.experiment,
                      run_name=config.run.name, tags=stage_tags(config, "evaluate"), pipeline=pipeline_id(config))
    report["mlflow_run_id"] = tracker.wait_started(timeout=20.0)
    report["mlflow_experiment_id"] = tracker.experiment_id if tracker.enabled else None
    dataset = describe_shards(config.data.eval_shards, "evaluation")
    tracker.log_datasets([dataset])
    (run_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    tracker.log_params({**config.flat(), "eval.source": report["checkpoint"]})
    scores = ("top1", "top5", "loss", "ece", "images_per_s", "skipped", "top1_cls_head", "top1_dist_head")
    tracker.log_metrics({k: report[k] for k in scores if k in report}, step=0)
    tracker.log_artifact(run_dir / "report.json")
    if (config.eval.log_model or config.eval.register_model) and tracker.enabled:
        tracker.model_dataset = dataset
        path = mlflow_model(config, report, classes, run_dir / "mlflow_model")
        tracker.log_model(path, {k: report[k] for k in ("top1", "top5", "loss", "ece")},
                          register=config.eval.register_model)
    if tally.confusion is not None:
        png = run_dir / "confusion_matrix.png"
        plot_confusion(tally.confusion.cpu(), classes, png)
        tracker.log_artifact(png)
    tracker.close()
    if tracker.registered:
        log.info("registered as MLflow model %s version %s (models:/%s/%s)", *tracker.registered, *tracker.registered)
    if report["mlflow_run_id"]:
        log.info("review in MLflow: %s", ui_url(tracker.uri, report["mlflow_experiment_id"], report["mlflow_run_id"]))


EXAMPLES = 2  # images of the evaluation shards in the MLflow model's input example


def mlflow_model(config: Config, report: dict, classes: list[str], out: Path) -> Path:
    """The weights evaluated (as the evaluation read them: its resolution, EMA or not) as an
    MLflow pyfunc model at ``out/model`` (:mod:`pipeline.serving`), with the first images of the
    evaluation shards as its input example."""
    from pipeline.data.tarindex import shard_samples
    from pipeline.data.stream import IMAGE_KEYS
    from pipeline.serving import save_pyfunc, write_model_folder

    shutil.rmtree(out, ignore_errors=True)
    state = read_pretrained(report["checkpoint"], config.model, same_head=True, ema=report["ema"])
    folder = write_model_folder(out / "weights", {k: v.contiguous() for k, v in state.items()}, config, classes)
    samples = shard_samples(resolve_shards(config.data.eval_shards).urls[0], count=EXAMPLES)
    path = save_pyfunc(out / "model", folder, [next(s[k] for k in IMAGE_KEYS if k in s) for s in samples])
    shutil.rmtree(folder)  # the MLflow model holds its own copy
    return path


