"""Distributed training: rank discovery, DeepSpeed config, optimizer, trainer, checkpoints."""
