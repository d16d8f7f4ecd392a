"""Evaluation: top-1, top-5, loss, per-class accuracy, confusion matrix and calibration error
over every evaluation sample exactly once, on any number of ranks, at any resolution.

At ZeRO stages 0-2 the model is a plain bf16 (or fp32) module on each device: inference needs
neither an optimizer nor DeepSpeed's engine. At ZeRO-3 it stays partitioned under DeepSpeed, and
every rank runs every (padded) batch, since each forward gathers parameters collectively.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.config import Config
from pipeline.data import EvalStream, EvalTransform, Normalize, eval_batches, resolve_shards
from pipeline.tracking import Tracker, describe_shards, pipeline_id, stage_tags, tracking_uri, ui_url
from pipeline.train import signals
from pipeline.errors import MissingInput, WrongInput
from pipeline.train.consolidate import build_model, checkpoint_dir, read_pretrained
from pipeline.train.distributed import DistEnv, StepAgreement, rank_device

log = logging.getLogger(__name__)
ECE_BINS = 15
MAX_CONFUSION_CLASSES = 1000  # a 21k x 21k matrix is neither small nor readable


class Tally:
    """Per-rank sums that one all-reduce turns into the report."""

    def __init__(self, num_classes: int, device: torch.device):
        self.device = device
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
        self.per_class = torch.zeros(2, num_classes, dtype=torch.float64, device=device)  # correct, count
        self.confusion = (torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
                          if num_classes <= MAX_CONFUSION_CLASSES else None)
        self.bins = torch.zeros(3, ECE_BINS, dtype=torch.float64, device=device)  # count, confidence, correct
        self.skipped = torch.zeros(1, dtype=torch.float64, device=device)

    def add(self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> None:
        """Masked rows (padding, unreadable samples) weigh 0: no host read, no data-dependent shape."""
        weight = mask.double()
        logits, labels = logits.float(), torch.where(mask, labels, 0)  # padding is labelled -1
        probs = logits.softmax(-1)
        confidence, predicted = probs.max(-1)
        correct = (predicted == labels).double() * weight
        top5 = logits.topk(min(5, logits.shape[-1]), -1).indices.eq(labels[:, None]).any(-1).double() * weight
        loss = (F.cross_entropy(logits, labels, reduction="none").double() * weight).sum()
        self.sums += torch.stack([loss, correct.sum(), top5.sum(), weight.sum()])
        self.per_class[0].index_add_(0, labels, correct)
        self.per_class[1].index_add_(0, labels, weight)
        if self.confusion is not None:
            self.confusion.index_put_((labels, predicted), weight, accumulate=True)
        bin_index = (confidence.double() * ECE_BINS).long().clamp(max=ECE_BINS - 1)
        for row, values in enumerate([weight, confidence.double() * weight, correct]):
            self.bins[row].index_add_(0, bin_index, values)

    def all_reduce(self, summary: bool = False) -> None:
        """Sum over ranks: everything, or with ``summary`` only what :meth:`summary` reads."""
        tensors = [self.sums, self.skipped]
        if not summary:
            tensors += [self.per_class, self.bins] + ([self.confusion] if self.confusion is not None else [])
        for tensor in tensors:
            dist.all_reduce(tensor)

    def check_complete(self, num_samples: int) -> None:
        """After :meth:`all_reduce`: every sample of the shards was evaluated or skipped, once."""
        evaluated, skipped = int(self.sums[3].item()), int(self.skipped.item())
        if evaluated + skipped != num_samples:
            raise RuntimeError(f"evaluated {evaluated} + skipped {skipped} samples, but the shards hold {num_samples}")

    def summary(self) -> dict:
        loss, top1, top5, count = self.sums.tolist()
        count = max(count, 1)
        return {"top1": top1 / count, "top5": top5 / count, "loss": loss / count}

    def report(self, classes: list[str]) -> dict:
        count = max(self.sums[3].item(), 1)
        per_class = (self.per_class[0] / self.per_class[1].clamp(min=1)).tolist()
        ece = float((self.bins[1] - self.bins[2]).abs().sum() / count)
        return {
            **self.summary(), "ece": ece,
            "num_samples": int(self.sums[3]), "skipped": int(self.skipped.item()),
            "per_class_accuracy": {(classes[i] if i < len(classes) else str(i)): acc
                                   for i, acc in enumerate(per_class) if self.per_class[1, i] > 0},
        }


class Preempted(RuntimeError):
    """Every rank stopped the evaluation on a preemption signal; the job should be requeued."""


def eval_model(config: Config, source: str, env: DistEnv, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The model at ``config.model.image_size`` with the weights of ``source`` (read on rank 0;
    its EMA weights with ``eval.use_ema``; pos_embed resampled when the resolution differs; the
    classes must match), in eval mode and
    the configured precision: a plain module on the device at ZeRO 0-2, a partitioned DeepSpeed
    engine at ZeRO-3."""
    c, batch_size = config, config.eval.micro_batch_size
    if c.deepspeed.zero_stage < 3:
        model = build_model(c.model, device=device, pretrained=source, same_head=True, ema=c.eval.use_ema)
        return model.to(dtype).eval()
    ds_config = {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": 1,
                 "train_batch_size": batch_size * env.world_size, "bf16": {"enabled": dtype == torch.bfloat16},
                 "zero_optimization": {"stage": 3}, "steps_per_print": 2**31 - 1}
    model = build_model(c.model, device=device, ds_config=ds_config, zero3=True, pretrained=source, same_head=True,
                        ema=c.eval.use_ema)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()  # returns None, unlike Module.eval
    return engine


def eval_stream(config: Config, env: DistEnv) -> tuple[EvalStream, list[str]]:
    """The exact evaluation stream of ``data.eval_shards`` for this rank, and the class names."""
    c = config
    shards = resolve_shards(c.data.eval_shards)
    stream = EvalStream(shards, EvalTransform(c.model.image_size, c.data.crop_pct), batch_size=c.eval.micro_batch_size,
                        rank=env.rank, world_size=env.world_size, num_workers=c.data.num_workers,
                        image_size=c.model.image_size, num_classes=c.model.num_classes)
    return stream, shards.classes


@torch.no_grad()
def run_eval(model, stream: EvalStream, tally: Tally, normalize: Normalize, dtype: torch.dtype, *, zero3: bool,
             show: bool, desc: str = "evaluate") -> None:
    """Every batch of ``stream`` through ``model`` into ``tally`` (not yet reduced over ranks).
    Every rank runs the same number of batches (ZeRO-3 forwards are collective). Ranks agree on
    a signal once a batch, read a batch late, so all leave at the same batch without waiting on
    the device for it: :class:`Preempted` on every rank."""
    device = tally.device
    agreement = StepAgreement(device)
    batches = eval_batches(stream, pin_memory=device.type == "cuda")  # non_blocking copies overlap
    for index, batch in enumerate(tqdm(batches, total=stream.batches_per_rank, disable=not show, desc=desc,
                                       unit="batch", leave=desc == "evaluate", dynamic_ncols=True)):
        agreed = agreement.collect()
        if agreed is not None and agreed[1]:
            raise Preempted(f"evaluation stopped on {signals.received() or 'a signal on another rank'}")
        agreement.post(index, signals.received() is not None)
        mask = batch["mask"].to(device, non_blocking=True)
        tally.skipped += batch["skipped"].to(device, non_blocking=True)
        if not zero3 and not batch["mask"].any():
            continue  # a padding batch: only ZeRO-3 needs every rank's forward
        images = normalize(batch["images"].to(device, non_blocking=True)).to(dtype)
        tally.add(model(images), batch["labels"].to(device, non_blocking=True), mask)


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
    c, zero3 = config, config.deepspeed.zero_stage == 3
    device = rank_device(env)
    dtype = torch.bfloat16 if c.deepspeed.precision == "bf16" else torch.float32
    model = eval_model(config, str(source), env, device, dtype)
    stream, classes = eval_stream(config, env)
    tally = Tally(c.model.num_classes, device)
    start = time.perf_counter()
    run_eval(model, stream, tally, Normalize(c.data.mean, c.data.std, device), dtype, zero3=zero3, show=env.is_main)
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
    tracker.log_metrics({k: report[k] for k in ("top1", "top5", "loss", "ece", "images_per_s", "skipped")}, step=0)
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
    from pipeline.data.shards import shard_samples
    from pipeline.data.stream import IMAGE_KEYS
    from pipeline.serving import save_pyfunc, write_model_folder

    shutil.rmtree(out, ignore_errors=True)
    state = read_pretrained(report["checkpoint"], config.model, same_head=True, ema=report["ema"])
    folder = write_model_folder(out / "weights", {k: v.contiguous() for k, v in state.items()}, config, classes)
    samples = shard_samples(resolve_shards(config.data.eval_shards).urls[0], count=EXAMPLES)
    path = save_pyfunc(out / "model", folder, [next(s[k] for k in IMAGE_KEYS if k in s) for s in samples])
    shutil.rmtree(folder)  # the MLflow model holds its own copy
    return path


def plot_confusion(confusion: torch.Tensor, classes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = confusion.shape[0]
    rates = confusion / confusion.sum(1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(min(2 + 0.4 * n, 40), min(2 + 0.4 * n, 40)))
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 50:
        labels = classes if len(classes) == n else [str(i) for i in range(n)]
        ax.set_xticks(range(n), labels, rotation=90)
        ax.set_yticks(range(n), labels)
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (rows: share of each true class)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
