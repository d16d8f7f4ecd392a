"""The masked autoencoder (He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners";
facebookresearch/mae ``models_mae.py``): our ViT as the encoder, run on the visible patches only,
and a light decoder that fills the hidden ones from mask tokens.

The encoder's parameters keep the classifier's names (timm's), so a fine-tune loads them as they
are; the decoder's are all ``decoder_*`` or ``mask_token``, and are dropped there. Unlike the
reference, the decoder's position embedding is learned (initialised like the encoder's), not a
fixed sine table, so every tensor of the model is a parameter ZeRO partitions and saves alike.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from pipeline.model.layers import Block
from pipeline.model.vit import VisionTransformer, _layer_norm, kept_patches, vit_from_config

MAE_DECODER = ("decoder_", "mask_token")  # what a masked autoencoder has beside its encoder (the ViT's keys)


class MaskedAutoencoder(VisionTransformer):
    """``forward(images, noise)`` -> (predicted pixels of every patch (b, n, p*p*c), mask (b, n): 1
    where the patch was hidden). ``noise`` (b, n) in [0, 1): the patches of the lowest ``num_keep``
    values are visible (MAE's per-sample random masking, from the caller's generator). Without
    ``noise``, the encoder's pooled representation of the whole image (k-NN monitoring)."""

    def __init__(self, *, mask_ratio: float = 0.75, decoder_dim: int = 512, decoder_depth: int = 8,
                 decoder_heads: int = 16, **vit):
        super().__init__(**{**vit, "num_classes": 0})  # no head: the decoder is what trains
        patches = self.grid_size[0] * self.grid_size[1]
        self.num_keep = kept_patches(patches, mask_ratio)
        in_chans = self.patch_embed.proj.in_channels
        self.decoder_embed = nn.Linear(self.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + patches, decoder_dim))
        self.decoder_blocks = nn.Sequential(*[Block(decoder_dim, decoder_heads, 4 * decoder_dim,
                                                    norm_layer=_layer_norm) for _ in range(decoder_depth)])
        self.decoder_norm = _layer_norm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size**2 * in_chans)

    @torch.no_grad()
    def init_module_weights(self, name: str, module: nn.Module) -> None:
        super().init_module_weights(name, module)
        if module is self:  # MAE: mask token ~ N(0, 0.02); the learned decoder positions as the encoder's
            nn.init.normal_(self.mask_token, std=0.02)
            nn.init.trunc_normal_(self.decoder_pos_embed, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token", "decoder_pos_embed"}

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(b, c, H, W) -> (b, n, p*p*c), in the order ``decoder_pred`` predicts."""
        p = self.patch_size
        return rearrange(images, "b c (h p) (w q) -> b (h w) (p q c)", p=p, q=p)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(b, n, p*p*c) -> (b, c, H, W): :meth:`patchify` undone."""
        p, (h, w) = self.patch_size, self.grid_size
        return rearrange(patches, "b (h w) (p q c) -> b c (h p) (w q)", h=h, w=w, p=p, q=p)

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None,
                pre_logits: bool = True) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        if noise is None:
            return super().forward(images, pre_logits=pre_logits)
        order = noise.argsort(dim=1)  # ascending: the first num_keep are visible
        restore = order.argsort(dim=1)
        keep = order[:, :self.num_keep]
        latent = self.forward_features(images, keep)
        mask = torch.ones_like(noise)
        mask[:, :self.num_keep] = 0
        mask = torch.gather(mask, 1, restore)
        return self.forward_decoder(latent, restore), mask

    def forward_decoder(self, latent: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """Visible tokens (b, prefix + k, d) -> every patch's pixels: mask tokens fill the hidden
        places, each patch back at its place (``restore``), positions added, decoder blocks."""
        x = self.decoder_embed(latent)
        prefix, visible = x[:, :self.num_prefix_tokens], x[:, self.num_prefix_tokens:]
        hidden = self.mask_token.expand(x.shape[0], restore.shape[1] - visible.shape[1], -1).to(x.dtype)
        patches = torch.gather(torch.cat([visible, hidden], dim=1), 1,
                               restore[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([prefix, patches], dim=1) + self.decoder_pos_embed.to(x.dtype)
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x[:, self.num_prefix_tokens:])


def mae_from_config(config) -> MaskedAutoencoder:
    """The masked autoencoder of a :class:`pipeline.config.Config`: ``model.*`` the encoder,
    ``mae.*`` the masking and decoder."""
    a = config.mae
    return vit_from_config(config.model, MaskedAutoencoder, mask_ratio=a.mask_ratio, decoder_dim=a.decoder_dim,
                           decoder_depth=a.decoder_depth, decoder_heads=a.decoder_heads)
