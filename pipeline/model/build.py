"""Building the configured ViT on every rank of a job: initialised alike everywhere, partitioned as
it is built under ZeRO-3 (DeepSpeed's ``zero.Init``), and filled with weights that one rank read.
What reads the weights (checkpoints, safetensors) is the caller's: :func:`build_model` takes a
reader that returns them on rank 0 and None elsewhere."""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.distributed as dist

from pipeline.model.vit import VisionTransformer, vit_from_config


def build_model(model_config, *, device: torch.device | str = "cpu", ds_config: dict | None = None,
                zero3: bool = False, weights: Callable[[], Mapping | None] | None = None,
                make: Callable[[], VisionTransformer] | None = None) -> VisionTransformer:
    """The configured ViT on every rank, initialised, then filled from ``weights()`` if given
    (``pipeline.train.consolidate.pretrained``: read on rank 0 only, None on the others). Under
    ZeRO-3 parameters are partitioned as each module is built and initialised one module at a
    time, gathered, so no rank holds the whole model; otherwise it is built directly on
    ``device``. ``make``: builds another module than ``model_config``'s ViT (a training
    objective's, such as the masked autoencoder). Seed the RNG alike on every rank first: fresh
    weights must agree."""
    import deepspeed

    with deepspeed.zero.Init(config_dict_or_path=ds_config) if zero3 else torch.device(device):
        model = make() if make is not None else vit_from_config(model_config)
    for name, module in model.named_modules():
        params = list(module.parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0, enabled=zero3 and bool(params)):
            model.init_module_weights(name, module)
    if weights is not None:
        load_weights(model, weights(), zero3=zero3)
    return model


def load_weights(model: torch.nn.Module, state: Mapping | None, *, zero3: bool) -> None:
    """Copy ``state`` into ``model`` on every rank. Only rank 0 passes ``state`` (None elsewhere);
    keys it lacks keep the model's own (fresh, equally seeded) values. Entries are taken one at a
    time and released once copied. ZeRO-3: each module's partitioned parameters are gathered,
    written on rank 0 and re-partitioned from it; otherwise each tensor is broadcast from rank 0."""
    import deepspeed

    state = dict(state) if state is not None else None
    broadcast = not zero3 and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    with torch.no_grad():
        for name, module in model.named_modules():
            prefix = f"{name}." if name else ""
            tensors = dict(module.named_parameters(recurse=False))
            with deepspeed.zero.GatheredParameters(list(tensors.values()), modifier_rank=0,
                                                   enabled=zero3 and bool(tensors)):
                tensors.update(module.named_buffers(recurse=False))
                for key, tensor in tensors.items():
                    if state is not None and prefix + key in state:
                        tensor.copy_(state.pop(prefix + key).contiguous().to(tensor.dtype))
                    if broadcast:
                        dist.broadcast(tensor.data, src=0)
