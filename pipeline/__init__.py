"""vit-pipeline: distributed ViT pretraining, fine-tuning and evaluation.

Layers; a module imports only from its own layer and those above it in this list:

- ``errors``: user mistakes as exceptions;
- ``model`` (the architecture, weights files, building it on every rank) and ``data`` (shards,
  streams, decoding, typed batches): torch and their own libraries (DeepSpeed only for ZeRO-3's
  partitioned construction), no MLflow;
- ``config``: the typed config (it checks model variants against ``model``);
- ``flops`` (analytic sizes and speeds), ``tracking`` (MLflow, on rank 0);
- ``train``: the resolved run plan, the training objectives (``train/objectives/``:
  classification, distillation, MAE), DeepSpeed, checkpoints, the EMA, k-NN monitoring, the
  trainer and the evaluation library;
- ``plan``: sizing a job against its run plan;
- the stages and tools: ``evaluate``, ``dryrun``, ``serving``, ``cli``, which ``launch/`` calls,
  and ``config_doc``, which writes docs/config.md.
"""
