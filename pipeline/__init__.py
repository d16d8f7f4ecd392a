"""vit-pipeline: distributed ViT pretraining."""
