"""Shard specs and manifests: what a ``data.*_shards`` setting names (URLs, sample counts,
class names, sizes), and how shards suit the streams that read them.

A spec is a manifest (``DIR/train.json``), a path or brace pattern (``train-{000000..000099}.tar``),
or a ``pipe:`` command for object stores (``pipe:aws s3 cp s3://b/train-000000.tar -``). Reading
the tars themselves is :mod:`pipeline.data.tarindex`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand
from pydantic import ByteSize

from pipeline.errors import MissingInput, WrongInput

DEFAULT_MAX_COUNT = 10_000  # samples per shard written (make_shards.py --max-count)


@dataclass
class ShardSet:
    urls: list[str]
    counts: list[int] | None = None  # samples per shard, when a manifest gives them
    classes: list[str] = field(default_factory=list)
    spec: str = ""
    sizes: list[int] | None = None  # bytes per shard, when a manifest gives them
    manifest: dict | None = None  # the manifest as read, when the spec is one
    digest: str | None = None  # of the manifest's bytes (sha256, 10 hex digits)

    @property
    def num_samples(self) -> int | None:
        return sum(self.counts) if self.counts is not None else None

    @property
    def labelled(self) -> bool | None:
        """Whether the samples carry labels (``.cls``), as the manifest says (older manifests,
        written before unlabelled shards existed, always did); None without a manifest."""
        return None if self.manifest is None else bool(self.manifest.get("labelled", True))

    @property
    def sample_bytes(self) -> float | None:
        """Mean bytes a sample takes in the tars (its members and their headers), if known."""
        if self.sizes is None or not self.num_samples:
            return None
        return sum(self.sizes) / self.num_samples


def _is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url


def is_seekable(url: str) -> bool:
    """Whether a shard can be opened at a sample without reading what comes before it."""
    return _is_local(url)


def _relative_to(base: Path, url: str) -> str:
    """Manifest URLs are relative to the manifest's folder unless absolute or remote."""
    return str(base / url) if _is_local(url) and not os.path.isabs(url) else url


def resolve_shards(spec: str, *, check_exists: bool = True) -> ShardSet:
    """Expand ``spec``; with ``check_exists``, a missing local shard is an error naming it."""
    if not spec:
        raise WrongInput("no shards given (set data.train_shards / data.eval_shards)")
    if spec.endswith(".json") and _is_local(spec):
        path = Path(spec)
        if not path.is_file():
            raise MissingInput(f"shard manifest '{spec}' not found (write shards with launch/make_shards.py)")
        try:
            text = path.read_bytes()
            manifest = json.loads(text)
            urls = [_relative_to(path.parent, u["url"]) for u in manifest["shards"]]
            sizes = [u.get("num_bytes") for u in manifest["shards"]]
            counts = [int(u["num_samples"]) for u in manifest["shards"]]
            classes = list(manifest.get("classes", []))
        except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as e:
            raise WrongInput(f"shard manifest '{spec}' is not one make_shards.py writes ({type(e).__name__}: {e}): "
                             f"re-create it with launch/make_shards.py --index") from None
        if any(count < 0 for count in counts):
            raise WrongInput(f"shard manifest '{spec}' gives a negative sample count")
        shards = ShardSet(urls, counts, classes, spec, sizes if None not in sizes else None, manifest,
                          hashlib.sha256(text).hexdigest()[:10])
    else:
        urls = [url for part in spec.split("::") for url in braceexpand.braceexpand(part)]
        shards = ShardSet(urls, None, [], spec)
    if not shards.urls:
        raise WrongInput(f"no shards in '{spec}'")
    if check_exists:
        check_exist(shards)
    return shards


def shuffle_samples(buffer: int, shards: ShardSet) -> int:
    """``data.shuffle_buffer`` in samples: a count as given; a size in bytes (pydantic's ByteSize,
    written with a unit) divided by the mean sample size of the shards' manifest."""
    if not isinstance(buffer, ByteSize):
        return int(buffer)
    if shards.sample_bytes is None:
        raise ValueError(f"data.shuffle_buffer is a size ({int(buffer):,} bytes), but '{shards.spec}' has no manifest "
                         f"with shard sizes to turn it into samples: give a sample count, or write a manifest "
                         f"(make_shards.py --index DIR)")
    return max(1, int(buffer // shards.sample_bytes)) if buffer else 0


def logical_workers(num_workers: int) -> int:
    """The streams one rank reads: one per DataLoader worker, one in the rank's process without workers."""
    return max(num_workers, 1)


def stream_count(world_size: int, num_workers: int) -> int:
    """The streams of a split: ``world_size`` ranks x their logical workers."""
    return world_size * logical_workers(num_workers)


def shards_for_streams(num_shards: int, world_size: int, workers: int) -> str:
    """How ``num_shards`` serve the training streams of ``world_size`` ranks x ``workers``
    workers, in one sentence (the trainer logs it, the dry run prints it)."""
    streams = stream_count(world_size, workers)
    head = f"{num_shards:,} shards for {world_size} ranks x {logical_workers(workers)} workers = {streams:,} streams"
    if num_shards >= streams:
        return f"{head}, {num_shards / streams:.1f} shards each"
    return (f"{head}. Shards are resampled: each stream draws shards at random, with replacement, so streams may "
            f"read the same shard at the same time; samples still come in their seeded order and resume exactly. "
            f"More shards than streams mix better (make_shards.py --world-size/--workers prints a count).")


def suggest_shards(num_samples: int, streams: int, max_count: int = DEFAULT_MAX_COUNT) -> tuple[int, int]:
    """(shards, samples per shard) that suit ``streams`` readers (ranks x workers): a multiple of
    the stream count, so evaluation gives every stream whole shards and training streams rarely
    read the same shard at once, with at most ``max_count`` samples per shard."""
    shards = streams * max(1, -(-num_samples // (streams * max_count)))
    return shards, max(1, -(-num_samples // shards))


def shard_advice(num_samples: int, num_shards: int, world_size: int, workers: int) -> str:
    """One line on how ``num_shards`` suit ``world_size`` ranks x ``workers`` workers."""
    streams = stream_count(world_size, workers)
    shards, per_shard = suggest_shards(num_samples, streams)
    verdict = "suits it" if num_shards >= streams and num_shards % streams == 0 else (
        "works (resampled training and exact evaluation take any count)")
    return (f"{num_shards} shards for {world_size} ranks x {logical_workers(workers)} workers = {streams} streams: "
            f"{verdict}; a count that suits them: {shards} shards (make_shards.py --max-count {per_shard})")


def check_exist(shards: ShardSet) -> None:
    """Raise FileNotFoundError naming a missing local shard (files are not opened)."""
    local = [u for u in shards.urls if _is_local(u)]
    missing = [u for u in local if not os.path.isfile(u)]
    if missing and len(missing) == len(local) and len(local) > 1:
        raise MissingInput(f"no shard matches '{shards.spec}' (first expected: {missing[0]})")
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise MissingInput(f"missing shard '{missing[0]}'{more} (from '{shards.spec}')")
