"""What every training objective provides to the trainer, the run plan and the evaluation."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from pipeline.config import Config


class Objective:
    """A training objective: the model it trains, its loss, the named sums its log lines are made
    of, its training FLOPs per image, and what validation measures. One instance per rank, made
    by the Trainer after the engine (a distillation's teacher is built then).

    A subclass sets :attr:`name` (the config's ``objective``), :attr:`sums` and :attr:`needs_labels`,
    and implements :meth:`step` and :meth:`record`; the class methods serve the run plan and the
    dry run, which have no model."""

    name: ClassVar[str]
    needs_labels: ClassVar[bool] = True  # whether its training shards must carry labels (.cls)
    sums: ClassVar[tuple[str, ...]]  # what :meth:`step` adds up over a log window, on the device
    headline: ClassVar[str] = "val/top1"  # the validation figure the progress bar shows
    teacher_identity: dict | None = None  # a teacher's, which checkpoints record (distillation)

    def __init__(self, config: Config, plan, device: torch.device, is_main: bool):
        self.config, self.plan, self.device, self.is_main = config, plan, device, is_main

    # -- the plan's side: no model, no device -----------------------------------------------------

    @classmethod
    def build(cls, config: Config) -> nn.Module:
        """The module this objective trains, as ``config`` describes it (weights as constructed);
        :func:`pipeline.model.build_model` initialises, partitions and fills it."""
        from pipeline.model.vit import vit_from_config

        return vit_from_config(config.model)

    @classmethod
    def shapes(cls, config: Config):
        """The parts that train, as :class:`pipeline.flops.VitShape` s (one, or a sequence), for
        the FLOPs, memory and time the run plan, the dry run and the planner work out."""
        import dataclasses

        from pipeline.flops import VitShape
        from pipeline.model.vit import kept_patches

        shape = VitShape.from_config(config.model)
        if config.model.patch_dropout:  # the blocks run over the patches kept
            shape = dataclasses.replace(shape, visible_patches=kept_patches(shape.num_patches,
                                                                            config.model.patch_dropout))
        return shape

    @classmethod
    def flops_per_image(cls, config: Config) -> float:
        """Training FLOPs of one image: what images/s is turned into TFLOP/s and MFU with."""
        from pipeline.flops import train_flops_per_image

        return train_flops_per_image(cls.shapes(config))

    # -- the training side ------------------------------------------------------------------------

    def step(self, engine, images: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        """One micro-batch's forward: (the loss to back-propagate, its :attr:`sums` as 0-d device
        tensors). ``images``: normalised, on the device; no host read."""
        raise NotImplementedError

    def record(self, sums: dict[str, float], images: int, per_device_images_per_s: float) -> dict:
        """A log window's entries of the metrics line, from :attr:`sums` added over the window's
        micro-batches and ranks."""
        raise NotImplementedError

    def validate(self, engine, stream, normalize, prefix: str) -> dict:
        """``{prefix}/name: value`` over the whole evaluation stream, every rank taking part."""
        raise NotImplementedError

    def picture(self):
        """What the last validation shows as a picture (an RGB ``numpy`` array), if anything;
        rank 0 saves it and logs it to MLflow."""
        return None


def finite_sums(loss: torch.Tensor, **terms: torch.Tensor) -> dict[str, torch.Tensor]:
    """A micro-batch's ``loss`` and loss ``terms`` where the loss is finite (else 0), and
    ``finite`` (1 or 0): a window's means leave non-finite micro-batches out."""
    finite = torch.isfinite(loss)
    return {"loss": torch.where(finite, loss, 0.0), "finite": finite.double(),
            **{k: torch.where(finite, v, 0.0) for k, v in terms.items()}}
