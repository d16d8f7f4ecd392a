"""The ViT family: model, layers, position-embedding resampling, weights files (timm's names,
safetensors, lazily read tensors), and building the model on every rank of a job
(:func:`build_model`: DeepSpeed's ZeRO-3 partitioned construction, weights one rank read). Of the
pipeline it imports only ``errors``."""

from pipeline.model.build import build_model
from pipeline.model.pos_embed import resample_pos_embed
from pipeline.model.vit import VARIANTS, VisionTransformer, create_vit, head_average, parse_variant, vit_from_config

__all__ = ["VARIANTS", "VisionTransformer", "build_model", "create_vit", "head_average", "parse_variant",
           "resample_pos_embed", "vit_from_config"]
