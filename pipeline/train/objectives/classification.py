"""Supervised objectives: cross-entropy on the labels (with MixUp/CutMix and label smoothing), and
DeiT's distillation from a frozen teacher (:mod:`pipeline.train.distill`) beside it."""

from __future__ import annotations

from pipeline.data import batch_mixer
from pipeline.model import head_average
from pipeline.train.distill import distillation_loss, start_teacher
from pipeline.train.evaluation import Tally, run_eval
from pipeline.train.metrics import window_mean
from pipeline.train.objectives.base import Objective, finite_sums


class Classification(Objective):
    """Cross-entropy of the model's logits (a distilled model's two heads both on the labels)
    against the labels, mixed by MixUp/CutMix where configured; accuracy against the unmixed
    labels, of the heads' average (what evaluation scores)."""

    name = "classification"
    sums = ("loss", "finite", "correct")

    def __init__(self, config, plan, device, is_main):
        super().__init__(config, plan, device, is_main)
        d = config.data
        self.mixer = batch_mixer(d.mixup, d.cutmix, config.model.num_classes)
        self.teacher, self.teacher_identity = None, None

    def step(self, engine, images, labels):
        targets = labels
        if self.mixer is not None:
            images, targets = self.mixer(images, labels)
        teacher_logits = self.teacher(images) if self.teacher is not None else None
        outputs = engine(images.to(self.plan.dtype))
        outputs = tuple(o.float() for o in outputs) if isinstance(outputs, tuple) else outputs.float()
        loss, label_term, distill_term = distillation_loss(outputs, targets, teacher_logits, self.config.distill,
                                                           self.config.data.label_smoothing)
        correct = (head_average(outputs).detach().argmax(-1) == labels).sum().double()
        terms = {"label": label_term.detach(), "distill": distill_term.detach()} if self.teacher is not None else {}
        return loss, {**finite_sums(loss.detach(), **terms), "correct": correct}

    def record(self, sums, images, per_device_images_per_s):
        return {"loss": window_mean(sums, "loss"), "accuracy": sums["correct"] / max(images, 1)}

    def validate(self, engine, stream, normalize, prefix):
        """Top-1, top-5 and loss (a distilled model's heads too) over the evaluation shards."""
        tally = Tally(self.config.model.num_classes, self.device)
        run_eval(engine, stream, tally, normalize, self.plan.dtype, show=self.is_main, desc=prefix,
                 zero3=self.plan.zero3)
        tally.all_reduce(summary=True)
        tally.check_complete(stream.num_samples)
        return {f"{prefix}/{k}": v for k, v in tally.summary().items()}


class Distillation(Classification):
    """Classification with a frozen teacher's logits as the distillation head's target: the loss
    (1 - alpha) x label + alpha x distillation, both terms logged, and the teacher's TFLOP/s
    beside the student's (outside its MFU)."""

    name = "distillation"
    sums = (*Classification.sums, "label", "distill")

    def __init__(self, config, plan, device, is_main):
        super().__init__(config, plan, device, is_main)
        self.teacher, self.teacher_identity = start_teacher(plan, device, is_main)

    def record(self, sums, images, per_device_images_per_s):
        finite = max(sums["finite"], 1)
        return {**super().record(sums, images, per_device_images_per_s),
                "loss/label": sums["label"] / finite, "loss/distill": sums["distill"] / finite,
                "teacher_tflops_per_device": per_device_images_per_s * self.plan.teacher_flops_per_image / 1e12}
