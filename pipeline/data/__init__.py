"""Data: shard writing, streaming, decoding and augmentation, preflight checks."""

from pipeline.data.shards import ShardSet, resolve_shards
from pipeline.data.stream import EvalStream, TrainLoader, TrainStream, eval_batches
from pipeline.data.transforms import EvalTransform, TrainTransform, batch_mixer, normalize

__all__ = [
    "EvalStream", "EvalTransform", "ShardSet", "TrainLoader", "TrainStream", "TrainTransform",
    "batch_mixer", "eval_batches", "normalize", "resolve_shards",
]
