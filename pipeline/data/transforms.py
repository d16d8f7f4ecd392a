"""Decoding and augmentation: every image to 3-channel RGB, a fast RandomResizedCrop, eval crops.

The fast path chooses the crop box from the image header first (an upright JPEG's is read by
libjpeg-turbo, PIL's parser costs ~20 us); libjpeg-turbo (simplejpeg) then decodes a JPEG at the
smallest DCT scale (1, 1/2, 1/4, 1/8) that still gives the target size across the box, and only
the box is resampled (torch, bilinear, antialiased). The box distribution is exactly
RandomResizedCrop's. With ``data.decode: gpu`` the workers leave JPEGs encoded and
:class:`pipeline.data.device.BatchFinisher` finishes them on the device. Transforms take encoded
bytes and a ``random.Random`` and return a uint8 tensor (3, S, S); normalisation happens on the
device (:mod:`pipeline.data.device`).
"""

from __future__ import annotations

import io
import logging
import math
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torchvision.transforms.v2.functional import resized_crop

from pipeline.data.batch import TrainBatch

log = logging.getLogger(__name__)
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


def jpeg_head(data: bytes) -> bytes | None:
    """A JPEG's segments before its first scan (SOI up to SOS), found by walking the segment
    lengths; None where ``data`` is no JPEG or the walk fails."""
    if not data.startswith(b"\xff\xd8"):
        return None
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
        elif marker == 0xDA:
            return data[:at]
        else:
            at += 2 + int.from_bytes(data[at + 2:at + 4], "big")
    return None


@dataclass(frozen=True)
class Encoded:
    """Encoded image bytes with the displayed size from their header. ``jpeg``: libjpeg-turbo
    decodes them straight to upright RGB (a YCbCr, RGB or grayscale JPEG, not EXIF-rotated).
    An upright JPEG with no EXIF or XMP block is read by libjpeg-turbo alone (``image`` None:
    ~1 us against PIL's ~20); anything else is opened by PIL (:func:`open_image`)."""

    data: bytes
    size: tuple[int, int]  # (width, height)
    jpeg: bool
    image: Image.Image | None = None

    @classmethod
    def read(cls, data: bytes) -> "Encoded":
        head = jpeg_head(data)
        if head is not None and b"Exif\0\0" not in head and b"Orientation" not in head:
            try:
                height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
            except ValueError:
                colorspace = None  # PIL says what is wrong
            if colorspace in ("YCbCr", "RGB", "Gray"):
                return cls(data, (width, height), True)
        image = open_image(data)
        return cls(data, image.size, image.format == "JPEG" and image.mode in ("RGB", "L"), image)

    def pil(self) -> Image.Image:
        return self.image if self.image is not None else open_image(self.data)


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


def dct_reduction(shrink: float) -> int:
    """The largest of libjpeg-turbo's fast DCT reductions (1, 2, 4, 8) that is at most ``shrink``.
    The other scales (7/8 ... 3/8) decode slower than the full image, so they are not used."""
    reduction = 1
    while reduction < 8 and shrink >= 2 * reduction:
        reduction *= 2
    return reduction


def decode_jpeg_scaled(data: bytes, width: int, height: int, shrink: float) -> np.ndarray | None:
    """A JPEG of ``width`` x ``height`` decoded to RGB (H, W, 3) uint8 by libjpeg-turbo (simplejpeg)
    at the smallest fast DCT scale that shrinks by at most ``shrink`` (:func:`dct_reduction`);
    None where it refuses the file (CMYK, damaged): the caller falls back to PIL."""
    reduction = dct_reduction(shrink)
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", min_factor=reduction,
                                      min_height=math.ceil(height / reduction), min_width=math.ceil(width / reduction))
    except ValueError:
        return None


def resize_box(image: torch.Tensor, top: int, left: int, height: int, width: int, size: int) -> torch.Tensor:
    """uint8 (3, H, W) -> the box resampled to (3, size, size), bilinear and antialiased. On the
    CPU, torch's native uint8 kernel, called directly (torchvision's ``resized_crop`` dispatch is
    ~4% of a 500x375 image's time) on the box copied to channels-last memory, the layout its
    vectorised path reads (a strided view costs ~25% more than the copy); on a GPU,
    ``resized_crop``, which resamples uint8 in float32."""
    if image.device.type != "cpu":
        return resized_crop(image, top, left, height, width, [size, size], antialias=True)
    box = image[:, top:top + height, left:left + width].unsqueeze(0).contiguous(memory_format=torch.channels_last)
    return F.interpolate(box, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def crop_resize(source: Encoded, box: tuple[float, float, float, float], size: int, fast: bool = True) -> torch.Tensor:
    """Crop ``box`` (left, top, w, h in full-resolution pixels) of ``source``, resize it to
    size x size RGB, and return uint8 (3, size, size). Resampling is bilinear and antialiased, as
    torchvision's.

    With ``fast``, a JPEG libjpeg-turbo decodes is decoded at the smallest DCT scale that keeps
    ``size`` pixels across the box (:func:`decode_jpeg_scaled`), and only the box is resampled,
    by torch; the box's edges fall on that scale's pixel grid (within half a scaled pixel: at
    most 4 full-resolution pixels at 1/8). Anything else goes through PIL.
    """
    left, top, w, h = box
    full_width, full_height = source.size
    decoded = decode_jpeg_scaled(source.data, full_width, full_height, min(w, h) / size) \
        if fast and source.jpeg else None
    if decoded is not None:
        sy, sx = decoded.shape[0] / full_height, decoded.shape[1] / full_width
        y0, x0 = round(top * sy), round(left * sx)
        return resize_box(torch.from_numpy(decoded).permute(2, 0, 1), y0, x0, round((top + h) * sy) - y0,
                          round((left + w) * sx) - x0, size)
    image = to_rgb(source.pil()).resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
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
        return self.augment(Encoded.read(data), rng)

    def augment(self, source: Encoded, rng: random.Random) -> torch.Tensor:
        box = sample_crop_box(*source.size, self.scale, self.ratio, rng)
        tensor = crop_resize(source, box, self.size, self.fast)
        if rng.random() < self.hflip:
            tensor = tensor.flip(-1)
        if self.randaugment is not None:
            # torchvision draws from the global RNG: seed a forked one from this sample's rng.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(rng.getrandbits(63))
                tensor = self.randaugment(tensor)
        return tensor


@dataclass(frozen=True)
class JpegCrop:
    """A JPEG the worker leaves encoded (``data.decode: gpu``): its bytes, the crop box in whole
    pixels (top, left, height, width) and the flip, drawn as :class:`TrainTransform` draws them."""

    data: bytes
    box: tuple[int, int, int, int]
    flip: bool


def ends_whole(data: bytes) -> bool:
    """Whether JPEG bytes end with their end-of-image marker (trailing zero padding allowed): a
    truncated file does not, and libjpeg refuses it."""
    return data.rstrip(b"\0").endswith(b"\xff\xd9")


class DeviceTrainTransform(TrainTransform):
    """:class:`TrainTransform` for ``data.decode: gpu``: a whole RGB or grayscale JPEG
    upright as stored becomes a :class:`JpegCrop` (header read, box and flip drawn, nothing
    decoded); any other sample (PNG, WebP, CMYK, EXIF-rotated, truncated) is decoded here as
    on the CPU path, so corrupt samples are skipped and counted the same way."""

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5):
        super().__init__(size, scale, ratio, hflip)

    def __call__(self, data: bytes, rng: random.Random) -> torch.Tensor | JpegCrop:
        source = Encoded.read(data)
        if not source.jpeg or not ends_whole(data):
            return self.augment(source, rng)
        left, top, w, h = sample_crop_box(*source.size, self.scale, self.ratio, rng)
        return JpegCrop(data, (top, left, h, w), rng.random() < self.hflip)


def stack_images(images: list[torch.Tensor | JpegCrop], labels: list[int] | torch.Tensor) -> TrainBatch:
    """A training batch of ``images`` (uint8 tensors, or crops left encoded for
    :class:`BatchFinisher`) and their ``labels``."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    encoded = [i for i, image in enumerate(images) if isinstance(image, JpegCrop)]
    if not encoded:
        return TrainBatch(torch.stack(images), labels)
    decoded = sorted(set(range(len(images))) - set(encoded))
    return TrainBatch(
        images=torch.stack([images[i] for i in decoded]) if decoded else torch.zeros(0, dtype=torch.uint8),
        labels=labels,
        images_at=torch.tensor(decoded, dtype=torch.int64),
        jpeg=[torch.frombuffer(bytearray(images[i].data), dtype=torch.uint8) for i in encoded],
        jpeg_at=torch.tensor(encoded, dtype=torch.int64),
        jpeg_box=torch.tensor([images[i].box for i in encoded], dtype=torch.int64),
        jpeg_flip=torch.tensor([images[i].flip for i in encoded]),
    )


class EvalTransform:
    """Resize the shorter side to size / crop_pct, center-crop size -> uint8 (3, size, size)."""

    def __init__(self, size: int, crop_pct: float = 0.875, fast: bool = True):
        self.size, self.crop_pct, self.fast = size, crop_pct, fast

    def __call__(self, data: bytes, rng: random.Random | None = None) -> torch.Tensor:
        source = Encoded.read(data)
        width, height = source.size
        side = min(width, height) * self.crop_pct  # the center box that maps to size x size
        box = ((width - side) / 2, (height - side) / 2, side, side)
        return crop_resize(source, box, self.size, self.fast)


def baseline_train_transform(size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5) -> Callable:
    """The plain path: PIL decode + convert('RGB') + torchvision RandomResizedCrop + flip."""
    from torchvision.transforms import v2

    crop = v2.Compose([v2.RandomResizedCrop(size, scale=scale, ratio=ratio, antialias=True),
                       v2.RandomHorizontalFlip(hflip)])

    def transform(data: bytes, rng: random.Random | None = None) -> torch.Tensor:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        return v2.functional.pil_to_tensor(crop(image))

    return transform
