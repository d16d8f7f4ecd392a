"""Data: shard writing, streaming, decoding and augmentation, preflight checks."""

from pipeline.data.shards import ShardSet, resolve_shards
from pipeline.data.stream import EvalStream, TrainLoader, TrainStream, eval_batches
from pipeline.data.transforms import EvalTransform, Normalize, TrainTransform, batch_mixer

__all__ = [
    "EvalStream", "EvalTransform", "Normalize", "ShardSet", "TrainLoader", "TrainStream", "TrainTransform",
    "batch_mixer", "eval_batches", "resolve_shards",
]
