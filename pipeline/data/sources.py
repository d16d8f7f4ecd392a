"""Image sources for shard writing: scikit-learn's digits, synthetic JPEGs, an image folder (by
class, or unlabelled), or a CSV list (with labels, or without)."""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

IMAGE_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


@dataclass
class Item:
    """One source sample: a key, a label index (None: unlabelled) and a way to read its encoded bytes."""

    key: str
    label: int | None
    ext: str  # "jpg", "png" or "webp"
    read: Callable[[], bytes]
    origin: str  # where it came from, for messages


@dataclass
class Source:
    items: list[Item]
    classes: list[str]
    description: str


def open_source(spec: str) -> Source:
    """``digits``, ``synthetic:N[xSIDE]``, ``imagefolder:PATH``, ``images:PATH`` or ``list:FILE.csv``."""
    kind, _, arg = spec.partition(":")
    if kind == "digits" and not arg:
        return digits_source()
    if kind == "synthetic" and re.fullmatch(r"\d+(x\d+)?", arg):
        count, _, side = arg.partition("x")
        return synthetic_source(int(count), int(side or 64))
    if kind == "imagefolder" and arg:
        return imagefolder_source(Path(arg))
    if kind == "images" and arg:
        return images_source(Path(arg))
    if kind == "list" and arg:
        return list_source(Path(arg))
    raise ValueError(f"unknown --source '{spec}': use digits, synthetic:N[xSIDE], imagefolder:PATH, images:PATH or "
                     "list:FILE.csv")


def digits_source() -> Source:
    """scikit-learn's bundled 8x8 digits (1,797 images), stored losslessly as grayscale PNG."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are 0..16; spread them over 0..255 exactly (16 * 255 / 16 = 255).
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)

    def reader(image: np.ndarray) -> Callable[[], bytes]:
        def read() -> bytes:
            buffer = io.BytesIO()
            Image.fromarray(image, mode="L").save(buffer, format="PNG")
            return buffer.getvalue()

        return read

    items = [
        Item(f"digits-{i:05d}", int(label), "png", reader(pixels[i]), f"digits[{i}]")
        for i, label in enumerate(digits.target)
    ]
    return Source(items, [str(c) for c in digits.target_names], "scikit-learn digits")


def synthetic_source(count: int, side: int = 64, num_classes: int = 10) -> Source:
    """``count`` JPEGs of ``side`` px, made from the seed alone (nothing to download): noise around
    a per-class colour, so a model can learn them. For GPU checks and benchmarks."""
    from PIL import Image

    colours = np.random.default_rng(0).integers(40, 216, size=(num_classes, 3))

    def reader(index: int, label: int) -> Callable[[], bytes]:
        def read() -> bytes:
            noise = np.random.default_rng(index).normal(0, 30, size=(side, side, 3))
            buffer = io.BytesIO()
            pixels = np.clip(colours[label] + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
            return buffer.getvalue()

        return read

    items = [Item(f"synthetic-{i:07d}", i % num_classes, "jpg", reader(i, i % num_classes), f"synthetic[{i}]")
             for i in range(count)]
    return Source(items, [f"class{c}" for c in range(num_classes)], f"synthetic {count} x {side} px")


def imagefolder_source(root: Path) -> Source:
    """ImageNet-style ``root/CLASS/*.jpg``; labels are indices of the sorted class names."""
    if not root.is_dir():
        raise FileNotFoundError(f"imagefolder: '{root}' is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"imagefolder: '{root}' has no class sub-directories")
    items = []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            ext = IMAGE_EXTENSIONS.get(path.suffix.lower())
            if ext and path.is_file():
                key = f"{name}/{path.relative_to(root / name).with_suffix('')}"
                items.append(Item(_safe_key(key), label, ext, path.read_bytes, str(path)))
    if not items:
        raise ValueError(f"imagefolder: no images ({', '.join(IMAGE_EXTENSIONS)}) under '{root}'")
    return Source(items, classes, f"imagefolder:{root}")


def images_source(root: Path) -> Source:
    """Every image under ``root``, at any depth, without labels (a crawl, for an objective that
    needs none)."""
    if not root.is_dir():
        raise FileNotFoundError(f"images: '{root}' is not a directory")
    items = [Item(_safe_key(str(path.relative_to(root).with_suffix(""))), None, IMAGE_EXTENSIONS[path.suffix.lower()],
                  path.read_bytes, str(path))
             for path in sorted(root.rglob("*")) if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()]
    if not items:
        raise ValueError(f"images: no images ({', '.join(IMAGE_EXTENSIONS)}) under '{root}'")
    return Source(items, [], f"images:{root}")


def list_source(csv_path: Path) -> Source:
    """A CSV of ``path,label`` rows (an optional header), or of ``path`` rows alone (unlabelled);
    paths relative to the CSV's folder. Integer labels are used as they are; otherwise labels are
    class names, indexed sorted."""
    if not csv_path.is_file():
        raise FileNotFoundError(f"list: '{csv_path}' not found")
    with csv_path.open(newline="") as f:
        rows = [row for row in csv.reader(f) if row and not row[0].startswith("#")]
    if rows and rows[0][-1].strip().lower() in ("label", "path"):
        rows = rows[1:]
    fields = len(rows[0]) if rows else 2
    for number, row in enumerate(rows, 1):
        if len(row) != fields or fields not in (1, 2):
            raise ValueError(f"{csv_path}: row {number} has {len(row)} fields, expected path,label (or path alone, on "
                             f"every row): {row}")
    labels = [row[1].strip() for row in rows] if fields == 2 else []
    if fields == 1:
        indices, classes = [None] * len(rows), []
    elif all(label.lstrip("-").isdigit() for label in labels):
        indices = [int(label) for label in labels]
        classes = [str(c) for c in range(max(indices) + 1)] if indices else []
    else:
        classes = sorted(set(labels))
        indices = [classes.index(label) for label in labels]
    items = []
    for (path_text, *_), label in zip(rows, indices):
        path = (csv_path.parent / path_text.strip()).resolve()
        ext = IMAGE_EXTENSIONS.get(path.suffix.lower())
        if ext is None:
            raise ValueError(f"{csv_path}: '{path_text}' is not a .jpg, .png or .webp file")
        items.append(Item(_safe_key(path_text.strip().rsplit(".", 1)[0]), label, ext, path.read_bytes, str(path)))
    return Source(items, classes, f"list:{csv_path}")


def _safe_key(key: str) -> str:
    # WebDataset splits a member name at its first dot: keep dots out of keys.
    return key.replace(".", "_").replace("\\", "/")
