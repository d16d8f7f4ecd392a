"""The ViT family: model, layers and position-embedding resampling. No DeepSpeed or logging here."""

from pipeline.model.pos_embed import resample_pos_embed
from pipeline.model.vit import VARIANTS, VisionTransformer, create_vit, parse_variant, vit_from_config

__all__ = ["VARIANTS", "VisionTransformer", "create_vit", "parse_variant", "resample_pos_embed", "vit_from_config"]
