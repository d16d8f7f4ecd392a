"""Masked autoencoding (He et al. 2021): the encoder sees a random quarter of each image's patches,
the decoder reconstructs the rest, and the loss is the mean squared error on the hidden patches
(of each patch's pixels normalised by its own mean and variance, ``mae.norm_pix_loss``). No labels.

The masks come from the rank's torch generator, which checkpoints keep per rank, so a stopped and
resumed run draws the masks a straight run would. Validation reconstructs the evaluation shards
under masks fixed by each sample's place in them, the same on any number of ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline.data import eval_batches
from pipeline.train.objectives.base import Objective, finite_sums, window_mean


class MaskedAutoencoding(Objective):
    name = "mae"
    needs_labels = False
    sums = ("loss", "finite")
    headline = "val/loss"

    def __init__(self, config, plan, device, is_main):
        super().__init__(config, plan, device, is_main)
        self.num_patches = (config.model.image_size // config.model.patch_size) ** 2

    @classmethod
    def build(cls, config):
        from pipeline.model.mae import mae_from_config

        return mae_from_config(config)

    @classmethod
    def shapes(cls, config):
        from pipeline.flops import VitShape, mae_shapes

        m = config.mae
        return mae_shapes(VitShape.from_config(config.model), m.mask_ratio, m.decoder_dim, m.decoder_depth,
                          m.decoder_heads)

    def loss(self, engine, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Each image's mean squared error over its hidden patches (b,), in fp32."""
        pred, mask = engine(images.to(self.plan.dtype), noise)
        module = getattr(engine, "module", engine)
        target = module.patchify(images.float())
        if self.config.mae.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        error = (pred.float() - target).pow(2).mean(-1)
        return (error * mask).sum(1) / mask.sum(1)

    def step(self, engine, images, labels):
        noise = torch.rand(images.shape[0], self.num_patches, device=images.device)
        loss = self.loss(engine, images, noise).mean()
        return loss, finite_sums(loss.detach())

    def record(self, sums, images, per_device_images_per_s):
        return {"loss": window_mean(sums, "loss")}

    @torch.no_grad()
    def validate(self, engine, stream, normalize, prefix):
        """The reconstruction loss over the evaluation shards, each sample masked by a generator
        seeded with its index in them."""
        n = self.num_patches
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss, samples
        zero3 = self.config.deepspeed.zero_stage == 3
        for batch in tqdm(eval_batches(stream), total=stream.batches_per_rank, disable=not self.is_main, desc=prefix,
                          unit="batch", leave=False, dynamic_ncols=True):
            if not zero3 and not batch.mask.any():
                continue  # padding: only ZeRO-3's collective forwards need every rank's batch
            noise = torch.stack([torch.rand(n, generator=torch.Generator().manual_seed(int(i)))
                                 for i in batch.index.clamp(min=0)]).to(self.device)
            images = normalize(batch.images.to(self.device))
            weight = batch.mask.to(self.device).double()
            sums += torch.stack([(self.loss(engine, images, noise).double() * weight).sum(), weight.sum()])
        dist.all_reduce(sums)
        loss, count = sums.tolist()
        return {f"{prefix}/loss": loss / max(count, 1)}
