"""Training and evaluation streams over WebDataset shards.

Training: resampled shards seeded by (seed, rank, worker, epoch) -> tar samples -> shuffle buffer
-> decode + augment -> batches of uint8 tensors, all in DataLoader workers. Each batch carries its
worker's position so that the loader can save it and a restored loader yields exactly the batches
the uninterrupted run would have yielded (same world size and worker count). A restored worker
replays its shuffle over sample handles and reads only what was in its buffer
(:meth:`TrainStream.epoch_samples`).

Evaluation: every sample exactly once across ranks and workers, by global sample index; every
rank yields the same number of batches (padded and masked), so collective forwards never hang.
Streams get whole shards when there are at least as many shards as streams; otherwise a stream
opens a shard at its first sample from the tar headers, so no shard's bytes are read twice.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import random
from functools import partial
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.batch import EvalBatch, TrainBatch
from pipeline.data.shards import ShardSet, is_seekable, logical_workers, shuffle_samples, stream_count
from pipeline.data.tarindex import count_samples, shard_members, shard_samples
from pipeline.data.transforms import stack_images
from pipeline.data.workers import worker_options

log = logging.getLogger(__name__)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
MAX_CONSECUTIVE_SHARD_ERRORS = 50


def seed_of(*parts: int) -> int:
    """A well-mixed 63-bit seed from integer parts (the same in every process)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0]) >> 1


def decode_sample(sample: dict, transform: Callable, rng: random.Random | None,
                  num_classes: int | None = None, labels: bool = True) -> tuple[torch.Tensor, int]:
    """A tar sample -> (uint8 image (3, S, S), label). Raises ValueError naming what is missing
    or wrong, a label outside ``[0, num_classes)`` included (on a GPU it would be a device-side
    assert in the loss). Without ``labels`` (an objective that needs none) the label is -1."""
    image_key = next((k for k in IMAGE_KEYS if k in sample), None)
    if image_key is None:
        raise ValueError(f"no image (.{', .'.join(IMAGE_KEYS)}) in "
                         f"{sorted(k for k in sample if not k.startswith('__'))}")
    if not labels:
        return transform(sample[image_key], rng), -1
    if "cls" not in sample:
        raise ValueError("no label (.cls)")
    label = int(sample["cls"].decode("ascii").strip())
    if num_classes and not 0 <= label < num_classes:
        raise ValueError(f"label {label} outside [0, {num_classes}) (model.num_classes)")
    return transform(sample[image_key], rng), label


def _where(sample: dict) -> str:
    return f"key '{sample.get('__key__')}' in shard '{sample.get('__url__')}'"


class _ShardErrors:
    """webdataset handler: warn about an unreadable shard, count it, and give up if nothing reads."""

    def __init__(self):
        self.count = 0
        self.consecutive = 0
        self.events = 0  # shard reads that went other than the manifest says: a resume must read to replay

    def short(self, url: str, expected: int, got: int) -> None:
        """A shard that ended early (Python's streaming tar reader is silent about truncation)."""
        self.count += expected - got
        self.events += 1
        log.warning("shard '%s' gave %d of its %d samples (truncated?): %d skipped", url, got, expected, expected - got)

    def long(self, url: str, expected: int, got: int) -> None:
        """A shard with more samples than its manifest says (rewritten since it was indexed?)."""
        self.events += 1
        log.warning("shard '%s' holds at least %d samples, its manifest says %d: re-run make_shards.py --index",
                    url, got, expected)

    def __call__(self, exn: Exception) -> bool:
        self.count += 1
        self.events += 1
        self.consecutive += 1
        log.warning("unreadable shard data, skipped: %r", exn)
        if self.consecutive >= MAX_CONSECUTIVE_SHARD_ERRORS:
            raise RuntimeError(f"{self.consecutive} shard reads failed in a row; last: {exn!r}") from exn
        return True


def read_shards(sources: Iterator[tuple[str, int]], expected: dict[str, int], errors: _ShardErrors) -> Iterator[dict]:
    """Samples of each (shard, first sample) in turn; a shard shorter than its manifest count is
    reported. A local shard entered mid-way is read from that sample's byte offset on."""
    for url, skip in sources:
        got = 0
        try:
            samples = shard_samples(url, skip=skip, handler=errors) if skip else \
                wds.tarfile_samples([{"url": url}], handler=errors)
            for got, sample in enumerate(samples, start=1):
                if got == expected.get(url, -1) - skip + 1:
                    errors.long(url, expected[url], skip + got)
                yield sample
        except Exception as e:  # noqa: BLE001 - the handler decides (it gives up after many in a row)
            errors(e)
        if got < expected.get(url, 0) - skip:
            errors.short(url, expected[url] - skip, got)


def shuffled(data: Iterator, buf: list, bufsize: int, initial: int, rng: random.Random) -> Iterator:
    """webdataset's shuffle (``webdataset.filters._shuffle``: the same draws, hence the same
    order) over a buffer the caller holds. Stopped right after a yield and started again on the
    same buffer and RNG, it goes on exactly as it would have: so a replay over sample handles can
    hand its buffer, filled with the real samples, to the real stream."""
    initial = min(initial, bufsize)
    for sample in data:
        buf.append(sample)
        if len(buf) < bufsize:
            try:
                buf.append(next(data))
            except StopIteration:
                pass
        if len(buf) >= initial:
            yield wds.filters.pick(buf, rng)


class Position(NamedTuple):
    """Where a worker's stream stands: its epoch, the samples of the epoch it has read, the
    samples it skipped (unreadable), and whether the epoch read every shard without a failure
    (then a resume may replay the shuffle from the manifest's counts instead of reading)."""

    epoch: int = 0
    index: int = 0
    skipped: int = 0
    clean: int = 1


class TrainStream(IterableDataset):
    """Infinite :class:`~pipeline.data.batch.TrainBatch` es for one rank (with a
    :class:`~pipeline.data.transforms.DeviceTrainTransform`, JPEGs are left encoded)."""

    def __init__(
        self,
        shards: ShardSet,
        transform: Callable,
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        samples_per_epoch: int | None = None,
        shuffle_buffer: int = 5000,  # samples, or bytes as a pydantic ByteSize
        num_classes: int | None = None,
        labels: bool = True,  # False: an objective without labels (each is -1; .cls is not read)
    ):
        samples_per_epoch = samples_per_epoch or shards.num_samples
        if not samples_per_epoch:
            raise ValueError(f"samples_per_epoch is unknown for '{shards.spec}': give a manifest (make_shards.py "
                             f"--index DIR writes one from the tar headers) or data.samples_per_epoch")
        self.urls = shards.urls
        self.expected = dict(zip(shards.urls, shards.counts)) if shards.counts is not None else {}
        self.transform = transform
        self.batch_size = batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers = num_workers
        self.num_classes, self.labels = num_classes, labels
        self.samples_per_epoch = samples_per_epoch
        # An epoch is the RNG re-seeding unit of each worker's stream: its share of one pass.
        self.samples_per_worker_epoch = max(1, samples_per_epoch // stream_count(world_size, num_workers))
        self.shuffle_buffer = shuffle_samples(shuffle_buffer, shards)
        self.start: dict[int, Position] = {}  # logical worker -> where it starts
        self.rotation = 0  # logical worker = (physical + rotation) % workers

    def epoch_samples(self, worker: int, epoch: int, errors: _ShardErrors, start: int = 0,
                      replay: bool = True) -> Iterator[dict]:
        """The raw (undecoded) samples of one worker's epoch in their shuffled order, from the
        ``start``-th on. Shards are resampled and shuffled with RNGs seeded by (seed, rank,
        worker, epoch). Resuming mid-epoch (``start``), the shuffle is replayed over (shard,
        sample) handles, which needs no byte of data, where every shard is local with a manifest
        count and ``replay`` holds (no shard of this epoch failed to read); then only the samples
        left in the shuffle buffer are read, each over its own byte range, and reading goes on from
        the next sample's offset. Otherwise the samples before ``start`` are read and dropped."""
        shard_rng = random.Random(seed_of(self.seed, self.rank, worker, epoch, 0))
        rng = random.Random(seed_of(self.seed, self.rank, worker, epoch, 1))
        drawn: list[str] = []  # the epoch's resampled shards, drawn as far as needed

        def shard(j: int) -> str:
            while len(drawn) <= j:
                drawn.append(shard_rng.choice(self.urls))
            return drawn[j]

        buf, size = [], self.shuffle_buffer
        initial = min(size, 1000)
        length = self.samples_per_worker_epoch
        read = partial(read_shards, expected=self.expected, errors=errors)
        if not (start and replay and self.replayable):
            sources = ((shard(j), 0) for j in itertools.count())
            return itertools.islice(shuffled(read(sources), buf, size, initial, rng), start, length)
        # Replay over (shard draw, sample) handles. After `start` picks, the handles taken from the
        # source are those picked plus those still in the buffer: the next to read follows them.
        handles = itertools.chain.from_iterable(
            zip(itertools.repeat(j), range(self.expected[shard(j)])) for j in itertools.count())
        for _ in itertools.islice(shuffled(handles, buf, size, initial, rng), start):
            pass
        j, m = 0, start + len(buf)  # the next sample to read: sample m of draw j
        while m >= self.expected[shard(j)]:
            m -= self.expected[shard(j)]
            j += 1
        wanted: dict[str, set[int]] = {}
        for handle in buf:
            wanted.setdefault(shard(handle[0]), set()).add(handle[1])
        got: dict[tuple[str, int], dict] = {}
        for url, members in wanted.items():
            try:
                got.update(((url, i), sample) for i, sample in shard_members(url, members))
            except Exception as e:  # noqa: BLE001
                errors(e)
        buf[:] = [got[key] for key in ((shard(h[0]), h[1]) for h in buf) if key in got]
        sources = ((shard(i), m if i == j else 0) for i in itertools.count(j))
        return itertools.islice(shuffled(read(sources), buf, size, initial, rng), length - start)

    @property
    def replayable(self) -> bool:
        """Whether a mid-epoch resume can replay the shuffle without reading: local shards, all counted."""
        return all(self.expected.get(u) is not None for u in self.urls) and all(map(is_seekable, self.urls))

    def __iter__(self) -> Iterator[TrainBatch]:
        info = get_worker_info()
        workers = info.num_workers if info else 1
        worker = ((info.id if info else 0) + self.rotation) % workers
        epoch, index, skipped, clean = self.start.get(worker, Position())
        errors = _ShardErrors()
        images, labels = [], []
        while True:
            events_before = errors.events
            for index, sample in enumerate(self.epoch_samples(worker, epoch, errors, index, bool(clean)),
                                           start=index + 1):
                errors.consecutive = 0
                rng = random.Random(seed_of(self.seed, self.rank, worker, epoch, index))
                try:
                    image, label = decode_sample(sample, self.transform, rng, self.num_classes, self.labels)
                except Exception as e:  # noqa: BLE001 - a bad sample must not stop training
                    skipped += 1
                    log.warning("skipped unreadable sample (%s): %s", _where(sample), e)
                    continue
                images.append(image)
                labels.append(label)
                if len(images) == self.batch_size:
                    # position: where a restored worker starts; clean: no shard read failed in this
                    # epoch, so a resume may replay it from the manifest's counts
                    clean = int(clean and errors.events == events_before)
                    yield stack_images(images, labels)._replace(
                        position=torch.tensor([worker, epoch, index, skipped + errors.count, clean]))
                    images, labels = [], []
            epoch, index, clean = epoch + 1, 0, 1


class TrainLoader:
    """A DataLoader over :class:`TrainStream` whose position can be saved and restored."""

    def __init__(self, stream: TrainStream, *, pin_memory: bool = False, prefetch_factor: int = 2):
        self.stream = stream
        self.num_workers = stream.num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.batches = 0
        self.positions: dict[int, Position] = {}

    @property
    def skipped(self) -> int:
        """Samples (and unreadable shard reads) skipped so far on this rank."""
        return sum(p.skipped for p in self.positions.values())

    @property
    def steps_per_epoch(self) -> int:
        """Micro-batches per epoch on this rank; independent of the worker count."""
        return self.stream.samples_per_epoch // (self.stream.batch_size * self.stream.world_size)

    def __iter__(self) -> Iterator[TrainBatch]:
        workers = logical_workers(self.num_workers)
        self.stream.rotation = self.batches % workers  # the next batch is logical worker (n % workers)'s
        self.stream.start = dict(self.positions)
        loader = DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            **worker_options(self.num_workers),
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers else None,
            persistent_workers=False,
            # Its own generator: starting workers must not draw from the global RNG, which is
            # part of the checkpoint (dropout, stochastic depth, mixing).
            generator=torch.Generator().manual_seed(self.stream.seed),
        )
        for batch in loader:
            worker, *position = batch.position.tolist()
            self.positions[worker] = Position(*position)
            self.batches += 1
            yield batch._replace(position=None)

    def state_dict(self) -> dict:
        return {
            "batches": self.batches,
            "positions": {str(k): list(v) for k, v in self.positions.items()},
            "num_workers": self.num_workers,
            "world_size": self.stream.world_size,
            "seed": self.stream.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        self.batches = int(state["batches"])
        # a position saved before `clean` existed replays by reading
        positions = {int(k): Position(*(*v, 0)[:4]) for k, v in state["positions"].items()}
        same = state["num_workers"] == self.num_workers and state["world_size"] == self.stream.world_size
        if same:
            self.positions = positions
        else:
            # Another layout cannot replay the same order: start every worker on a fresh epoch.
            next_epoch = 1 + max((p.epoch for p in positions.values()), default=-1)
            skipped = sum(p.skipped for p in positions.values())
            log.warning(
                "data position saved with %s workers x %s ranks, now %s x %s: the stream restarts at epoch %d",
                state["num_workers"], state["world_size"], self.num_workers, self.stream.world_size, next_epoch,
            )
            workers = range(logical_workers(self.num_workers))
            self.positions = {w: Position(next_epoch, 0, skipped if w == 0 else 0, 1) for w in workers}


# ---------------------------------------------------------------------------------------------
# Evaluation


def stream_ranges(counts: list[int], streams: int, whole_shards: bool) -> list[tuple[int, int]]:
    """[lo, hi) global sample ranges, one per stream, covering ``sum(counts)`` samples in order.
    An even split, whose bounds move to the nearest shard boundary with ``whole_shards``."""
    total = sum(counts)
    bounds = [total * i // streams for i in range(streams + 1)]
    if whole_shards:
        edges = list(itertools.accumulate(counts, initial=0))
        snapped = []
        for bound in bounds:
            i = bisect.bisect_left(edges, bound)
            below, above = edges[max(i - 1, 0)], edges[min(i, len(edges) - 1)]
            snapped.append(below if bound - below <= above - bound else above)
        bounds = snapped
    return list(zip(bounds[:-1], bounds[1:]))


class EvalStream(IterableDataset):
    """Each sample of ``shards`` exactly once over all ranks and workers, as padded, masked
    :class:`~pipeline.data.batch.EvalBatch` es; an undecodable sample is masked and counted in
    ``skipped``."""

    def __init__(self, shards: ShardSet, transform: Callable, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, image_size: int, num_classes: int | None = None, labels: bool = True):
        self.urls = shards.urls
        self.counts = shards.counts if shards.counts is not None else [count_samples(u) for u in shards.urls]
        self.transform = transform
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.num_workers = num_workers
        self.num_classes, self.labels = num_classes, labels
        self.image_size = image_size
        self.num_samples = sum(self.counts)
        # Stream (rank r, worker w) holds global samples [lo, hi). Whole shards where there are
        # enough of them (or a shard cannot be opened mid-way); otherwise even sample ranges.
        workers = logical_workers(num_workers)
        streams = world_size * workers
        whole = len(self.urls) >= streams or not all(is_seekable(u) for u in self.urls)
        ranges = stream_ranges(self.counts, streams, whole)
        self.ranges = [ranges[r * workers:(r + 1) * workers] for r in range(world_size)]
        per_rank = [sum(math.ceil((b - a) / batch_size) for a, b in rank_ranges) for rank_ranges in self.ranges]
        self.batches_per_rank = max(per_rank)  # every rank runs this many forwards

    def _samples(self, lo: int, hi: int) -> Iterator[tuple[int, dict | None]]:
        """(global index, raw sample) for [lo, hi); ``None`` for samples a damaged shard lost."""
        end = 0
        for url, count in zip(self.urls, self.counts):
            start, end = end, end + count
            if end <= lo or start >= hi:
                continue
            index, stop = max(lo, start), min(end, hi)
            try:
                whole = index == start and stop == end  # read to the end: no header walk for the end
                for sample in shard_samples(url, skip=index - start, count=None if whole else stop - index):
                    if index >= stop:
                        break
                    yield index, sample
                    index += 1
            except Exception as e:  # noqa: BLE001 - a damaged shard loses its samples, not the run
                log.warning("unreadable shard '%s' after %d samples: %r", url, index - start, e)
            for missing in range(index, stop):
                yield missing, None

    def __iter__(self) -> Iterator[EvalBatch]:
        info = get_worker_info()
        lo, hi = self.ranges[self.rank][info.id if info else 0]
        size, batch = self.image_size, self.batch_size
        images, labels, mask, indices, skipped = [], [], [], [], 0
        for index, sample in self._samples(lo, hi):
            try:
                if sample is None:
                    raise ValueError("lost in a damaged shard")
                image, label = decode_sample(sample, self.transform, None, self.num_classes, self.labels)
                ok = True
            except Exception as e:  # noqa: BLE001
                log.warning("skipped unreadable sample (%s): %s", _where(sample or {}), e)
                image, label, ok = torch.zeros(3, size, size, dtype=torch.uint8), -1, False
                skipped += 1
            images.append(image)
            labels.append(label)
            mask.append(ok)
            indices.append(index)
            if len(images) == batch:
                yield self._batch(images, labels, mask, indices, skipped)
                images, labels, mask, indices, skipped = [], [], [], [], 0
        if images:
            yield self._batch(images, labels, mask, indices, skipped)

    def _batch(self, images, labels, mask, indices, skipped) -> EvalBatch:
        pad = self.batch_size - len(images)
        images = images + [torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8)] * pad
        return EvalBatch(images=torch.stack(images), labels=torch.tensor(labels + [-1] * pad, dtype=torch.int64),
                         mask=torch.tensor(mask + [False] * pad),
                         index=torch.tensor(indices + [-1] * pad, dtype=torch.int64), skipped=torch.tensor(skipped))

    def empty_batch(self) -> EvalBatch:
        return self._batch([], [], [], [], 0)


def eval_batches(stream: EvalStream, pin_memory: bool = False) -> Iterator[EvalBatch]:
    """The rank's evaluation batches, padded with empty ones so every rank yields the same count;
    with ``pin_memory`` in page-locked memory, so the copies to a GPU overlap."""
    loader = DataLoader(stream, batch_size=None, num_workers=stream.num_workers, generator=torch.Generator(),
                        pin_memory=pin_memory, **worker_options(stream.num_workers))
    count = 0
    for count, batch in enumerate(loader, start=1):
        yield batch
    if count > stream.batches_per_rank:
        raise RuntimeError(f"evaluation stream gave {count} batches, more than its plan of {stream.batches_per_rank}")
    for _ in range(stream.batches_per_rank - count):
        yield stream.empty_batch()
