"""Reading tar shards: their headers walked without reading payloads, a sample index (kept in a
sidecar file beside the shard), samples read over exactly their byte range, and
:func:`ordered_map` to do it in processes.
"""

from __future__ import annotations

import functools
import io
import itertools
import logging
import multiprocessing
import os
import re
import tarfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import webdataset as wds

from pipeline.data.shards import is_seekable

log = logging.getLogger(__name__)


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



def _number(field: bytes) -> int:
    """A tar header's numeric field: octal text (the common case, parsed directly), else tarfile's
    reading (base-256 for large values)."""
    if field[:1] not in (b"\x80", b"\xff"):
        text = field.split(b"\0", 1)[0].strip()
        return int(text, 8) if text else 0
    return tarfile.nti(field)


def _header_ok(header: bytes) -> bool:
    """Whether a 512-byte block is a tar header: its checksum field equals the sum of its bytes
    with that field as spaces (unsigned, or signed as some old tars have it)."""
    try:
        checksum = _number(header[148:156])
    except ValueError:  # not octal: not a header
        return False
    return checksum == sum(header) - sum(header[148:156]) + 256 or checksum in tarfile.calc_chksums(header)


MAX_EXTENDED_HEADER = 2**20  # a pax or GNU long-name record; real ones are a few hundred bytes


def _tar_entries(path: str) -> Iterator[tuple[str, int, int, int]]:
    """(name, offset of its first header, offset of its data, size) of each regular file of a
    local tar, from the 512-byte headers alone, read with ``os.pread`` at the offsets their sizes
    give: no payload is read but the extended headers' (pax ``path``, GNU long names). A file's
    first header is its first extended header, if it has any: a read from there is a valid tar."""
    fd = os.open(path, os.O_RDONLY)
    try:
        offset, first, long_name, end = 0, None, None, os.fstat(fd).st_size
        while len(header := os.pread(fd, tarfile.BLOCKSIZE, offset)) == tarfile.BLOCKSIZE and any(header):
            if not _header_ok(header):
                raise tarfile.ReadError(f"{path}: bad tar header checksum at byte {offset}")
            try:
                size, kind = _number(header[124:136]), header[156:157]
            except ValueError:
                raise tarfile.ReadError(f"{path}: unreadable size in the tar header at byte {offset}") from None
            data = offset + tarfile.BLOCKSIZE
            # A header is the shard's word only as far as the shard goes: nothing past its end is
            # read, and no buffer of a size it merely claims is allocated.
            if size < 0 or data + size > end:
                raise tarfile.ReadError(f"{path}: the member at byte {offset} claims {size:,} bytes, past the "
                                        f"shard's end ({end:,} bytes)")
            if kind in (tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME) and size > MAX_EXTENDED_HEADER:
                raise tarfile.ReadError(f"{path}: an extended header of {size:,} bytes at byte {offset}")
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


_META = re.compile(r"__[^/]*__($|/)")


def _sample_members(path: str) -> Iterator[tuple[str, str, int, int, int]]:
    """(key, extension, first header offset, data offset, size) for each file of each sample of a
    local shard, from its tar headers alone. Files are grouped as webdataset groups them:
    consecutive files sharing a key, metadata entries (``__name__``) left out."""
    for name, first, data, size in _tar_entries(path):
        if not _META.match(name):
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


@dataclass
class ShardIndex:
    """Where each sample of a local shard lies, in columns: its key, the offset of its first tar
    header, and for each file extension the (data offset, size) of the sample's file (-1, -1 where
    it has none). About 1 MB for 10,000 samples."""

    keys: np.ndarray  # str
    first: np.ndarray  # int64 (n,)
    files: dict[str, np.ndarray]  # ext -> int64 (n, 2)

    @classmethod
    def walk(cls, path: str) -> "ShardIndex":
        """From the shard's tar headers (:func:`_samples_of`)."""
        samples = list(_samples_of(path))
        files = {}
        for i, (_, _, found) in enumerate(samples):
            for ext, where in found.items():
                files.setdefault(ext, np.full((len(samples), 2), -1, dtype=np.int64))[i] = where
        return cls(np.array([key for key, _, _ in samples], dtype=str),
                   np.array([first for _, first, _ in samples], dtype=np.int64), files)

    def __len__(self) -> int:
        return len(self.first)

    def sample(self, i: int) -> tuple[str, dict[str, tuple[int, int]]]:
        """Sample ``i``'s key and {extension: (data offset, size)}."""
        return str(self.keys[i]), {ext: (int(w[i, 0]), int(w[i, 1])) for ext, w in self.files.items() if w[i, 1] >= 0}


# ---------------------------------------------------------------------------------------------
# Sample index sidecars: a shard's header walk, kept next to it


SIDECAR_SUFFIX = ".idx.npz"  # train-000000.tar -> train-000000.tar.idx.npz
SIDECAR_VERSION = 1


def sidecar_path(path: str | Path) -> Path:
    return Path(f"{path}{SIDECAR_SUFFIX}")


def write_sidecar(path: str | Path, index: ShardIndex | None = None) -> Path:
    """Write ``SHARD.tar.idx.npz``: the shard's :class:`ShardIndex` (walked here unless given),
    with the tar's size to tell a stale one. Written whole or not at all."""
    index = ShardIndex.walk(str(path)) if index is None else index
    arrays = {"version": np.int64(SIDECAR_VERSION), "tar_bytes": np.int64(os.path.getsize(path)), "keys": index.keys,
              "first": index.first, **{f"file.{ext}": where for ext, where in sorted(index.files.items())}}
    out, partial = sidecar_path(path), Path(f"{path}.idx.tmp")
    # np.savez's layout, with fixed zip timestamps: the same shard gives the same bytes
    with zipfile.ZipFile(partial, "w") as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asanyarray(array), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buffer.getvalue())
    os.replace(partial, out)
    return out


def _describes(header: bytes, size: int) -> bool:
    """Whether ``header`` is a whole tar header of a file of ``size`` bytes."""
    return (len(header) >= tarfile.BLOCKSIZE and _header_ok(header[:tarfile.BLOCKSIZE])
            and _number(header[124:136]) == size)


def _file_ok(fd: int, data: int, size: int) -> bool:
    """Whether the block before ``data`` is a tar header of a file of ``size`` bytes."""
    return _describes(os.pread(fd, tarfile.BLOCKSIZE, data - tarfile.BLOCKSIZE), size)


def _read_sidecar(path: str, tar_bytes: int) -> ShardIndex | None:
    """The sidecar's index if it is there and fits the shard (its size, and the headers of its
    first, middle and last samples' files); otherwise None, with a warning if there is one."""
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        with np.load(side, allow_pickle=False) as saved:
            index = ShardIndex(saved["keys"], saved["first"],
                               {name.split(".", 1)[1]: saved[name] for name in saved.files if name.startswith("file.")})
            fits = int(saved["version"]) == SIDECAR_VERSION and int(saved["tar_bytes"]) == tar_bytes
        if fits and len(index):
            fd = os.open(path, os.O_RDONLY)
            try:
                fits = all(_file_ok(fd, *where) for i in {0, len(index) // 2, len(index) - 1}
                           for where in index.sample(i)[1].values())
            finally:
                os.close(fd)
    except (ValueError, KeyError, OSError) as e:
        log.warning("sample index '%s' is unreadable (%r): walking the tar headers instead", side, e)
        return None
    if not fits:
        log.warning("sample index '%s' does not fit its shard (rewritten since?): walking the tar headers instead; "
                    "make_shards.py --index %s writes a new one", side, Path(path).parent)
        return None
    return index


def shard_index(path: str, walk: bool = False) -> ShardIndex:
    """The shard's sample index: from its sidecar where one fits (make_shards.py writes them, and
    ``--index`` for shards made elsewhere), else from its tar headers (``walk`` forces that). Kept
    for the last two shards asked about (keyed on path, mtime and size): resuming a training
    stream and reading on from the same shard find it once."""
    stat = os.stat(path)
    return _cached_index(path, stat.st_mtime_ns, stat.st_size, walk)


@functools.lru_cache(maxsize=2)
def _cached_index(path: str, mtime_ns: int, size: int, walk: bool) -> ShardIndex:
    return (None if walk else _read_sidecar(path, size)) or ShardIndex.walk(path)


def sample_offsets(path: str) -> list[int]:
    """The byte offset of each sample's first tar header in a local shard (headers only)."""
    return shard_index(path).first.tolist()


def index_shard(path: str) -> tuple[int, set[int]]:
    """Samples in a local shard and the labels its ``.cls`` files hold, from its tar headers and
    the few bytes of each ``.cls`` (no image byte is read); the walk is kept in its sidecar."""
    index, labels = ShardIndex.walk(path), set()
    write_sidecar(path, index)
    fd = os.open(path, os.O_RDONLY)
    try:
        for i, (data, size) in enumerate(index.files.get("cls", np.zeros((0, 2), np.int64)).tolist()):
            if size < 0:
                continue  # a sample without a label
            text = os.pread(fd, size, data).strip()
            try:
                labels.add(int(text))
            except ValueError:
                raise ValueError(f"{path}: {index.keys[i]}.cls holds {text[:20]!r}, not a class index") from None
    finally:
        os.close(fd)
    return len(index), labels


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
    sample index found (:func:`shard_index`), then each wanted file read by its offset, with the
    header before it, which must say so (else the headers are walked again); no other byte of
    the shard is read. Samples are as webdataset's ``tarfile_samples`` gives them."""
    index, walked = shard_index(url), False
    fd = os.open(url, os.O_RDONLY)
    try:
        for i in sorted(set(members)):
            while True:
                if i >= len(index):
                    raise IndexError(f"shard '{url}' has {len(index)} samples, not {i + 1}")
                key, files = index.sample(i)
                blocks = {ext: os.pread(fd, size + tarfile.BLOCKSIZE, data - tarfile.BLOCKSIZE)
                          for ext, (data, size) in files.items()}
                if walked or all(_describes(b, files[ext][1]) for ext, b in blocks.items()):
                    break
                log.warning("sample index of '%s' is stale at sample %d: walking its tar headers", url, i)
                index, walked = shard_index(url, walk=True), True
            yield i, {"__key__": key, "__url__": url, **{ext: b[tarfile.BLOCKSIZE:] for ext, b in blocks.items()}}
    finally:
        os.close(fd)


def count_samples(url: str) -> int:
    """Samples in one shard: from its tar headers when it is local, else by reading it."""
    if is_seekable(url):
        return len(sample_offsets(url))
    return sum(1 for _ in wds.tarfile_samples([{"url": url}]))
