"""Resolve a shard spec to URLs, counts and class names.

A spec is a manifest (``DIR/train.json``), a path or brace pattern (``train-{000000..000099}.tar``),
or a ``pipe:`` command for object stores (``pipe:aws s3 cp s3://b/train-000000.tar -``).
"""

from __future__ import annotations

import functools
import itertools
import json
import multiprocessing
import os
import re
import tarfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import braceexpand
from pydantic import ByteSize
import webdataset as wds


DEFAULT_MAX_COUNT = 10_000  # samples per shard written (make_shards.py --max-count)


@contextmanager
def ordered_map(fn: Callable, items: Iterable, procs: int = 1, chunksize: int = 1) -> Iterator[Iterator]:
    """``fn`` over ``items``, in this process or in ``procs`` forked ones (``fn`` is sent by
    reference; what it reads is inherited). Results come in input order, so whatever is built
    from them does not depend on ``procs``."""
    if procs <= 1:
        yield map(fn, items)
        return
    with multiprocessing.get_context("fork").Pool(procs) as pool:
        yield pool.imap(fn, items, chunksize)


@dataclass
class ShardSet:
    urls: list[str]
    counts: list[int] | None = None  # samples per shard, when a manifest gives them
    classes: list[str] = field(default_factory=list)
    spec: str = ""
    sizes: list[int] | None = None  # bytes per shard, when a manifest gives them

    @property
    def num_samples(self) -> int | None:
        return sum(self.counts) if self.counts is not None else None

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
        raise ValueError("no shards given (set data.train_shards / data.eval_shards)")
    if spec.endswith(".json") and _is_local(spec):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"shard manifest '{spec}' not found (write shards with launch/make_shards.py)")
        manifest = json.loads(path.read_text())
        urls = [_relative_to(path.parent, u["url"]) for u in manifest["shards"]]
        sizes = [u.get("num_bytes") for u in manifest["shards"]]
        shards = ShardSet(urls, [u["num_samples"] for u in manifest["shards"]], manifest.get("classes", []), spec,
                          sizes if None not in sizes else None)
    else:
        urls = [url for part in spec.split("::") for url in braceexpand.braceexpand(part)]
        shards = ShardSet(urls, None, [], spec)
    if not shards.urls:
        raise ValueError(f"no shards in '{spec}'")
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


def suggest_shards(num_samples: int, streams: int, max_count: int = DEFAULT_MAX_COUNT) -> tuple[int, int]:
    """(shards, samples per shard) that suit ``streams`` readers (ranks x workers): a multiple of
    the stream count, so evaluation gives every stream whole shards and training streams rarely
    read the same shard at once, with at most ``max_count`` samples per shard."""
    shards = streams * max(1, -(-num_samples // (streams * max_count)))
    return shards, max(1, -(-num_samples // shards))


def shard_advice(num_samples: int, num_shards: int, world_size: int, workers: int) -> str:
    """One line on how ``num_shards`` suit ``world_size`` ranks x ``workers`` workers."""
    streams = world_size * max(workers, 1)
    shards, per_shard = suggest_shards(num_samples, streams)
    verdict = "suits it" if num_shards >= streams and num_shards % streams == 0 else (
        "works (resampled training and exact evaluation take any count)")
    return (f"{num_shards} shards for {world_size} ranks x {max(workers, 1)} workers = {streams} streams: {verdict}; "
            f"a count that suits them: {shards} shards (make_shards.py --max-count {per_shard})")


def check_exist(shards: ShardSet) -> None:
    """Raise FileNotFoundError naming a missing local shard (files are not opened)."""
    local = [u for u in shards.urls if _is_local(u)]
    missing = [u for u in local if not os.path.isfile(u)]
    if missing and len(missing) == len(local) and len(local) > 1:
        raise FileNotFoundError(f"no shard matches '{shards.spec}' (first expected: {missing[0]})")
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise FileNotFoundError(f"missing shard '{missing[0]}'{more} (from '{shards.spec}')")


# ---------------------------------------------------------------------------------------------
# Tar headers: samples found without reading their payloads


def _tar_entries(path: str) -> Iterator[tuple[str, int, int, int]]:
    """(name, offset of its first header, offset of its data, size) of each regular file of a
    local tar, from the 512-byte headers alone, read with ``os.pread`` at the offsets their sizes
    give: no payload is read but the extended headers' (pax ``path``, GNU long names). A file's
    first header is its first extended header, if it has any: a read from there is a valid tar."""
    fd = os.open(path, os.O_RDONLY)
    try:
        offset, first, long_name = 0, None, None
        while len(header := os.pread(fd, tarfile.BLOCKSIZE, offset)) == tarfile.BLOCKSIZE and any(header):
            # the unsigned sum with the checksum field as spaces (tarfile's check, signed sums aside)
            if tarfile.nti(header[148:156]) != sum(header[:148]) + 256 + sum(header[156:]) \
                    and tarfile.nti(header[148:156]) not in tarfile.calc_chksums(header):
                raise tarfile.ReadError(f"{path}: bad tar header checksum at byte {offset}")
            size, kind = tarfile.nti(header[124:136]), header[156:157]
            data = offset + tarfile.BLOCKSIZE
            first = offset if first is None else first
            if kind == tarfile.XHDTYPE:
                records = os.pread(fd, size, data).decode("utf-8", "surrogateescape")
                long_name = next((r.split("=", 1)[1] for r in records.split("\n") if " path=" in r), long_name)
            elif kind == tarfile.GNUTYPE_LONGNAME:
                long_name = os.pread(fd, size, data).rstrip(b"\0").decode("utf-8", "surrogateescape")
            elif kind not in (tarfile.XGLTYPE, tarfile.GNUTYPE_LONGLINK):
                name = header[:100].split(b"\0", 1)[0]
                if header[257:262] == b"ustar" and header[345] != 0:
                    name = header[345:500].split(b"\0", 1)[0] + b"/" + name
                if kind in tarfile.REGULAR_TYPES:
                    yield long_name or name.decode("utf-8", "surrogateescape"), first, data, size
                first, long_name = None, None
            offset = data + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    finally:
        os.close(fd)


def _sample_members(path: str) -> Iterator[tuple[str, str, int, int, int]]:
    """(key, extension, first header offset, data offset, size) for each file of each sample of a
    local shard, from its tar headers alone. Files are grouped as webdataset groups them:
    consecutive files sharing a key, metadata entries (``__name__``) left out."""
    for name, first, data, size in _tar_entries(path):
        if not re.match(r"__[^/]*__($|/)", name):
            key, ext = wds.tariterators.base_plus_ext(name)
            if key is not None:
                yield key, ext.lower(), first, data, size


def _samples_of(path: str) -> Iterator[tuple[str, int, dict[str, tuple[int, int]]]]:
    """(key, first header offset, {extension: (data offset, size)}) for each sample of a local shard."""
    current = None
    for key, ext, first, data, size in _sample_members(path):
        if current is not None and key != current[0]:
            yield current
            current = None
        current = current or (key, first, {})
        current[2][ext] = (data, size)
    if current is not None:
        yield current


def shard_index(path: str) -> list[tuple[str, int, dict[str, tuple[int, int]]]]:
    """:func:`_samples_of` as a list, for the last two shards asked about (keyed on path, mtime
    and size, about 2 MB for 10,000 samples): resuming a training stream and reading on from the
    same shard walk its headers once."""
    stat = os.stat(path)
    return _cached_index(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _cached_index(path: str, mtime_ns: int, size: int) -> list[tuple[str, int, dict[str, tuple[int, int]]]]:
    return list(_samples_of(path))


def sample_offsets(path: str) -> list[int]:
    """The byte offset of each sample's first tar header in a local shard (headers only)."""
    return [first for _, first, _ in shard_index(path)]


def index_shard(path: str) -> tuple[int, set[int]]:
    """Samples in a local shard and the labels its ``.cls`` files hold: tar headers, plus the few
    bytes of each ``.cls``; no image byte is read."""
    count, labels = 0, set()
    with open(path, "rb") as f:
        for key, _, files in _samples_of(path):
            count += 1
            if "cls" in files:
                data, size = files["cls"]
                text = os.pread(f.fileno(), size, data).strip()
                try:
                    labels.add(int(text))
                except ValueError:
                    raise ValueError(f"{path}: {key}.cls holds {text[:20]!r}, not a class index") from None
    return count, labels


class _Range:
    """A raw file read from ``start`` for ``length`` bytes (to its end with None), then empty."""

    def __init__(self, path: str, start: int, length: int | None):
        self.file = open(path, "rb", buffering=0)  # unbuffered: no read-ahead past the range
        self.file.seek(start)
        self.left = length

    def read(self, size: int = -1) -> bytes:
        if self.left is not None:
            size = self.left if size is None or size < 0 else min(size, self.left)
        data = self.file.read(size)
        if self.left is not None:
            self.left -= len(data)
        return data

    def close(self) -> None:
        self.file.close()


def shard_samples(url: str, skip: int = 0, count: int | None = None, handler=wds.reraise_exception) -> Iterator[dict]:
    """Samples ``skip`` to ``skip + count`` of one shard (to its end with None). A local shard is
    read over exactly that byte range, found from its tar headers, so what lies outside it is
    never read; any other is read from its start."""
    if not is_seekable(url):
        samples = wds.tarfile_samples([{"url": url}], handler=handler)
        yield from itertools.islice(samples, skip, None if count is None else skip + count)
        return
    if not skip and count is None:
        yield from wds.tarfile_samples([{"url": url}], handler=handler)
        return
    stop = None if count is None else skip + count + 1
    offsets = sample_offsets(url)[skip:stop]
    if not offsets:
        return
    length = offsets[-1] - offsets[0] if count is not None and len(offsets) == count + 1 else None
    stream = _Range(url, offsets[0], length)
    try:
        files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}], handler=handler)
        yield from wds.tariterators.group_by_keys(files, handler=handler)
    finally:
        stream.close()


def shard_members(url: str, members: Iterable[int]) -> Iterator[tuple[int, dict]]:
    """(index, sample) for the given sample indices of one local shard, in increasing order: its
    tar headers walked (:func:`shard_index`), then each wanted file read by its offset; no other
    byte of the shard is read. Samples are as webdataset's ``tarfile_samples`` gives them."""
    index = shard_index(url)
    with open(url, "rb") as f:
        for i in sorted(set(members)):
            if i >= len(index):
                raise IndexError(f"shard '{url}' has {len(index)} samples, not {i + 1}")
            key, _, files = index[i]
            yield i, {"__key__": key, "__url__": url,
                      **{ext: os.pread(f.fileno(), size, data) for ext, (data, size) in files.items()}}


def count_samples(url: str) -> int:
    """Samples in one shard: from its tar headers when it is local, else by reading it."""
    if is_seekable(url):
        return len(sample_offsets(url))
    return sum(1 for _ in wds.tarfile_samples([{"url": url}]))
