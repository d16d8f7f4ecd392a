"""The ViT family: model, layers, position-embedding resampling, and weights files (timm's
names, safetensors, lazily read tensors). Of the pipeline it imports only ``errors``: no
DeepSpeed, no distributed code."""

from pipeline.model.pos_embed import resample_pos_embed
from pipeline.model.vit import VARIANTS, VisionTransformer, create_vit, parse_variant, vit_from_config

__all__ = ["VARIANTS", "VisionTransformer", "create_vit", "parse_variant", "resample_pos_embed", "vit_from_config"]
