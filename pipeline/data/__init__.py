"""Data: shard specs, manifests and tar indexes (``shards``), writing shards (``writer``,
``sources``), streaming them exactly once or resampled (``stream``), decoding and augmentation
(``transforms``), and preflight checks. Of the pipeline it imports only ``errors``: no model,
no DeepSpeed, no MLflow."""

from pipeline.data.shards import ShardSet, resolve_shards
from pipeline.data.stream import EvalStream, TrainLoader, TrainStream, eval_batches
from pipeline.data.transforms import EvalTransform, Normalize, TrainTransform, batch_mixer

__all__ = [
    "EvalStream", "EvalTransform", "Normalize", "ShardSet", "TrainLoader", "TrainStream", "TrainTransform",
    "batch_mixer", "eval_batches", "resolve_shards",
]
