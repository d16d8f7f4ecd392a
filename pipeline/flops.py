"""Analytic parameter and FLOP counts for the ViT family, and a table of device peaks (for MFU).

Counts are multiply-accumulates (MACs) of matmuls, convolutions and attention; FLOPs = 2 x MACs.
Norms, softmax, GELU and adds are left out, as in timm's / fvcore's published GMAC figures.

A model that trains as several ViT-like parts (a masked autoencoder's encoder over its visible
patches and its decoder, :func:`mae_shapes`) is a sequence of shapes: the counts marked
``@per_part`` take one shape or a sequence and add up its parts.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Sequence

from pipeline.model.vit import VARIANTS, kept_patches, parse_variant

# Dense bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets (no sparsity).
DEVICE_PEAK_TFLOPS = {
    "B200": 2250.0,
    "H200": 989.4,
    "GH200": 989.4,
    "H100 PCIe": 756.0,
    "H100": 989.4,  # SXM
    "MI300X": 1307.4,
    "A100": 312.0,
    "L40S": 362.1,
    "A10G": 70.0,
    "V100": 125.0,  # fp16: V100 has no bf16
}


def device_peak_tflops(device_name: str) -> float | None:
    """Peak bf16 TFLOP/s for a device name such as 'NVIDIA H100 80GB HBM3'; None if unknown."""
    for key, peak in DEVICE_PEAK_TFLOPS.items():  # the table lists specific names before general ones
        if key in device_name:
            return peak
    return None


@dataclass(frozen=True)
class VitShape:
    width: int
    depth: int
    mlp_dim: int
    heads: int
    patch_size: int
    image_size: int
    num_classes: int = 1000
    class_token: bool = True
    pre_logits: int | None = None
    in_chans: int = 3
    visible_patches: int | None = None  # patches the blocks run over, where fewer than all (MAE's encoder)

    @classmethod
    def from_variant(cls, variant: str, image_size: int, num_classes: int = 1000, **kw) -> "VitShape":
        size, patch = parse_variant(variant)
        width, depth, mlp_dim, heads = VARIANTS[size]
        return cls(width, depth, mlp_dim, heads, patch, image_size, num_classes, **kw)

    @classmethod
    def from_config(cls, model_config) -> "VitShape":
        c = model_config
        return cls.from_variant(c.variant, c.image_size, c.num_classes, class_token=c.class_token,
                                pre_logits=c.pre_logits)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """Tokens the blocks run over: the (visible) patches and the class token."""
        return (self.visible_patches or self.num_patches) + int(self.class_token)


def mae_shapes(shape: VitShape, mask_ratio: float, decoder_dim: int, decoder_depth: int,
               decoder_heads: int) -> tuple[VitShape, VitShape]:
    """A masked autoencoder as two parts: the encoder (``shape`` without a head) over its visible
    patches, and the decoder as a ViT of its width over every token, its pixel prediction
    standing in for a patch embedding (the same size); its input projection is left out."""
    visible = kept_patches(shape.num_patches, mask_ratio)
    encoder = dataclasses.replace(shape, num_classes=0, pre_logits=None, visible_patches=visible)
    decoder = dataclasses.replace(encoder, width=decoder_dim, depth=decoder_depth, mlp_dim=4 * decoder_dim,
                                  heads=decoder_heads, visible_patches=None)
    return encoder, decoder


def per_part(count):
    """``count(shape, ...)`` of one shape, or added up over a sequence of parts."""

    @functools.wraps(count)
    def counted(shape: VitShape | Sequence[VitShape], *args, **kwargs):
        if isinstance(shape, VitShape):
            return count(shape, *args, **kwargs)
        return sum(count(part, *args, **kwargs) for part in shape)

    return counted


@per_part
def param_count(shape: VitShape) -> int:
    d, m, p = shape.width, shape.mlp_dim, shape.patch_size
    patch_embed = shape.in_chans * p * p * d + d
    embeddings = (shape.num_patches + int(shape.class_token)) * d + (d if shape.class_token else 0)  # all positions
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d)  # norms, qkv, proj, mlp
    head_in = shape.pre_logits or d
    pre_logits = d * shape.pre_logits + shape.pre_logits if shape.pre_logits else 0
    head = head_in * shape.num_classes + shape.num_classes if shape.num_classes else 0
    return patch_embed + embeddings + shape.depth * block + 2 * d + pre_logits + head


def blocks_macs(tokens: int, width: int, mlp_dim: int, depth: int) -> int:
    """Multiply-accumulates of ``depth`` transformer blocks over ``tokens`` tokens."""
    n, d, m = tokens, width, mlp_dim
    attention = n * d * 3 * d + 2 * n * n * d + n * d * d  # qkv, q @ k^T and attn @ v, proj
    return depth * (attention + 2 * n * d * m)


@per_part
def forward_macs(shape: VitShape) -> int:
    """Multiply-accumulates of one image's forward pass."""
    d = shape.width
    patch_embed = shape.num_patches * shape.in_chans * shape.patch_size**2 * d
    head_in = shape.pre_logits or d
    head = (d * shape.pre_logits if shape.pre_logits else 0) + head_in * shape.num_classes
    return patch_embed + blocks_macs(shape.num_tokens, d, shape.mlp_dim, shape.depth) + head


@per_part
def train_flops_per_image(shape: VitShape, recompute: bool = False) -> int:
    """Model FLOPs of one training image: forward + backward (2 x forward) = 3 x forward; with
    ``recompute`` (activation checkpointing) the hardware does one more forward."""
    return 2 * forward_macs(shape) * (4 if recompute else 3)


# ---------------------------------------------------------------------------------------------
# Memory (bytes)

# Model states per parameter, DeepSpeed's bf16 mixed-precision Adam: the ZeRO paper's 16 bytes
# (2 bf16 params + 2 bf16 grads + K = 12 for fp32 master weights, momentum and variance) plus the
# fp32 gradient DeepSpeed accumulates into. Which terms are partitioned depends on the stage.
PARAM_16, GRAD_16, GRAD_32, OPTIMIZER = 2, 2, 4, 12


def largest_layer_params(shape: VitShape) -> int:
    """Parameters of the largest single module (what ZeRO-3 gathers at once)."""
    d, m = shape.width, shape.mlp_dim
    return max(d * m + m, m * d + d, d * 3 * d + 3 * d, (shape.pre_logits or d) * shape.num_classes + shape.num_classes)


@per_part
def model_state_bytes(shape: VitShape, zero_stage: int, num_gpus: int) -> int:
    """Parameters, gradients and optimizer states per GPU. Stages 2 and 3 equal DeepSpeed's
    ``estimate_zero{2,3}_model_states_mem_needs`` (no offload)."""
    n, p = num_gpus, param_count(shape)
    if zero_stage == 0:
        return (PARAM_16 + GRAD_16 + GRAD_32 + OPTIMIZER) * p
    if zero_stage == 1:
        return (PARAM_16 + GRAD_16) * p + (GRAD_32 + OPTIMIZER) * p // n
    if zero_stage == 2:
        return PARAM_16 * p + (GRAD_16 + GRAD_32 + OPTIMIZER) * p // n
    # ZeRO-3: everything partitioned, plus one gathered layer (bf16 params and grads).
    return (PARAM_16 + GRAD_16) * largest_layer_params(shape) + (PARAM_16 + GRAD_32 + OPTIMIZER) * p // n


@per_part
def activation_bytes_per_image(shape: VitShape, *, checkpointing: bool, flash: bool = True) -> int:
    """Activations kept for backward, per image, in bf16 (Korthikanti et al. 2022, "Reducing
    Activation Recomputation in Large Transformer Models": s*h*(34 + 5*a*s/h) bytes per layer;
    flash attention drops the 5*a*s^2 score term). With checkpointing every block, each layer
    keeps only its bf16 input (2*s*h) and one layer's activations exist during its recompute."""
    s, h, a = shape.num_tokens, shape.width, shape.heads
    layer = 34 * s * h + (0 if flash else 5 * a * s * s)
    embeddings = 2 * shape.in_chans * shape.image_size**2 + 4 * s * h  # the input, and patch tokens
    if checkpointing:
        return embeddings + shape.depth * 2 * s * h + layer
    return embeddings + shape.depth * layer


def inference_bytes_per_image(shape: VitShape) -> int:
    """Activations alive at once in a forward pass without autograd, per image, in bf16: the
    input, the token stream, and one layer's working set (nothing is kept for a backward)."""
    s, h = shape.num_tokens, shape.width
    return 2 * shape.in_chans * shape.image_size**2 + 4 * s * h + 34 * s * h


def inference_weight_bytes(shape: VitShape, zero_stage: int, num_gpus: int) -> int:
    """bf16 weights per GPU for inference: whole at stages 0-2; at ZeRO-3 a partition plus the
    largest layer, gathered while it runs."""
    if zero_stage == 3:
        return PARAM_16 * (param_count(shape) // num_gpus + largest_layer_params(shape))
    return PARAM_16 * param_count(shape)


def max_micro_batch(shape: VitShape | Sequence[VitShape], zero_stage: int, num_gpus: int, gpu_bytes: float, *,
                    checkpointing: bool, flash: bool = True, reserved_bytes: float = 0.0) -> int:
    """The largest micro-batch whose model states and activations fit ``gpu_bytes - reserved``."""
    free = gpu_bytes - reserved_bytes - model_state_bytes(shape, zero_stage, num_gpus)
    return max(0, int(free // activation_bytes_per_image(shape, checkpointing=checkpointing, flash=flash)))


@per_part
def gradient_bytes_sent_per_gpu(shape: VitShape, zero_stage: int, num_gpus: int) -> float:
    """Bytes each GPU sends per gradient synchronisation (ring algorithms, bf16): an all-reduce
    (stages 0-1) or a reduce-scatter + all-gather (2) moves 2(N-1)/N x 2 bytes x params;
    ZeRO-3 gathers the parameters again in the backward pass (1.5x)."""
    if num_gpus <= 1:
        return 0.0
    volume = 2 * (num_gpus - 1) / num_gpus * PARAM_16 * param_count(shape)
    return volume * (1.5 if zero_stage == 3 else 1.0)
