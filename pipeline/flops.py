"""Analytic parameter and FLOP counts for the ViT family, and a table of device peaks (for MFU).

Counts are multiply-accumulates (MACs) of matmuls, convolutions and attention; FLOPs = 2 x MACs.
Norms, softmax, GELU and adds are left out, as in timm's / fvcore's published GMAC figures.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.model.vit import VARIANTS, parse_variant

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

    @classmethod
    def from_variant(cls, variant: str, image_size: int, num_classes: int = 1000, **kw) -> "VitShape":
        size, patch = parse_variant(variant)
        width, depth, mlp_dim, heads = VARIANTS[size]
        return cls(width, depth, mlp_dim, heads, patch, image_size, num_classes, **kw)

    @classmethod
    def from_config(cls, model_config) -> "VitShape":
        c = model_config
        return cls.from_variant(c.variant, c.image_size, c.num_classes, class_token=c.class_token, pre_logits=c.pre_logits)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        return self.num_patches + int(self.class_token)


def param_count(shape: VitShape) -> int:
    d, m, p = shape.width, shape.mlp_dim, shape.patch_size
    patch_embed = shape.in_chans * p * p * d + d
    embeddings = shape.num_tokens * d + (d if shape.class_token else 0)
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d)  # norms, qkv, proj, mlp
    head_in = shape.pre_logits or d
    pre_logits = d * shape.pre_logits + shape.pre_logits if shape.pre_logits else 0
    head = head_in * shape.num_classes + shape.num_classes if shape.num_classes else 0
    return patch_embed + embeddings + shape.depth * block + 2 * d + pre_logits + head


def forward_macs(shape: VitShape) -> int:
    """Multiply-accumulates of one image's forward pass."""
    n, d, m = shape.num_tokens, shape.width, shape.mlp_dim
    patch_embed = shape.num_patches * shape.in_chans * shape.patch_size**2 * d
    attention = n * d * 3 * d + 2 * n * n * d + n * d * d  # qkv, q @ k^T and attn @ v, proj
    mlp = 2 * n * d * m
    head_in = shape.pre_logits or d
    head = (d * shape.pre_logits if shape.pre_logits else 0) + head_in * shape.num_classes
    return patch_embed + shape.depth * (attention + mlp) + head


def train_flops_per_image(shape: VitShape, recompute: bool = False) -> int:
    """Model FLOPs of one training image: forward + backward (2 x forward) = 3 x forward; with
    ``recompute`` (activation checkpointing) the hardware does one more forward."""
    return 2 * forward_macs(shape) * (4 if recompute else 3)
