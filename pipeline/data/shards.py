"""Resolve a shard spec to URLs, counts and class names.

A spec is a manifest (``DIR/train.json``), a path or brace pattern (``train-{000000..000099}.tar``),
or a ``pipe:`` command for object stores (``pipe:aws s3 cp s3://b/train-000000.tar -``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand


@dataclass
class ShardSet:
    urls: list[str]
    counts: list[int] | None = None  # samples per shard, when a manifest gives them
    classes: list[str] = field(default_factory=list)
    spec: str = ""

    @property
    def num_samples(self) -> int | None:
        return sum(self.counts) if self.counts is not None else None


def _is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url


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
        shards = ShardSet(urls, [u["num_samples"] for u in manifest["shards"]], manifest.get("classes", []), spec)
    else:
        urls = [url for part in spec.split("::") for url in braceexpand.braceexpand(part)]
        shards = ShardSet(urls, None, [], spec)
    if not shards.urls:
        raise ValueError(f"no shards in '{spec}'")
    if check_exists:
        local = [u for u in shards.urls if _is_local(u)]
        missing = [u for u in local if not os.path.isfile(u)]
        if missing and len(missing) == len(local) and len(local) > 1:
            raise FileNotFoundError(f"no shard matches '{spec}' (first expected: {missing[0]})")
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise FileNotFoundError(f"missing shard '{missing[0]}'{more} (from '{spec}')")
    return shards
