"""Transformer building blocks with timm's ``VisionTransformer`` parameter names.

Shapes use one set of axis letters: b batch, n tokens, d width, h heads.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class PatchEmbed(nn.Module):
    """Image (b, c, H, W) -> patch tokens (b, n, d) with a strided convolution."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}x{width} is not divisible by the patch size {self.patch_size}")
        return rearrange(self.proj(x), "b d gh gw -> b (gh gw) d")


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and SDPA (flash attention on GPU)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj_drop(self.proj(rearrange(x, "b h n d -> b n (h d)")))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, act_layer: Callable[[], nn.Module] = nn.GELU, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class LayerScale(nn.Module):
    """Per-channel residual scale (CaiT, DeiT III)."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        *,
        qkv_bias: bool = True,
        drop: float = 0.0,
        drop_path: float = 0.0,
        layer_scale_init: float | None = None,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        act_layer: Callable[[], nn.Module] = nn.GELU,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_drop=drop)
        self.ls1 = LayerScale(dim, layer_scale_init) if layer_scale_init is not None else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, mlp_dim, act_layer=act_layer, drop=drop)
        self.ls2 = LayerScale(dim, layer_scale_init) if layer_scale_init is not None else nn.Identity()
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Stochastic depth drops a whole residual branch per sample (torchvision's stochastic_depth,
        # "row" mode). Its keep masks are drawn here, outside :meth:`residuals` (the part
        # ``VisionTransformer.compile_blocks`` compiles), so every block's rate reaches the graph
        # as a tensor: as a float it would be a constant, one graph per block and past dynamo's
        # recompile limit the rest eager. Blocks then share two graphs: with masks and without.
        scales = None
        if self.drop_path and self.training:
            keep = 1.0 - self.drop_path
            scales = x.new_empty(2, x.shape[0], 1, 1).bernoulli_(keep).div_(keep)
        return self.residuals(x, scales)

    def residuals(self, x: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
        """Both residual branches; ``scales`` (2, b, 1, 1) weighs each sample's branches (drop path)."""
        branch = self.ls1(self.attn(self.norm1(x)))
        x = x + (branch if scales is None else branch * scales[0])
        branch = self.ls2(self.mlp(self.norm2(x)))
        return x + (branch if scales is None else branch * scales[1])
