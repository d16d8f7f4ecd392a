"""Optimizer parameter groups and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.config import OptimConfig


def peak_lr(config: OptimConfig, global_batch_size: int) -> float:
    """``optim.lr`` scaled to the global batch by ``optim.lr_scaling`` (none, linear or sqrt)."""
    ratio = global_batch_size / config.lr_base_batch
    return config.lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[config.lr_scaling]


def lr_at(step: int, config: OptimConfig, total_steps: int, peak: float) -> float:
    """Linear warmup from 0 over ``warmup_steps``, then cosine, linear or constant to ``min_lr``."""
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return peak
    progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if config.schedule == "cosine" else 1 - progress
    return config.min_lr + (peak - config.min_lr) * shape


def layer_decay_scale(layer: int, num_layers: int, decay: float, buckets: int) -> float:
    """BEiT's ``decay ** (num_layers - 1 - layer)``, with layers grouped into ``buckets`` that
    each take the scale of their deepest layer (the head's bucket gets 1)."""
    bucket = layer * buckets // num_layers
    deepest = min(num_layers - 1, -(-(bucket + 1) * num_layers // buckets) - 1)
    return decay ** (num_layers - 1 - deepest)


def param_groups(model: nn.Module, config: OptimConfig) -> list[dict]:
    """AdamW groups: no weight decay on norms, biases, pos_embed and cls_token; with
    ``layer_decay``, per-depth LR scales quantised into ``layer_decay_buckets`` groups (many groups
    slow DeepSpeed's flattening down). Each group carries ``lr_scale``."""
    depth = getattr(model, "depth", 0)
    no_decay_names = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name in no_decay_names
        scale = 1.0
        if config.layer_decay is not None and hasattr(model, "layer_id"):
            scale = layer_decay_scale(model.layer_id(name), depth + 2, config.layer_decay, config.layer_decay_buckets)
        key = (0.0 if no_decay else config.weight_decay, scale)
        groups.setdefault(key, []).append(param)
    return [{"params": params, "weight_decay": wd, "lr_scale": scale} for (wd, scale), params in sorted(groups.items())]


def build_optimizer(model: nn.Module, config: OptimConfig, *, offload: bool,
                    device: torch.device) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA, DeepSpeed's CPU Adam with optimizer offload) or SGD with momentum."""
    groups = param_groups(model, config)
    if config.name == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=config.lr, betas=config.betas, eps=config.eps, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps, fused=device.type == "cuda")
