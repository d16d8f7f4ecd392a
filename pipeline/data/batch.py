"""The batches a stream's workers hand to the training process: typed, so every reader names its
fields. NamedTuples travel through DataLoader workers and ``pin_memory`` as they are."""

from __future__ import annotations

from typing import NamedTuple

import torch


class TrainBatch(NamedTuple):
    """One rank's training micro-batch. ``images``: uint8 (b, 3, S, S). Where the worker left
    some images encoded (``data.decode=gpu``), ``images`` holds only the decoded ones, at the
    places ``images_at``, and the JPEGs (``jpeg``: 1-D uint8 tensors) go to the places ``jpeg_at``
    with their crop boxes and flips: :class:`~pipeline.data.device.BatchFinisher` puts them together."""

    images: torch.Tensor
    labels: torch.Tensor | None = None  # int64 (b,)
    position: torch.Tensor | None = None  # the worker's stream Position, which the loader takes off
    images_at: torch.Tensor | None = None
    jpeg: list[torch.Tensor] | None = None
    jpeg_at: torch.Tensor | None = None
    jpeg_box: torch.Tensor | None = None  # (top, left, height, width) of each JPEG's crop
    jpeg_flip: torch.Tensor | None = None

    @property
    def encoded(self) -> bool:
        """Whether some images are still JPEGs, for the device to decode."""
        return self.jpeg is not None


class EvalBatch(NamedTuple):
    """One rank's evaluation batch, padded to the stream's batch size: ``mask`` is False for
    padding (label and index -1); ``skipped`` counts the unreadable samples left out of it."""

    images: torch.Tensor  # uint8 (b, 3, S, S)
    labels: torch.Tensor  # int64 (b,)
    mask: torch.Tensor  # bool (b,)
    index: torch.Tensor  # int64 (b,): each sample's place in the shards' order
    skipped: torch.Tensor  # int64 ()
