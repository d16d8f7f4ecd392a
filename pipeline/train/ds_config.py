"""The DeepSpeed configs (training, and ZeRO-3 evaluation) and the compute dtype, built from
the typed config (never kept as a second JSON file)."""

from __future__ import annotations

import torch

from pipeline.config import Config


def compute_dtype(config: Config) -> torch.dtype:
    """The dtype the model computes in: ``deepspeed.precision``."""
    return torch.bfloat16 if config.deepspeed.precision == "bf16" else torch.float32


def build_eval_deepspeed_config(config: Config, world_size: int, batch: int | None = None) -> dict:
    """Inference under ZeRO-3 (evaluation of a partitioned model, a partitioned teacher): no
    optimizer, one batch of ``batch`` (default ``eval.micro_batch_size``) per rank."""
    batch = batch or config.eval.micro_batch_size
    return {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1,
            "train_batch_size": batch * world_size, "bf16": {"enabled": config.deepspeed.precision == "bf16"},
            "zero_optimization": {"stage": 3}, "steps_per_print": 2**31 - 1}


def build_deepspeed_config(config: Config, world_size: int, *, load_universal: bool = False) -> dict:
    """DeepSpeed's training config; ``load_universal`` when the run resumes a universal checkpoint
    (one converted from another world size)."""
    ds, train = config.deepspeed, config.train
    # Gradient communication, stage by stage (DeepSpeed 0.19):
    # - ZeRO-2/3 reduce-scatter gradients in buckets from hooks while the backward pass goes on
    #   (overlap_comm), into one contiguous buffer (contiguous_gradients: no fragmentation at
    #   H/14 sizes). A bucket must be well under the model for that to overlap: with DeepSpeed's
    #   default (5e8 elements) an L/16 (3e8) reduces only after its backward. 5e7 elements is
    #   ~2.5 H/14 blocks, 200 MB in fp32: large enough for NCCL's full bandwidth.
    # - ZeRO-1 in bf16 with fp32 accumulation runs DeepSpeed's BF16 optimizer, which all-reduces
    #   the fp32 gradients once per optimizer step after the backward pass: overlap_comm has no
    #   effect there (the planner counts that communication as exposed). Stage 0 is the same.
    # Accumulation stays in fp32 at stages 1-3 (data_types.grad_accum_dtype below).
    zero: dict = {
        "stage": ds.zero_stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": ds.contiguous_gradients,
        "reduce_bucket_size": ds.reduce_bucket_size,
        "allgather_bucket_size": ds.allgather_bucket_size,
    }
    if ds.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=ds.stage3_prefetch_bucket_size,
            stage3_param_persistence_threshold=ds.stage3_param_persistence_threshold,
            # A consolidated 16-bit state dict at save time lets fine-tuning and export read
            # the weights without DeepSpeed's offline tools.
            stage3_gather_16bit_weights_on_model_save=True,
        )
    for kind, where in (("offload_optimizer", ds.offload_optimizer), ("offload_param", ds.offload_param)):
        if where != "none":
            zero[kind] = {"device": where, "pin_memory": True,
                          **({"nvme_path": ds.nvme_path} if where == "nvme" else {})}
    return {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": config.micro_batch(world_size),
        "gradient_accumulation_steps": config.grad_accumulation_steps(world_size),
        "gradient_clipping": config.optim.clip_grad or 0.0,
        # A non-finite gradient skips the optimizer step, on every rank; the trainer counts such
        # steps against train.max_bad_steps.
        "bf16": {"enabled": ds.precision == "bf16", "check_grad_overflow": True},
        # fp32 accumulation: ZeRO-1 takes DeepSpeed's BF16 optimizer, ZeRO-2/3 accumulate their
        # gradient partitions in fp32 (docs/training.md: "bf16 numerics").
        "data_types": {"grad_accum_dtype": ds.accumulation_dtype},
        "communication_data_type": ds.reduce_dtype,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # our AdamW / SGD with parameter groups
        "steps_per_print": 2**31 - 1,  # the trainer does its own logging
        "wall_clock_breakdown": False,
        **({"checkpoint": {"load_universal": True}} if load_universal else {}),
    }
