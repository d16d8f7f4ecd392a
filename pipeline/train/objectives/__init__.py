"""Training objectives, one module each: what a run optimises, behind one seam
(:class:`~pipeline.train.objectives.base.Objective`). The trainer asks its objective for the model,
the loss of each micro-batch, the named sums of a log window, and what validation measures; the
run plan asks it for the training FLOPs of an image. A new objective is a module here and a line
in :data:`OBJECTIVES` (and its config section)."""

from __future__ import annotations

from pipeline.config import Config
from pipeline.train.objectives.base import Objective
from pipeline.train.objectives.classification import Classification, Distillation
from pipeline.train.objectives.mae import MaskedAutoencoding

OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (Classification, Distillation, MaskedAutoencoding)}


def objective_of(config: Config) -> type[Objective]:
    """The objective class ``config.objective`` names."""
    return OBJECTIVES[config.objective]


__all__ = ["OBJECTIVES", "Objective", "Classification", "Distillation", "MaskedAutoencoding", "objective_of"]
