"""Data: shard specs and manifests (``shards``) and reading the tars (``tarindex``), writing
shards (``writer``, ``sources``), streaming them exactly once or resampled (``stream``),
decoding and augmentation in the workers (``transforms``) into typed batches (``batch``),
finishing batches on the training device (``device``), and preflight checks. Of the pipeline it
imports only ``errors``: no model, no DeepSpeed, no MLflow."""

from pipeline.data.batch import EvalBatch, TrainBatch
from pipeline.data.device import BatchFinisher, Normalize, batch_mixer
from pipeline.data.shards import ShardSet, resolve_shards
from pipeline.data.stream import EvalStream, TrainLoader, TrainStream, eval_batches
from pipeline.data.transforms import EvalTransform, TrainTransform

__all__ = [
    "BatchFinisher", "EvalBatch", "EvalStream", "EvalTransform", "Normalize", "ShardSet", "TrainBatch", "TrainLoader",
    "TrainStream", "TrainTransform", "batch_mixer", "eval_batches", "resolve_shards",
]
