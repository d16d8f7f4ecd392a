"""Weight import and export: adapt a state dict to a model, read and write safetensors.

Pure tensor work: no DeepSpeed here (consolidating a ZeRO checkpoint lives in
``pipeline.train.consolidate``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from pipeline.errors import MissingInput, WrongInput
from pipeline.model.pos_embed import resample_pos_embed
from pipeline.model.vit import VisionTransformer

log = logging.getLogger(__name__)
PRE_LOGITS_KEYS = ("pre_logits.fc.weight", "pre_logits.fc.bias")
HEAD_KEYS = ("head.weight", "head.bias")
HEADS = HEAD_KEYS + ("head_dist.weight", "head_dist.bias")  # a distilled model's second head too


def adapt_state_dict(state: dict[str, torch.Tensor], model: VisionTransformer, *, reset_head: bool = False,
                     source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Make ``state`` (ours or timm's) fit ``model``, as fine-tuning needs. Only the model's
    structure is read, so a meta-device model serves. Values may be tensors or lazily read
    entries with ``.shape`` and ``.contiguous()``.

    - ``pos_embed`` is resampled to the model's grid (bicubic, antialiased; prefix tokens kept);
    - a distilled model started from an undistilled one keeps its fresh distillation token and
      head, the token's position starting as the class token's;
    - a pre-logits layer the model lacks is dropped;
    - the heads are left out (so the model keeps its fresh ones) when the class count differs or
      ``reset_head``;
    - any other difference is an error naming the keys and shapes.
    """
    state = dict(state)
    target = model.state_dict()
    notes, fresh = [], set(HEADS)  # keys the model may keep as built
    if "dist_token" in target and "dist_token" not in state and "pos_embed" in state:
        old = state["pos_embed"].contiguous()
        state["pos_embed"] = torch.cat([old[:, :1], old[:, :1], old[:, 1:]], dim=1)
        fresh.add("dist_token")
        notes.append("distillation token added (its position the class token's), its head fresh")
    if "pos_embed" in state and state["pos_embed"].shape != target["pos_embed"].shape:
        old = state["pos_embed"].contiguous()  # a lazily read entry is read here
        state["pos_embed"] = resample_pos_embed(old, model.grid_size, num_prefix_tokens=model.num_prefix_tokens)
        notes.append(f"pos_embed resampled {tuple(old.shape)} -> {tuple(state['pos_embed'].shape)}")
    if PRE_LOGITS_KEYS[0] in state and PRE_LOGITS_KEYS[0] not in target:
        for key in PRE_LOGITS_KEYS:
            state.pop(key, None)
        notes.append("pre-logits layer dropped")
        reset_head = reset_head or HEAD_KEYS[0] in state and state[HEAD_KEYS[0]].shape != target[HEAD_KEYS[0]].shape
    if HEAD_KEYS[0] in target and HEAD_KEYS[0] in state:
        if reset_head or state[HEAD_KEYS[0]].shape != target[HEAD_KEYS[0]].shape:
            for key in HEADS:
                state.pop(key, None)
            notes.append(f"head re-initialised for {model.num_classes} classes")
    elif HEAD_KEYS[0] in state:  # a model without a head
        for key in HEADS:
            state.pop(key, None)
    missing = sorted(set(target) - set(state) - fresh)
    unexpected = sorted(set(state) - set(target))
    mismatched = sorted(k for k in set(state) & set(target) if state[k].shape != target[k].shape)
    if missing or unexpected or mismatched:
        lines = [f"{source} does not fit this model:"]
        lines += [f"  {k}: checkpoint {tuple(state[k].shape)}, model {tuple(target[k].shape)}" for k in mismatched[:20]]
        if missing:
            lines.append(f"  missing from the checkpoint: "
                         f"{', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            lines.append(f"  not in the model: {', '.join(unexpected[:20])}{' ...' if len(unexpected) > 20 else ''}")
        raise WrongInput("\n".join(lines))
    if notes:
        log.info("%s: %s", source, "; ".join(notes))
    return state


class LazyTensor:
    """A tensor of a weights file that is read when ``contiguous()`` asks for it, so a loader
    holds one tensor of a checkpoint at a time (``shape`` is known before)."""

    def __init__(self, shape, read: Callable[[], torch.Tensor]):
        self.shape, self._read = torch.Size(shape), read

    def contiguous(self) -> torch.Tensor:
        return self._read()


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"weights file '{path}' not found")
    return load_file(str(path))


def timm_config(model: VisionTransformer) -> dict:
    """The ``timm.models.vision_transformer.VisionTransformer`` arguments that rebuild ``model``."""
    block = model.blocks[0]
    layer_scale = getattr(block.ls1, "init_value", None)
    return {
        "img_size": model.image_size, "patch_size": model.patch_size, "num_classes": model.num_classes,
        "embed_dim": model.embed_dim, "depth": model.depth, "num_heads": block.attn.num_heads,
        "mlp_ratio": block.mlp.fc1.out_features / model.embed_dim, "qkv_bias": block.attn.qkv.bias is not None,
        "class_token": model.cls_token is not None, "global_pool": model.global_pool, "init_values": layer_scale,
    }


def export_safetensors(state: dict[str, torch.Tensor], model: VisionTransformer, out: str | Path,
                       keep_pre_logits: bool = False) -> tuple[Path, Path]:
    """Write weights that timm's ``VisionTransformer`` loads with ``strict=True`` (a pre-logits
    layer, which timm lacks, is dropped along with the head it feeds, unless ``keep_pre_logits``:
    then the file is the whole model, for this pipeline), and ``out.json`` with the timm
    arguments."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    config = timm_config(model)
    if PRE_LOGITS_KEYS[0] in state and not keep_pre_logits:
        for key in PRE_LOGITS_KEYS + HEAD_KEYS:
            state.pop(key, None)
        config["num_classes"] = 0
        log.warning("the pre-logits layer has no timm equivalent: exported without it and without the head")
    save_file(state, str(out), metadata={"format": "pt", "timm_config": json.dumps(config)})
    config_path = out.with_suffix(".json")
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return out, config_path
