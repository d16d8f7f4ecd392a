"""The Vision Transformer (Dosovitskiy et al., 2021) with timm-compatible parameter names.

Sizes come from one table, decoded from strings such as ``"H/14"`` (big_vision's scheme); the
state dict matches timm's ``VisionTransformer``, so weights move both ways with ``strict=True``.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.model.layers import Block, LayerScale, PatchEmbed

# name: (width, depth, mlp_dim, heads). ViT paper Table 1, big_vision's decode_variant and
# Zhai et al. 2022 ("Scaling ViTs") for g and G. "mu" and "pico" are test and demo sizes.
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "mu": (32, 1, 128, 2),
    "pico": (64, 4, 256, 4),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
}


def parse_variant(variant: str) -> tuple[str, int]:
    """``"H/14"`` -> ``("H", 14)``; raises ValueError naming the valid sizes."""
    match = re.fullmatch(r"\s*([A-Za-z]+)\s*/\s*(\d+)\s*", variant)
    if not match:
        raise ValueError(f"variant '{variant}' is not of the form SIZE/PATCH, e.g. 'L/16'")
    size, patch = match.group(1), int(match.group(2))
    if size not in VARIANTS:
        raise ValueError(f"unknown size '{size}' in variant '{variant}'; sizes: {', '.join(VARIANTS)}")
    if patch < 1:
        raise ValueError(f"patch size must be positive in variant '{variant}'")
    return size, patch


class VisionTransformer(nn.Module):
    """ViT classifier. Input (b, c, H, W) float images; output (b, num_classes) logits.

    ``distilled``: DeiT's distillation token (Touvron et al., 2021) with a second head, as timm's
    ``VisionTransformerDistilled`` names them (``dist_token``, ``head_dist``; two prefix tokens in
    ``pos_embed``). In training mode the forward returns both heads' logits (class, distillation);
    in eval mode their average, unless ``separate_heads`` is set (an evaluation that scores each)."""

    def __init__(
        self,
        *,
        image_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_dim: int = 3072,
        qkv_bias: bool = True,
        class_token: bool = True,
        global_pool: Literal["token", "avg"] = "token",
        pre_logits: int | None = None,
        layer_scale_init: float | None = None,
        drop_path_rate: float = 0.0,
        dropout: float = 0.0,
        distilled: bool = False,
        patch_dropout: float = 0.0,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        if distilled and (global_pool != "token" or pre_logits):
            raise ValueError("distilled needs global_pool='token' and no pre_logits (DeiT's, and timm's, layout)")
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.num_features = pre_logits or embed_dim  # width of the pooled representation (timm's name)
        self.global_pool = global_pool
        self.distilled = distilled
        self.separate_heads = False
        self.patch_dropout = patch_dropout
        self.num_prefix_tokens = (1 if class_token else 0) + (1 if distilled else 0)
        self.grad_checkpointing_every = 0

        grid = image_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + grid * grid, embed_dim))
        self.pos_drop = nn.Dropout(dropout)
        # Linear stochastic-depth rule; plain floats so that building on the meta device works.
        drop_path = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(
            *[
                Block(
                    embed_dim,
                    num_heads,
                    mlp_dim,
                    qkv_bias=qkv_bias,
                    drop=dropout,
                    drop_path=drop_path[i],
                    layer_scale_init=layer_scale_init,
                    norm_layer=_layer_norm,
                )
                for i in range(depth)
            ]
        )
        # timm's layout: the final norm sits before pooling for the class token, after it for avg.
        self.norm = _layer_norm(embed_dim) if global_pool == "token" else nn.Identity()
        self.fc_norm = _layer_norm(embed_dim) if global_pool == "avg" else nn.Identity()
        self.pre_logits = (nn.Sequential(OrderedDict(fc=nn.Linear(embed_dim, pre_logits), act=nn.Tanh()))
                           if pre_logits else nn.Identity())
        self.head_drop = nn.Dropout(dropout)
        head_dim = pre_logits or embed_dim
        self.head = nn.Linear(head_dim, num_classes) if num_classes > 0 else nn.Identity()
        if distilled:
            self.head_dist = nn.Linear(head_dim, num_classes) if num_classes > 0 else nn.Identity()

    @property
    def grid_size(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side

    @property
    def depth(self) -> int:
        return len(self.blocks)

    # -- initialisation -----------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self) -> "VisionTransformer":
        """ViT-paper / big_vision initialisation: xavier-uniform linears (q, k, v counted
        separately), LeCun-normal patch embedding, pos_embed ~ N(0, 0.02), zero class token and
        zero-initialised heads; a distillation token ~ N(0, 0.02), as DeiT's."""
        for name, module in self.named_modules():
            self.init_module_weights(name, module)
        return self

    @torch.no_grad()
    def init_module_weights(self, name: str, module: nn.Module) -> None:
        """Initialise one module's own parameters (not its children's); ``name`` as in
        ``named_modules()``. Lets a caller that shards parameters gather one module at a time."""
        if module is self:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            if self.cls_token is not None:
                nn.init.zeros_(self.cls_token)
            if self.dist_token is not None:
                nn.init.trunc_normal_(self.dist_token, std=0.02)
        elif isinstance(module, nn.Linear):
            if name in ("head", "head_dist"):
                nn.init.zeros_(module.weight)
                nn.init.zeros_(module.bias)
                return
            fan_out, fan_in = module.weight.shape
            if name.endswith("attn.qkv"):
                fan_out //= 3
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            nn.init.uniform_(module.weight, -bound, bound)
            if module.bias is not None:
                # big_vision: MLP biases ~ N(0, 1e-6), the others zero.
                nn.init.normal_(module.bias, std=1e-6) if ".mlp." in name else nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            # LeCun normal, truncated at 2 std (the constant is the std of N(0,1) cut at +-2).
            std = math.sqrt(1.0 / module.weight[0].numel()) / 0.87962566103423978
            nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, LayerScale):
            module.gamma.fill_(module.init_value)

    # -- training helpers ---------------------------------------------------------------------

    def set_grad_checkpointing(self, every_n_blocks: int | bool = 1) -> None:
        """Recompute every n-th block in the backward pass (non-reentrant); 0 or False: off."""
        self.grad_checkpointing_every = int(every_n_blocks)

    def compile_blocks(self, **options) -> None:
        """``torch.compile`` each transformer block's residual branches (:meth:`Block.residuals`).
        The blocks share their code, and their stochastic-depth masks come in as tensors, so two
        graphs serve them all (with drop-path masks and without); activation checkpointing
        recomputes through them."""
        for block in self.blocks:
            block.residuals = torch.compile(block.residuals, **options)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "dist_token"}

    def layer_id(self, name: str) -> int:
        """Depth of a parameter for layer-wise LR decay: embeddings 0, block i -> i + 1, rest depth + 1."""
        if name.startswith(("patch_embed", "pos_embed", "cls_token", "dist_token")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.depth + 1

    def freeze_backbone(self) -> None:
        """Train the heads alone (linear probe)."""
        for name, param in self.named_parameters():
            param.requires_grad = name.startswith(("head.", "head_dist."))

    def unfreeze_backbone(self) -> None:
        for param in self.parameters():
            param.requires_grad = True

    # -- forward ------------------------------------------------------------------------------

    def forward_features(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Images (b, c, H, W) -> normalised tokens (b, prefix + n, d). ``keep`` (b, k): the
        patches to run, by index, each with its position (MAE's visible patches, patch dropout);
        the output then holds prefix + k tokens."""
        x = self.patch_embed(x)
        if x.shape[1] + self.num_prefix_tokens != self.pos_embed.shape[1]:
            raise ValueError(
                f"input gives {x.shape[1]} patches but the model was built for {self.image_size}px "
                f"({self.pos_embed.shape[1] - self.num_prefix_tokens} patches); resample pos_embed first"
            )
        tokens = [t for t in (self.cls_token, self.dist_token) if t is not None]
        if keep is None and self.patch_dropout and self.training:  # a random subset of each image's patches
            count = kept_patches(x.shape[1], self.patch_dropout)
            keep = torch.rand(x.shape[0], x.shape[1], device=x.device).argsort(dim=1)[:, :count]
        if keep is None:
            prefix = [t.expand(x.shape[0], -1, -1) for t in tokens]
            if prefix:
                x = torch.cat([*prefix, x], dim=1)
            x = self.pos_drop(x + self.pos_embed)
        else:
            x = x + self.pos_embed[:, self.num_prefix_tokens:]
            x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))
            prefix = [(t + self.pos_embed[:, i:i + 1]).expand(x.shape[0], -1, -1) for i, t in enumerate(tokens)]
            x = self.pos_drop(torch.cat([*prefix, x], dim=1))
        every = self.grad_checkpointing_every
        for i, block in enumerate(self.blocks):
            if every and i % every == 0 and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Tokens (b, n, d) -> logits (b, num_classes), or the pooled representation. Distilled:
        in training both heads' logits, else their average (timm's ``VisionTransformerDistilled``)."""
        if self.distilled:
            x, x_dist = x[:, 0], x[:, 1]
            if pre_logits:
                return (x + x_dist) / 2
            x, x_dist = self.head(x), self.head_dist(x_dist)
            return (x, x_dist) if self.training or self.separate_heads else head_average((x, x_dist))
        x = x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens :].mean(dim=1)
        x = self.pre_logits(self.fc_norm(x))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Logits; with ``pre_logits`` the pooled representation (what k-NN monitoring scores)."""
        return self.forward_head(self.forward_features(x), pre_logits=pre_logits)


def kept_patches(patches: int, dropped: float) -> int:
    """Patches that stay visible when a share ``dropped`` of ``patches`` is hidden (MAE's mask
    ratio, patch dropout): at least one, rounded down as MAE's reference rounds."""
    return max(1, int(patches * (1 - dropped)))


def head_average(output: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The logits a model is scored by: a distilled model's two heads averaged (DeiT, timm), else
    its one head's."""
    return (output[0] + output[1]) / 2 if isinstance(output, tuple) else output


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6)


def create_vit(variant: str, *, num_classes: int, image_size: int, model: type[VisionTransformer] = VisionTransformer,
               **overrides) -> VisionTransformer:
    """Build a ViT from a variant string. ``overrides`` set any constructor argument, including
    the table's ``embed_dim``, ``depth``, ``num_heads`` and ``mlp_dim``. Weights are left as
    constructed: call ``init_weights()`` or load a state dict."""
    size, patch = parse_variant(variant)
    width, depth, mlp_dim, heads = VARIANTS[size]
    kwargs = dict(embed_dim=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads, patch_size=patch)
    kwargs.update(overrides)
    return model(num_classes=num_classes, image_size=image_size, **kwargs)


def vit_from_config(model_config, model: type[VisionTransformer] = VisionTransformer, **extra) -> VisionTransformer:
    """Build the model a :class:`pipeline.config.ModelConfig` describes (``model`` a subclass,
    with ``extra`` arguments of its own)."""
    c = model_config
    return create_vit(
        c.variant,
        model=model,
        num_classes=c.num_classes,
        image_size=c.image_size,
        global_pool=c.global_pool,
        class_token=c.class_token,
        qkv_bias=c.qkv_bias,
        pre_logits=c.pre_logits,
        layer_scale_init=c.layer_scale_init,
        drop_path_rate=c.drop_path_rate,
        dropout=c.dropout,
        distilled=c.distilled,
        patch_dropout=c.patch_dropout,
        **extra,
    )
