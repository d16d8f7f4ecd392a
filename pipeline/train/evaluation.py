"""Evaluation, the library: every sample of an evaluation stream exactly once, on any number of
ranks (:func:`run_eval`), summed per rank into a :class:`Tally` that one all-reduce turns into
top-1, top-5, loss, per-class accuracy, a confusion matrix and calibration error. The trainer's
validation and the evaluation stage (:mod:`pipeline.evaluate`) both run it.

At ZeRO stages 0-2 the evaluation stage's model (:func:`pipeline.evaluate.eval_model`) is a
plain bf16 (or fp32) module on each device: inference needs neither an optimizer nor DeepSpeed's
engine. At ZeRO-3 it stays partitioned under DeepSpeed, and
every rank runs every (padded) batch, since each forward gathers parameters collectively.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.config import Config
from pipeline.data import EvalStream, EvalTransform, Normalize, ShardSet, eval_batches
from pipeline.model import head_average
from pipeline.train import signals
from pipeline.train.distributed import DistEnv, StepAgreement

ECE_BINS = 15
MAX_CONFUSION_CLASSES = 1000  # a 21k x 21k matrix is neither small nor readable


class Tally:
    """Per-rank sums that one all-reduce turns into the report."""

    def __init__(self, num_classes: int, device: torch.device):
        self.device = device
        # loss, top1, top5, count; a distilled model's top-1 of its class and distillation heads
        self.sums = torch.zeros(6, dtype=torch.float64, device=device)
        self.heads = False  # whether a distilled model's heads were scored apart
        self.per_class = torch.zeros(2, num_classes, dtype=torch.float64, device=device)  # correct, count
        self.confusion = (torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
                          if num_classes <= MAX_CONFUSION_CLASSES else None)
        self.bins = torch.zeros(3, ECE_BINS, dtype=torch.float64, device=device)  # count, confidence, correct
        self.skipped = torch.zeros(1, dtype=torch.float64, device=device)

    def add(self, output: torch.Tensor | tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor,
            mask: torch.Tensor) -> None:
        """``output``: logits, or a distilled model's (class, distillation) head logits, scored as
        their average and each apart. Masked rows (padding, unreadable samples) weigh 0: no host
        read, no data-dependent shape."""
        weight = mask.double()
        labels = torch.where(mask, labels, 0)  # padding is labelled -1
        heads = torch.zeros(2, dtype=torch.float64, device=self.device)
        if isinstance(output, tuple):
            self.heads = True
            heads = torch.stack([((h.argmax(-1) == labels).double() * weight).sum() for h in output])
            output = tuple(h.float() for h in output)
        logits = head_average(output).float()
        probs = logits.softmax(-1)
        confidence, predicted = probs.max(-1)
        correct = (predicted == labels).double() * weight
        top5 = logits.topk(min(5, logits.shape[-1]), -1).indices.eq(labels[:, None]).any(-1).double() * weight
        loss = (F.cross_entropy(logits, labels, reduction="none").double() * weight).sum()
        self.sums += torch.cat([torch.stack([loss, correct.sum(), top5.sum(), weight.sum()]), heads])
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
        loss, top1, top5, count, top1_cls, top1_dist = self.sums.tolist()
        count = max(count, 1)
        heads = {"top1_cls_head": top1_cls / count, "top1_dist_head": top1_dist / count} if self.heads else {}
        return {"top1": top1 / count, "top5": top5 / count, "loss": loss / count, **heads}

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


def eval_stream(config: Config, env: DistEnv, shards: ShardSet, labels: bool = True) -> EvalStream:
    """The exact evaluation stream of ``shards`` (``data.eval_shards``, as the run plan resolved
    them) for this rank; without ``labels`` (an objective that needs none), labels are not read."""
    c = config
    return EvalStream(shards, EvalTransform(c.model.image_size, c.data.crop_pct), batch_size=c.eval.micro_batch_size,
                      rank=env.rank, world_size=env.world_size, num_workers=c.data.num_workers,
                      image_size=c.model.image_size, num_classes=c.model.num_classes, labels=labels)


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
        mask = batch.mask.to(device, non_blocking=True)
        tally.skipped += batch.skipped.to(device, non_blocking=True)
        if not zero3 and not batch.mask.any():
            continue  # a padding batch: only ZeRO-3 needs every rank's forward
        images = normalize(batch.images.to(device, non_blocking=True)).to(dtype)
        tally.add(model(images), batch.labels.to(device, non_blocking=True), mask)



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
