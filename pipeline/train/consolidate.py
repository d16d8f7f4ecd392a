"""Weights for the model: read from a training checkpoint (any ZeRO stage, any world size) or a
safetensors file, adapted to the configured model, and exported.

Rank 0 alone reads and adapts the source, one tensor at a time where the format allows (ZeRO-3
partitions, safetensors, stage-0 files; a ZeRO-1/2 source merges one flat fp32 copy), and the
other ranks receive the weights over the process group: a job reads a checkpoint once, and the
ranks that do not read hold only their model (benchmarks/load_memory.py).
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors import safe_open

from pipeline.errors import MissingInput, WrongInput
from pipeline.model import vit_from_config
from pipeline.model.mae import MAE_DECODER
from pipeline.model.weights import HEAD_KEYS, LazyTensor, adapt_state_dict, load_safetensors
from pipeline.train import safe_load
from pipeline.train.checkpoint import checkpoint_dir, read_marker, trained_objective
from pipeline.train.distributed import on_rank0
from pipeline.train.ema import read_ema_state

log = logging.getLogger(__name__)


def consolidated_state_dict(source: str | Path, *, lazy: bool = False, ema: bool = False) -> dict:
    """Weights from ``source``: a ``.safetensors`` file (ours or timm's), a checkpoint
    ``stepNNNNNNNN`` directory, a ``checkpoints`` directory or a run directory (the newest
    complete checkpoint). ZeRO partitions are merged with DeepSpeed's ``zero_to_fp32``. With
    ``ema``, the checkpoint's EMA of the trained parameters (frozen ones as they are).

    With ``lazy``, values have ``.shape`` and read their fp32 tensor on ``.contiguous()``, so a
    caller that takes them one at a time never holds the whole model twice."""
    if ema:
        if Path(source).suffix == ".safetensors":
            raise ValueError(f"'{source}' is a weights file, which holds one set of weights: EMA weights come "
                             f"from a training checkpoint (exported EMA weights load as they are, without use_ema)")
        checkpoint = checkpoint_dir(source)
        state = consolidated_state_dict(checkpoint, lazy=True)
        state.update(read_ema_state(checkpoint))
        log.info("taking the EMA weights of %s", checkpoint)
        return state if lazy else {k: v.contiguous().float() for k, v in state.items()}
    if Path(source).suffix == ".safetensors":
        if not lazy:
            return load_safetensors(source)
        if not Path(source).is_file():
            raise MissingInput(f"weights file '{source}' not found")
        handle = safe_open(str(source), framework="pt")
        return {key: LazyTensor(handle.get_slice(key).get_shape(), functools.partial(handle.get_tensor, key))
                for key in handle.keys()}
    source = checkpoint_dir(source)
    model_states = source / "mp_rank_00_model_states.pt"
    optim_files = sorted(source.glob("*zero_pp_rank_*_optim_states.pt"))
    if optim_files and "zero_stage" not in _optimizer_state(optim_files[0]):
        state = _bf16_optimizer_state_dict(source, optim_files)
    elif optim_files or any(source.glob("zero_pp_rank_*model_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        safe_load.check_checkpoint(source)  # zero_to_fp32 unpickles with weights_only=False
        # Partitions are memory-mapped; lazy mode merges one ZeRO-3 tensor at a time.
        state = get_fp32_state_dict_from_zero_checkpoint(str(source.parent), tag=source.name, lazy_mode=lazy)
    elif model_states.is_file():  # ZeRO stage 0: the module's weights are saved whole
        state = safe_load.load(model_states, map_location="cpu", mmap=True)["module"]
    else:
        raise FileNotFoundError(f"no DeepSpeed model states in checkpoint '{source}'")
    log.info("consolidated weights from %s (%d tensors)", source, len(state))
    return {k.removeprefix("module."): v if lazy else v.float() for k, v in state.items()}


def _optimizer_state(path: Path) -> dict:
    """The optimizer part of a DeepSpeed ``*_optim_states.pt`` file, memory-mapped."""
    return safe_load.load(path, map_location="cpu", mmap=True)["optimizer_state_dict"]


def _bf16_optimizer_state_dict(source: Path, files: list[Path]) -> dict[str, torch.Tensor]:
    """fp32 master weights of a checkpoint written by DeepSpeed's BF16 optimizer (ZeRO-1 with
    fp32 gradient accumulation), which ``zero_to_fp32`` does not read. Its layout is ZeRO-1's:
    per parameter group, the parameters flattened in order (padded at the end) and split evenly
    over the ranks. Parameters outside the optimizer (frozen) come from the bf16 module."""
    files = sorted(files, key=lambda f: int(re.search(r"zero_pp_rank_(\d+)_", f.name).group(1)))
    partitions = [_optimizer_state(f)["single_partition_of_fp32_groups"] for f in files]
    model = safe_load.load(source / "mp_rank_00_model_states.pt", map_location="cpu", mmap=True)
    trained = {name for shapes in model["param_shapes"] for name in shapes}
    state = {k: v.float() for k, v in model["module"].items() if k not in trained}  # frozen ones, in bf16
    for group, shapes in enumerate(model["param_shapes"]):
        flat, offset = torch.cat([ranks[group] for ranks in partitions]), 0
        needed = sum(shape.numel() for shape in shapes.values())
        if needed > flat.numel():
            raise ValueError(f"{source}: the BF16 optimizer's partitions hold {flat.numel()} values, "
                             f"the parameters of group {group} need {needed}")
        for name, shape in shapes.items():
            state[name] = flat.narrow(0, offset, shape.numel()).view(shape)
            offset += shape.numel()
    return state


def adapt_to_config(state: Mapping, model_config, *, reset_head: bool = False,
                    source: str = "checkpoint") -> dict:
    """``adapt_state_dict`` against the model ``model_config`` describes, built on the meta
    device: true shapes (ZeRO-3 parameters are partitioned), no memory."""
    with torch.device("meta"):
        reference = vit_from_config(model_config)
    return adapt_state_dict(state, reference, reset_head=reset_head, source=source)


def read_pretrained(source: str | Path, model_config, *, reset_head: bool = False, same_head: bool = False,
                    ema: bool = False) -> dict:
    """The weights (or ``ema`` weights) of ``source`` adapted to ``model_config`` (lazily read).
    With ``same_head`` (evaluation) the checkpoint's head must fit the model's classes as it is."""
    state = consolidated_state_dict(source, lazy=True, ema=ema)
    if Path(source).suffix != ".safetensors" and trained_objective(checkpoint_dir(source)) == "mae":
        if same_head:
            raise WrongInput(f"checkpoint '{source}' is a masked autoencoder (objective=mae), without a classifier "
                             f"head: fine-tune it first (run.stage=finetune, finetune.init_from={source}) and "
                             "evaluate that run")
        state = {k: v for k, v in state.items() if not k.startswith(MAE_DECODER)}
        log.info("%s: the masked autoencoder's encoder, without its decoder and mask token", source)
    if same_head:
        classes = model_config.num_classes
        if HEAD_KEYS[0] in state and classes and state[HEAD_KEYS[0]].shape[0] != classes:
            raise WrongInput(f"checkpoint '{source}' has a head of {state[HEAD_KEYS[0]].shape[0]} classes, "
                             f"model.num_classes is {classes}")
    state = adapt_to_config(state, model_config, reset_head=reset_head, source=str(source))
    if same_head and model_config.num_classes and HEAD_KEYS[0] not in state:
        raise WrongInput(f"the head of checkpoint '{source}' does not fit the model: set model.pre_logits and "
                         f"model.num_classes as the checkpoint was trained")
    return state


def pretrained(source: str | Path, model_config, *, reset_head: bool = False, same_head: bool = False,
               ema: bool = False) -> Callable[[], Mapping | None]:
    """The weights of ``source`` for :func:`pipeline.model.build_model`: read and adapted on rank 0
    alone (:func:`read_pretrained`), None on the other ranks, which receive them from rank 0; a
    failure on rank 0 is raised on every rank."""
    return lambda: on_rank0(lambda: read_pretrained(source, model_config, reset_head=reset_head, same_head=same_head,
                                                    ema=ema))


def export_checkpoint(source: str | Path, out: str | Path, ema: bool = False) -> tuple[Path, Path, int]:
    """A checkpoint (run, checkpoints or stepNNNNNNNN directory; any ZeRO stage and world size)
    as a safetensors file timm loads, and ``out.json`` with the timm arguments (:func:`export_safetensors`);
    its EMA weights with ``ema``; a masked autoencoder's encoder alone (``num_classes`` 0).
    Returns both paths and the parameter count."""
    from pipeline.config import ModelConfig
    from pipeline.model.weights import export_safetensors

    source = checkpoint_dir(source)
    model_config = ModelConfig.model_validate(read_marker(source)["model"])
    mae = trained_objective(source) == "mae"  # its encoder, as a ViT without a head
    if mae:
        model_config = model_config.model_copy(update={"num_classes": 0})
    with torch.device("meta"):  # the model the marker records, built as training built it; no memory
        model = vit_from_config(model_config)
    state = consolidated_state_dict(source, ema=ema)
    if mae:
        state = {k: v for k, v in state.items() if not k.startswith(MAE_DECODER)}
    model.load_state_dict(state, strict=True, assign=True)  # the checkpoint is the model its marker says
    out, config_path = export_safetensors(state, model, out)
    return out, config_path, sum(v.numel() for v in state.values())
