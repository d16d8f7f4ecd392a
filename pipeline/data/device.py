"""Finishing batches on the training device: what the workers left undone (JPEGs left encoded
for nvJPEG), the copy from pinned host memory, normalisation and batch mixing (MixUp/CutMix).
The workers' side (decoding, crops, augmentation) is :mod:`pipeline.data.transforms`.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline.data.batch import TrainBatch
from pipeline.data.transforms import resize_box

log = logging.getLogger(__name__)

class BatchFinisher:
    """Finishes batches on the training device: JPEGs left encoded by :class:`DeviceTrainTransform`
    are decoded together (nvJPEG through ``torchvision.io.decode_jpeg(device="cuda")``), cropped to
    their boxes, resized (bilinear, antialiased) and flipped there, and put in their places beside
    the images the workers decoded. On the CPU (tests, a laptop) the same code runs there.

    On a GPU this runs on a stream of its own, which the compute stream then waits for, and its
    outputs are ``record_stream``-ed to the compute stream. nvJPEG writes its outputs from its own
    stream (its hardware engine even before the work queued ahead of it has run), so decoding on
    the compute stream could write into memory that the previous step's backward has freed but not
    finished with: wrong pixels or NaNs, silently. The side stream's memory pool holds no block the
    compute stream freed, and the host waits for the previous batch's side-stream work (long done)
    before decoding again. Host tensors reach the device from pinned memory only (non-blocking).
    With ``batched`` (the default on a GPU) the boxes are resampled in float one by one (they
    differ in size), then rounded, flipped and placed in a few kernels for the whole batch; on the
    CPU each box goes through the workers' uint8 kernel, for the CPU path's pixels exactly.

    A JPEG the device cannot decode (rare: the workers pass on truncated ones) is counted in
    ``failed`` and its place takes another image of the batch with its label."""

    def __init__(self, size: int, device: torch.device | str, *, side_stream: bool = True,
                 batched: bool | None = None):
        self.size, self.device, self.failed = size, torch.device(device), 0
        self.cuda = self.device.type == "cuda"
        self.batched = self.device.type != "cpu" if batched is None else batched
        self.stream = torch.cuda.Stream(self.device) if self.cuda and side_stream else None
        self.done: torch.cuda.Event | None = None

    def _host(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` on the device, copied without blocking the host (from pinned memory on a GPU)."""
        if self.cuda and not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def _decode(self, jpegs: list[torch.Tensor]) -> list[torch.Tensor | None]:
        try:
            return decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:  # one bad JPEG fails the batch: decode them one by one
            out = []
            for jpeg in jpegs:
                try:
                    out.append(decode_jpeg(jpeg, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    out.append(None)
            return out

    def __call__(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images (b, 3, S, S) and int64 labels (b,), on the device, ready for the compute
        stream."""
        if self.stream is None:
            return self._finish(batch)
        compute = torch.cuda.current_stream(self.device)
        if self.done is not None:
            self.done.synchronize()
        with torch.cuda.stream(self.stream):
            images, labels = self._finish(batch)
            self.done = torch.cuda.Event()
            self.done.record(self.stream)
        compute.wait_stream(self.stream)
        images.record_stream(compute)
        labels.record_stream(compute)
        return images, labels

    def _finish(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        labels = self._host(batch.labels)
        if not batch.encoded:
            return self._host(batch.images), labels
        images = torch.empty(len(labels), 3, self.size, self.size, dtype=torch.uint8, device=self.device)
        if len(batch.images_at):
            images.index_copy_(0, self._host(batch.images_at), self._host(batch.images))
        good, failed, kept, decoded = batch.images_at.tolist(), [], [], []
        for i, (place, image) in enumerate(zip(batch.jpeg_at.tolist(), self._decode(batch.jpeg))):
            if image is None:
                failed.append(place)
            else:
                good.append(place)
                kept.append(i)
                decoded.append(image)
        if kept:
            resized = self._resize(decoded, batch.jpeg_box[kept].tolist(), batch.jpeg_flip[kept])
            images.index_copy_(0, self._host(batch.jpeg_at[kept]), resized)
        if failed:
            if not good:
                raise RuntimeError(f"no image of a batch of {len(labels)} could be decoded on {self.device}")
            self.failed += len(failed)
            log.warning("%d JPEG(s) of a batch failed to decode on %s: skipped, their places take other images of "
                        "the batch (%d so far)", len(failed), self.device, self.failed)
            donors = self._host(torch.tensor([good[i % len(good)] for i in range(len(failed))]))
            at = self._host(torch.tensor(failed))
            images[at], labels[at] = images[donors], labels[donors]
        return images, labels

    def _resize(self, decoded: list[torch.Tensor], boxes: list[list[int]], flips: torch.Tensor) -> torch.Tensor:
        """The boxes (top, left, height, width) of ``decoded`` resampled to uint8 (n, 3, S, S),
        flipped where ``flips``."""
        if not self.batched:
            resized = [resize_box(image, *box, self.size) for image, box in zip(decoded, boxes)]
            return torch.stack([image.flip(-1) if flip else image for image, flip in zip(resized, flips.tolist())])
        out = torch.cat([F.interpolate(image[None, :, top:top + height, left:left + width].float(),
                                       size=(self.size, self.size), mode="bilinear", antialias=True,
                                       align_corners=False)
                         for image, (top, left, height, width) in zip(decoded, boxes)])
        out = torch.where(self._host(flips)[:, None, None, None], out.flip(-1), out)
        return out.round_().to(torch.uint8)


class Normalize:
    """uint8 (b, 3, H, W) on ``device`` -> float32 normalised; mean and std on a 0-1 scale, put
    on the device once (a loop that normalises each batch copies nothing from the host)."""

    def __init__(self, mean, std, device: torch.device | str = "cpu"):
        self.mean, self.std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1).mul(255).to(device)
                               for v in (mean, std))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std


def batch_mixer(mixup: float, cutmix: float, num_classes: int) -> Callable | None:
    """MixUp and/or CutMix on a float batch on the device: (images, labels) -> (images, soft labels)."""
    from torchvision.transforms import v2

    choices = []
    if mixup > 0:
        choices.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
    if cutmix > 0:
        choices.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
    if not choices:
        return None
    return choices[0] if len(choices) == 1 else v2.RandomChoice(choices)
