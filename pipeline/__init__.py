"""vit-pipeline: distributed ViT pretraining, fine-tuning and evaluation.

Layers; a module imports only from its own layer and those above it in this list:

- ``errors``: user mistakes as exceptions;
- ``model`` (the architecture and weights files) and ``data`` (shards, streams, decoding): torch
  and their own libraries, no DeepSpeed, no MLflow;
- ``config``: the typed config (it checks model variants against ``model``);
- ``flops`` and ``plan`` (analytic sizes and speeds), ``tracking`` (MLflow, on rank 0);
- ``train``: DeepSpeed, checkpoints, the EMA, the trainer and the evaluation library;
- the stages and tools: ``evaluate``, ``dryrun``, ``serving``, ``cli``, which ``launch/`` calls.
"""
