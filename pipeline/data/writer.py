"""Write WebDataset shards and their manifests: ``DIR/{split}-NNNNNN.tar`` + ``DIR/{split}.json``."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import random
from contextlib import ExitStack
from pathlib import Path

import webdataset as wds
from PIL import Image, ImageOps
from tqdm import tqdm

from pipeline.data.shards import DEFAULT_MAX_COUNT
from pipeline.data.tarindex import index_shard, ordered_map, sidecar_path, write_sidecar
from pipeline.data.sources import Item, Source

log = logging.getLogger(__name__)


TAR_BLOCK = 512
TAR_END = 2 * TAR_BLOCK  # two zero blocks close a tar
TAR_RECORD = 20 * TAR_BLOCK  # and the file is padded to whole records


def _tar_member_size(num_bytes: int) -> int:
    return TAR_BLOCK + -(-num_bytes // TAR_BLOCK) * TAR_BLOCK


def split_items(items: list[Item], val_fraction: float, seed: int) -> dict[str, list[Item]]:
    """A deterministic train/val split. Train is shuffled (so shards mix classes); val keeps order."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    num_val = round(len(items) * val_fraction)
    val = sorted(order[:num_val])
    splits = {"train": [items[i] for i in order[num_val:]]}
    if num_val:
        splits["val"] = [items[i] for i in val]
    return splits


def reencode(data: bytes, ext: str, max_side: int) -> tuple[bytes, str]:
    """Shrink an image whose longer side exceeds ``max_side`` (JPEG q=90); others pass as they are."""
    with Image.open(io.BytesIO(data)) as image:
        if max(image.size) <= max_side:
            return data, ext
        image = ImageOps.exif_transpose(image)  # re-encoding drops EXIF: apply its orientation now
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS, reducing_gap=3.0)
        if image.mode not in ("RGB", "L"):
            from pipeline.data.transforms import to_rgb

            image = to_rgb(image)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=90)
        return out.getvalue(), "jpg"


_JOB: tuple[list[Item], int | None] | None = None  # (items, max_side), inherited by forked workers


def _prepare(index: int) -> tuple[bytes, str] | str:
    """Item ``index``'s bytes, re-encoded if too large: (data, ext), or why it is unreadable."""
    items, max_side = _JOB
    item = items[index]
    try:
        data, ext = item.read(), item.ext
        if not data:
            raise ValueError("empty file")
        return reencode(data, ext, max_side) if max_side else (data, ext)
    except Exception as e:  # noqa: BLE001 - any unreadable input is reported and skipped
        return str(e)


def write_split(
    items: list[Item],
    out_dir: Path,
    split: str,
    classes: list[str],
    *,
    max_count: int = DEFAULT_MAX_COUNT,
    max_bytes: float = 1e9,
    max_side: int | None = None,
    source: str = "",
    progress: bool = True,
    procs: int = 1,
) -> dict:
    """Write one split's shards and manifest; returns the manifest. Unreadable inputs are skipped
    and listed in the manifest under ``skipped``.

    ``procs`` processes read and re-encode the items, in order, while this one writes: the output
    is byte-identical for any ``procs``. Each completed shard is recorded in
    ``DIR/.{split}.progress.json``; the same call after a crash resumes after the last completed
    shard (the items before it are not read again)."""
    global _JOB
    out_dir.mkdir(parents=True, exist_ok=True)
    progress_path = out_dir / f".{split}.progress.json"
    labelled = any(item.label is not None for item in items)
    digest = hashlib.sha256(json.dumps([split, max_count, max_bytes, max_side, labelled]).encode())
    for item in items:  # one key at a time: a split may hold millions
        digest.update(item.key.encode() + b"\0")
    fingerprint = digest.hexdigest()
    counts: dict[str, int] = {}
    skipped: list[dict] = []
    start = 0
    if progress_path.exists():
        saved = json.loads(progress_path.read_text())
        if saved["fingerprint"] == fingerprint:
            counts, skipped, start = saved["counts"], saved["skipped"], saved["next"]
            log.warning("%s: resuming after %d complete shards (%d of %d items done)", split, len(counts), start,
                        len(items))
        else:
            log.warning("%s: %s is from other arguments: starting over", split, progress_path)
    for stale in out_dir.glob(f"{split}-*.tar"):
        if stale.name not in counts:
            stale.unlink()
            sidecar_path(stale).unlink(missing_ok=True)
    # The shard is rolled over here, on true tar sizes: ShardWriter's maxsize counts payload bytes
    # only, and for small images the 512-byte tar headers and padding are most of the file.
    writer = wds.ShardWriter(str(out_dir / f"{split}-%06d.tar"), maxcount=float("inf"), maxsize=float("inf"), verbose=0,
                             mtime=0,  # a fixed integer mtime: reproducible shards, no PAX header per member
                             start_shard=len(counts))
    shard_bytes = TAR_END
    _JOB = (items, max_side)
    with ExitStack() as stack:
        prepared = stack.enter_context(ordered_map(_prepare, range(start, len(items)), procs, chunksize=8))
        stack.callback(writer.close)
        bar = stack.enter_context(tqdm(total=len(items), initial=start, desc=f"{split} shards", unit="img",
                                       disable=not progress))
        for index, result in enumerate(prepared, start):
            bar.update(1)
            item = items[index]
            if isinstance(result, str):
                log.warning("skipping %s: %s", item.origin, result)
                skipped.append({"origin": item.origin, "error": result})
                continue
            data, ext = result
            sample = {"__key__": item.key, ext: data}
            if item.label is not None:
                sample["cls"] = str(item.label).encode()
            size = sum(_tar_member_size(len(v)) for k, v in sample.items() if k != "__key__")
            too_big = -(-(shard_bytes + size) // TAR_RECORD) * TAR_RECORD > max_bytes
            if writer.count and (writer.count >= max_count or too_big):
                closed = Path(writer.fname).name
                writer.next_stream()  # closes the shard: index it (its headers are in the page cache), record it
                write_sidecar(out_dir / closed)
                partial = progress_path.with_suffix(".tmp")  # replaced whole: a crash mid-write keeps the last one
                partial.write_text(json.dumps({"fingerprint": fingerprint, "next": index, "counts": counts,
                                               "skipped": skipped}))
                os.replace(partial, progress_path)
                shard_bytes = TAR_END
            writer.write(sample)
            shard_bytes += size
            name = Path(writer.fname).name
            counts[name] = counts.get(name, 0) + 1
    _JOB = None
    for shard in counts:  # the last shard, and any a crash left without its index
        if not sidecar_path(out_dir / shard).exists():
            write_sidecar(out_dir / shard)
    manifest = {
        "split": split,
        "num_samples": sum(counts.values()),
        "num_classes": len(classes),
        "classes": classes,
        "labelled": labelled,
        "shards": [
            {"url": name, "num_samples": n, "num_bytes": (out_dir / name).stat().st_size} for name, n in counts.items()
        ],
        "source": source,
        "skipped": skipped,
    }
    write_manifest(out_dir, manifest)
    progress_path.unlink(missing_ok=True)
    return manifest


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    path = out_dir / f"{manifest['split']}.json"
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return path


def index_shards(directory: str | Path, split: str | None = None, progress: bool = True) -> dict[str, dict]:
    """Write ``DIR/{split}.json`` for the ``*.tar`` shards of ``directory`` that have no manifest
    (made by img2dataset or earlier WebDataset jobs), from their tar headers and ``.cls`` files
    alone: no image byte is read. The split is the file name up to its first '-'
    (``train-000123.tar``), or ``split`` for all of them. Classes are the label indices found
    (names unknown). Returns the manifests written; a split that has one already is left as it is."""
    directory = Path(directory)
    tars = sorted(directory.glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"no .tar shards in '{directory}'")
    groups: dict[str, list[Path]] = {}
    for tar in tars:
        name = split or (tar.name.split("-", 1)[0] if "-" in tar.name else None)
        if not name:
            raise ValueError(f"cannot tell the split of '{tar}': name shards SPLIT-NNNNNN.tar, or pass --split")
        groups.setdefault(name, []).append(tar)
    written = {}
    for name, files in groups.items():
        if (directory / f"{name}.json").exists():
            unindexed = [tar for tar in files if not sidecar_path(tar).exists()]
            log.warning("%s has a manifest already: left as it is%s", directory / f"{name}.json",
                        f"; writing the sample indexes of its {len(unindexed)} shards without one" if unindexed else "")
            for tar in tqdm(unindexed, desc=f"index {name}", unit="shard", disable=not progress):
                write_sidecar(tar)
            continue
        shards, labels = [], set()
        for tar in tqdm(files, desc=f"index {name}", unit="shard", disable=not progress):
            count, found = index_shard(str(tar))
            shards.append({"url": tar.name, "num_samples": count, "num_bytes": tar.stat().st_size})
            labels |= found
        num_classes = max(labels) + 1 if labels else 0
        manifest = {"split": name, "num_samples": sum(s["num_samples"] for s in shards), "num_classes": num_classes,
                    "classes": [str(i) for i in range(num_classes)], "labelled": bool(labels), "shards": shards,
                    "source": f"indexed from the tar headers of {directory}", "skipped": []}
        write_manifest(directory, manifest)
        written[name] = manifest
    return written


def write_shards(
    source: Source,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    max_count: int = DEFAULT_MAX_COUNT,
    max_bytes: float = 1e9,
    max_side: int | None = None,
    progress: bool = True,
    procs: int = 1,
    unlabelled: bool = False,
    train_fraction: float = 1.0,
) -> dict[str, dict]:
    """Split ``source`` and write each split's shards under ``out_dir``; returns the manifests.
    ``unlabelled``: leave the labels out (no ``.cls``), for an objective that needs none.
    ``train_fraction``: keep that share of the train split (seeded: the first of its shuffled
    order), for a fine-tune on a few labels; the val split is whole."""
    if not 0.0 < train_fraction <= 1.0:
        raise ValueError(f"--train-fraction must be in (0, 1], got {train_fraction}")
    out_dir = Path(out_dir)
    splits = split_items(source.items, val_fraction, seed)
    splits["train"] = splits["train"][:max(1, round(len(splits["train"]) * train_fraction))]
    if unlabelled:
        splits = {name: [dataclasses.replace(item, label=None) for item in items] for name, items in splits.items()}
    classes = [] if unlabelled else source.classes
    return {
        split: write_split(
            items, out_dir, split, classes, max_count=max_count, max_bytes=max_bytes,
            max_side=max_side, source=source.description, progress=progress, procs=procs,
        )
        for split, items in splits.items()
    }
