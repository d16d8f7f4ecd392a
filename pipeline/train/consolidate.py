"""Full fp32 weights from a training checkpoint (any ZeRO stage, any world size) or a file."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pipeline.model import vit_from_config
from pipeline.model.weights import adapt_state_dict, load_safetensors
from pipeline.train.checkpoint import COMPLETE, resolve_resume

log = logging.getLogger(__name__)


def checkpoint_dir(source: str | Path) -> Path:
    """The complete checkpoint that a run, checkpoints or stepNNNNNNNN directory names."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"checkpoint '{source}' does not exist")
    if (source / COMPLETE).is_file():
        return source
    folder = source / "checkpoints" if (source / "checkpoints").is_dir() else source
    return resolve_resume(str(folder), folder)


def consolidated_state_dict(source: str | Path) -> dict[str, torch.Tensor]:
    """Weights from ``source``: a ``.safetensors`` file (ours or timm's), a checkpoint
    ``stepNNNNNNNN`` directory, a ``checkpoints`` directory or a run directory (the newest
    complete checkpoint). ZeRO partitions are merged with DeepSpeed's ``zero_to_fp32``."""
    if Path(source).suffix == ".safetensors":
        return load_safetensors(source)
    source = checkpoint_dir(source)
    model_states = source / "mp_rank_00_model_states.pt"
    if any(source.glob("*zero_pp_rank_*optim_states.pt")) or any(source.glob("zero_pp_rank_*model_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(source.parent), tag=source.name)
    elif model_states.is_file():  # ZeRO stage 0: the module's weights are saved whole
        state = torch.load(model_states, map_location="cpu", weights_only=False)["module"]
    else:
        raise FileNotFoundError(f"no DeepSpeed model states in checkpoint '{source}'")
    log.info("consolidated weights from %s (%d tensors)", source, len(state))
    return {k.removeprefix("module."): v.float() for k, v in state.items()}


def adapt_to_config(state: dict[str, torch.Tensor], model_config, *, reset_head: bool = False,
                    source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """``adapt_state_dict`` against the model ``model_config`` describes, built on the meta
    device: true shapes (ZeRO-3 parameters are partitioned), no memory."""
    with torch.device("meta"):
        reference = vit_from_config(model_config)
    return adapt_state_dict(state, reference, reset_head=reset_head, source=source)


def load_weights(model, state: dict[str, torch.Tensor], *, zero3: bool) -> None:
    """Copy ``state`` into ``model``; keys it lacks keep the model's own (fresh) values. Under
    ZeRO-3 each module's partitioned parameters are gathered, written on rank 0, and
    re-partitioned, one module at a time."""
    import deepspeed

    with torch.no_grad():
        for name, module in model.named_modules():
            params = dict(module.named_parameters(recurse=False))
            prefix = f"{name}." if name else ""
            with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0, enabled=zero3 and bool(params)):
                for key, param in params.items():
                    if prefix + key in state:
                        param.copy_(state[prefix + key].to(param.dtype))
            for key, buffer in module.named_buffers(recurse=False):
                if prefix + key in state:
                    buffer.copy_(state[prefix + key])
