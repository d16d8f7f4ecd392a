"""Decoding and augmentation: every image to 3-channel RGB, a fast RandomResizedCrop, eval crops.

The fast path chooses the crop box from the image header first. Where the box is at least twice
the target size, libjpeg decodes at the smallest DCT scale (1/2, 1/4, 1/8) that still covers it
(PIL ``draft``); otherwise torchvision's decoder runs and only the box is resampled. The box
distribution is exactly RandomResizedCrop's.
Transforms take encoded bytes and a ``random.Random`` and return a uint8 tensor (3, S, S);
normalisation happens on the device (:class:`Normalize`).
"""

from __future__ import annotations

import io
import math
import random
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2.functional import resized_crop

EXIF_ORIENTATION = 0x0112


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> RGB: grayscale, 16-bit, palette, alpha (over white) and CMYK included."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (or 32-bit int) grayscale: scale the full 16-bit range to 8 bits, not clip it.
        array = np.asarray(image, dtype=np.uint32 if image.mode == "I" else np.uint16)
        image = Image.fromarray((np.clip(array, 0, 65535) // 257).astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def open_image(data: bytes) -> Image.Image:
    """Open encoded bytes lazily (header only); EXIF orientation applied where set."""
    if not data:
        raise ValueError("empty image")
    image = Image.open(io.BytesIO(data))
    orientation = image.getexif().get(EXIF_ORIENTATION, 1) if image.format in ("JPEG", "WEBP", "PNG", "TIFF") else 1
    if orientation not in (None, 1):
        # Rare in curated shards: decode fully so the box is chosen in the displayed frame.
        image = ImageOps.exif_transpose(image)
    return image


def decode_rgb(data: bytes) -> Image.Image:
    """Full decode to RGB (the plain path; preflight and tests use it)."""
    image = to_rgb(open_image(data))
    image.load()
    return image


def sample_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box ``(left, top, w, h)`` for a width x height image, drawn from ``rng``.

    The same algorithm as ``torchvision.transforms.RandomResizedCrop.get_params``: ten tries of
    an area uniform in ``scale`` and a log-uniform aspect ratio, then a clamped center crop.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def crop_resize(image: Image.Image, box: tuple[float, float, float, float], size: int, fast: bool = True,
                data: bytes | None = None) -> torch.Tensor:
    """Crop ``box`` (left, top, w, h in full-resolution pixels), resize it to size x size RGB, and
    return uint8 (3, size, size). Resampling is bilinear and antialiased, as torchvision's.

    With ``fast``, a JPEG whose box is at least twice ``size`` is decoded at the smallest DCT scale
    that still gives ``size`` pixels across the box (PIL ``draft``); a smaller box is decoded by
    torchvision's libjpeg-turbo decoder (``data``, the encoded bytes) and only the box resampled.
    """
    left, top, w, h = box
    full_width, full_height = image.size
    if fast and image.format == "JPEG":
        if min(w, h) >= 2 * size:
            reduction = min(w, h) / size  # the largest shrink that keeps the box >= size
            image.draft("RGB" if image.mode == "RGB" else None,
                        (math.ceil(full_width / reduction), math.ceil(full_height / reduction)))
        elif data is not None:
            try:
                decoded = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            except RuntimeError:
                decoded = None  # a JPEG libjpeg-turbo refuses through this path: PIL below
            if decoded is not None:
                y0, x0 = round(top), round(left)
                return resized_crop(decoded, y0, x0, round(top + h) - y0, round(left + w) - x0, [size, size],
                                    antialias=True)
    sx, sy = image.size[0] / full_width, image.size[1] / full_height
    image = to_rgb(image).resize(
        (size, size), Image.Resampling.BILINEAR, box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy)
    )
    return pil_to_uint8(image)


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


class TrainTransform:
    """Decode + RandomResizedCrop + flip (+ optional RandAugment) -> uint8 (3, size, size)."""

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        randaugment: str | None = None,
        fast: bool = True,
    ):
        self.size, self.scale, self.ratio, self.hflip, self.fast = size, tuple(scale), tuple(ratio), hflip, fast
        self.randaugment = None
        if randaugment:
            from torchvision.transforms import v2

            num_ops, magnitude = (int(v) for v in randaugment.split(","))
            self.randaugment = v2.RandAugment(num_ops=num_ops, magnitude=magnitude)

    def __call__(self, data: bytes, rng: random.Random) -> torch.Tensor:
        image = open_image(data)
        box = sample_crop_box(*image.size, self.scale, self.ratio, rng)
        tensor = crop_resize(image, box, self.size, self.fast, data)
        if rng.random() < self.hflip:
            tensor = tensor.flip(-1)
        if self.randaugment is not None:
            # torchvision draws from the global RNG: seed a forked one from this sample's rng.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(rng.getrandbits(63))
                tensor = self.randaugment(tensor)
        return tensor


class EvalTransform:
    """Resize the shorter side to size / crop_pct, center-crop size -> uint8 (3, size, size)."""

    def __init__(self, size: int, crop_pct: float = 0.875, fast: bool = True):
        self.size, self.crop_pct, self.fast = size, crop_pct, fast

    def __call__(self, data: bytes, rng: random.Random | None = None) -> torch.Tensor:
        image = open_image(data)
        width, height = image.size
        side = min(width, height) * self.crop_pct  # the center box that maps to size x size
        box = ((width - side) / 2, (height - side) / 2, side, side)
        return crop_resize(image, box, self.size, self.fast, data)


def baseline_train_transform(size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5) -> Callable:
    """The plain path: PIL decode + convert('RGB') + torchvision RandomResizedCrop + flip."""
    from torchvision.transforms import v2

    crop = v2.Compose([v2.RandomResizedCrop(size, scale=scale, ratio=ratio, antialias=True), v2.RandomHorizontalFlip(hflip)])

    def transform(data: bytes, rng: random.Random | None = None) -> torch.Tensor:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        return v2.functional.pil_to_tensor(crop(image))

    return transform


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
