"""Masked autoencoding (He et al. 2021): the encoder sees a random quarter of each image's patches,
the decoder reconstructs the rest, and the loss is the mean squared error on the hidden patches
(of each patch's pixels normalised by its own mean and variance, ``mae.norm_pix_loss``). No labels.

The masks come from the rank's torch generator, which checkpoints keep per rank, so a stopped and
resumed run draws the masks a straight run would. Validation reconstructs the evaluation shards
under masks fixed by each sample's place in them, the same on any number of ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
from einops import rearrange
from tqdm import tqdm

from pipeline.data import eval_batches
from pipeline.train.metrics import window_mean
from pipeline.train.objectives.base import Objective, finite_sums


PICTURED = 8  # validation images in each reconstruction picture


class MaskedAutoencoding(Objective):
    name = "mae"
    needs_labels = False
    sums = ("loss", "finite")
    headline = "val/loss"

    def __init__(self, config, plan, device, is_main):
        super().__init__(config, plan, device, is_main)
        self.num_patches = (config.model.image_size // config.model.patch_size) ** 2
        self.shown = None  # rank 0's first validation images, their reconstruction and mask

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
        return self.reconstruct(engine, images, noise)[0]

    def reconstruct(self, engine, images: torch.Tensor, noise: torch.Tensor):
        """(each image's loss (b,), predicted patches, mask): the forward, and the loss in fp32."""
        pred, mask = engine(images.to(self.plan.dtype), noise)
        target = self.patches(engine).patchify(images.float())
        if self.config.mae.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        error = (pred.float() - target).pow(2).mean(-1)
        return (error * mask).sum(1) / mask.sum(1), pred, mask

    @staticmethod
    def patches(engine):
        """What cuts images into patches and back (the module: no parameter is involved)."""
        return getattr(engine, "module", engine)

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
        zero3 = self.plan.zero3
        if prefix == "val":
            self.shown = None
        for batch in tqdm(eval_batches(stream), total=stream.batches_per_rank, disable=not self.is_main, desc=prefix,
                          unit="batch", leave=False, dynamic_ncols=True):
            if not zero3 and not batch.mask.any():
                continue  # padding: only ZeRO-3's collective forwards need every rank's batch
            noise = torch.stack([torch.rand(n, generator=torch.Generator().manual_seed(int(i)))
                                 for i in batch.index.clamp(min=0)]).to(self.device)
            images = normalize(batch.images.to(self.device))
            weight = batch.mask.to(self.device).double()
            loss, pred, mask = self.reconstruct(engine, images, noise)
            sums += torch.stack([(loss.double() * weight).sum(), weight.sum()])
            if self.shown is None and self.is_main and prefix == "val":
                self.shown = (self.patches(engine), images[:PICTURED], pred[:PICTURED], mask[:PICTURED])
        dist.all_reduce(sums)
        loss, count = sums.tolist()
        return {f"{prefix}/loss": loss / max(count, 1)}

    @torch.no_grad()
    def picture(self):
        """Rows of the first validation images: masked input, reconstruction (the visible patches
        pasted back, as MAE's figures show it), original; rank 0's, at the last validation."""
        if self.shown is None:
            return None
        module, images, pred, mask = self.shown
        target = module.patchify(images)
        if self.config.mae.norm_pix_loss:  # predictions are of normalised patches: undo with the true statistics
            pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
        hidden = module.unpatchify(mask[..., None].expand_as(target).float())
        masked = images * (1 - hidden)
        pasted = masked + module.unpatchify(pred.float()) * hidden
        rows = torch.stack([masked, pasted, images])  # (3, b, c, H, W)
        mean = torch.tensor(self.config.data.mean, device=images.device).view(1, 1, 3, 1, 1)
        std = torch.tensor(self.config.data.std, device=images.device).view(1, 1, 3, 1, 1)
        pixels = ((rows * std + mean).clamp(0, 1) * 255).round().byte()
        scale = max(1, 96 // images.shape[-1])  # small images shown big enough to see
        pixels = pixels.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
        return rearrange(pixels, "r b c h w -> (r h) (b w) c").cpu().numpy()
