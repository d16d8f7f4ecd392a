"""Preflight: read every shard of a dataset folder before a job is queued on it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from pipeline.data.shards import resolve_shards, shard_advice
from pipeline.data.tarindex import ordered_map
from pipeline.data.stream import decode_sample
from pipeline.data.transforms import decode_rgb


@dataclass
class SplitReport:
    split: str
    shards: int
    samples: int
    expected: int
    classes: list[str] = field(default_factory=list)  # the manifest's class names
    histogram: Counter = field(default_factory=Counter)
    unreadable: list[tuple[str, str, str]] = field(default_factory=list)  # (shard, key, error)

    @property
    def ok(self) -> bool:
        return not self.unreadable and self.samples == self.expected


def check_shard(url: str, num_classes: int | None = None,
                labels: bool = True) -> tuple[int, Counter, list[tuple[str, str, str]]]:
    """Read and decode every sample of one shard: (samples, label histogram, unreadable); the
    labels of an unlabelled split are not looked for."""
    samples, histogram, unreadable, key = 0, Counter(), [], None
    try:
        for sample in wds.tarfile_samples([{"url": url}]):
            key = sample.get("__key__")
            samples += 1
            try:
                _, label = decode_sample(sample, lambda data, rng: decode_rgb(data), None, num_classes, labels)
                histogram[label] += 1
            except Exception as e:  # noqa: BLE001 - every failure is reported
                unreadable.append((url, key, str(e)))
    except Exception as e:  # noqa: BLE001
        unreadable.append((url, f"after {key}", f"unreadable tar: {e}"))
    return samples, histogram, unreadable


def check_split(manifest_path: Path, progress: bool = True, num_classes: int | None = None,
                procs: int = 1) -> SplitReport:
    """Every shard of one split, in ``procs`` processes; shards are merged in order, so the report
    is the same for any ``procs``."""
    shards = resolve_shards(str(manifest_path))
    report = SplitReport(manifest_path.stem, len(shards.urls), 0, shards.num_samples or 0, shards.classes)
    check = partial(check_shard, num_classes=num_classes, labels=shards.labelled is not False)
    with ordered_map(check, shards.urls, procs) as results:
        for samples, histogram, unreadable in tqdm(results, total=len(shards.urls), desc=f"check {report.split}",
                                                   unit="shard", disable=not progress):
            report.samples += samples
            report.histogram.update(histogram)
            report.unreadable += unreadable
    return report


def preflight(directory: str | Path, world_size: int = 1, workers: int = 1, progress: bool = True,
              num_classes: int | None = None, procs: int = 1) -> tuple[bool, str]:
    """Check every ``{split}.json`` in ``directory`` with ``procs`` processes; with ``num_classes``,
    a label outside ``[0, num_classes)`` is a bad sample. Returns (ok, a readable report)."""
    directory = Path(directory)
    manifests = sorted(directory.glob("*.json"))
    if not manifests:
        return False, f"no shard manifests (*.json) in '{directory}'"
    lines, ok = [], True
    for path in manifests:
        report = check_split(path, progress, num_classes, procs)
        classes = report.classes
        ok &= report.ok
        lines.append(f"{report.split}: {report.samples:,} samples in {report.shards} shards "
                     f"(manifest: {report.expected:,}){'' if report.samples == report.expected else '  MISMATCH'}")
        if -1 in report.histogram:
            lines.append("  unlabelled (no .cls): for an objective that needs no labels (objective=mae)")
        else:
            counts = ", ".join(f"{classes[c] if c < len(classes) else c}: {n}"
                               for c, n in sorted(report.histogram.items()))
            lines.append(f"  classes ({len(report.histogram)}): {counts}")
        lines.append("  " + shard_advice(report.expected, report.shards, world_size, workers))
        lines.append(f"  unreadable{' or out of range' if num_classes else ''}: {len(report.unreadable)}")
        lines += [f"    {shard} key={key}: {error}" for shard, key, error in report.unreadable[:50]]
    lines.append("preflight: OK" if ok else "preflight: FAILED")
    return ok, "\n".join(lines)
