"""Typed run configuration: YAML files with inheritance, dotted overrides, validation.

One YAML file describes one run. Merge order: field defaults < inherited file(s) < the file <
dotted command-line overrides (``optim.lr=3e-4``). The merged tree is validated into the
:class:`Config` sections below; an unknown or mistyped key is a :class:`ConfigError` that names
the key, the file that set it and the closest valid key.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel, ByteSize, ConfigDict, Field, ValidationError, field_serializer, field_validator, model_validator,
)

from pipeline.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
CLI = "the command line"


class ConfigError(UserError, ValueError):
    """A config that cannot be used, with a message naming the key and where it was set."""


OUTPUT_DIR = "{output_dir}"  # in a stage link: this config's run.output_dir


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Section):
    name: str = Field("run", description="Run name; the run directory is output_dir/name.")
    stage: Literal["pretrain", "finetune"] = Field("pretrain", description="Which training stage this config runs.")
    output_dir: str = Field(
        "runs", description="Parent directory of run directories (checkpoints, metrics, resolved config).")
    seed: int = Field(0, description="Global seed for model init, data order and augmentation.")
    experiment: str = Field("vit-pipeline", description="MLflow experiment name.")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db; none: no "
        "tracking (MLflow is not imported).")
    pipeline: str | None = Field(
        None, description="Tag shared by the stages of one pipeline; default $VIT_PIPELINE_ID or the run name. Where "
        "set (or $VIT_PIPELINE_ID), the stages' MLflow runs nest under one parent run.")
    system_metrics_interval: float | None = Field(
        10.0, gt=0.0, description="Seconds between MLflow system-metrics samples (CPU, memory, network, GPU), logged "
        "by one rank per node; null for off.")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


class ModelConfig(Section):
    variant: str = Field("B/16", description="Size and patch, e.g. 'L/16', 'H/14' (see pipeline.model.VARIANTS).")
    image_size: int = Field(224, gt=0, description="Input resolution in pixels (square).")
    num_classes: int = Field(1000, ge=0, description="Classifier outputs; 0 for no head.")
    global_pool: Literal["token", "avg"] = Field(
        "token", description="Pool the class token, or average the patch tokens.")
    class_token: bool = Field(True, description="Prepend a learned class token.")
    qkv_bias: bool = Field(True, description="Bias in the fused qkv projection.")
    pre_logits: int | None = Field(
        None, description="Width of the tanh pre-logits (representation) layer; None for none.")
    layer_scale_init: float | None = Field(None, description="Initial LayerScale value; None disables LayerScale.")
    drop_path_rate: float = Field(
        0.0, ge=0.0, lt=1.0, description="Stochastic depth rate of the last block (linear rule).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout in MLPs and projections.")
    patch_dropout: float = Field(
        0.0, ge=0.0, le=0.75, description="Training only: drop this share of each image's patches at random before "
        "the blocks (FLIP, Li et al. 2023; open_clip's patch_dropout); evaluation sees every patch.")
    distilled: bool = Field(
        False, description="DeiT's distillation token and second head (dist_token, head_dist), for a student "
        "trained against a teacher (distill section); evaluation averages the two heads.")
    compile: bool = Field(
        False, description="Training: torch.compile each transformer block (one graph for all; the first steps "
        "compile it).")

    @property
    def patch_size(self) -> int:
        from pipeline.model.vit import parse_variant

        return parse_variant(self.variant)[1]

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        from pipeline.model.vit import parse_variant

        try:
            _, patch = parse_variant(self.variant)
        except ValueError as e:
            raise ValueError(f"model.variant: {e}") from None
        if self.image_size % patch:
            raise ValueError(f"model.image_size={self.image_size} is not divisible by the patch size {patch} of "
                             f"'{self.variant}'")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("model.global_pool='token' needs model.class_token=true")
        if self.distilled and (self.global_pool != "token" or self.pre_logits):
            raise ValueError("model.distilled needs model.global_pool='token' and model.pre_logits=null (DeiT's "
                             "layout)")
        return self


class DataConfig(Section):
    train_shards: str | None = Field(None, description="Training shards: path, brace pattern, or 'pipe:' command.")
    eval_shards: str | None = Field(None, description="Evaluation shards: path, brace pattern, or 'pipe:' command.")
    num_workers: int = Field(4, ge=0, description="DataLoader worker processes per rank.")
    shuffle_buffer: int | ByteSize = Field(5000, ge=0, description="Shuffle buffer of each worker: samples (5000), or "
                                       "bytes with a unit ('512MiB', '1GB'), turned into samples by the manifest's "
                                       "mean sample size.")
    samples_per_epoch: int | None = Field(
        None, gt=0, description="Samples in one pass; default from the shard manifest.")
    mean: tuple[float, float, float] = Field(
        (0.5, 0.5, 0.5), description="Per-channel mean, on a 0-1 scale (big_vision/ViT: 0.5).")
    std: tuple[float, float, float] = Field((0.5, 0.5, 0.5), description="Per-channel std, on a 0-1 scale.")
    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="RandomResizedCrop area range.")
    crop_ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="RandomResizedCrop aspect-ratio range.")
    hflip: float = Field(0.5, ge=0.0, le=1.0, description="Horizontal flip probability.")
    randaugment: str | None = Field(None, description="RandAugment as 'N,M' (ops, magnitude); None for off.")
    decode: Literal["cpu", "gpu"] = Field("cpu", description="Training images: decoded and cropped in the DataLoader "
                                          "workers ('cpu'), or JPEGs decoded in batches by nvJPEG and cropped on the "
                                          "GPU ('gpu'; workers then read, shuffle and parse headers; other formats "
                                          "still decode in the workers).")
    mixup: float = Field(0.0, ge=0.0, description="MixUp alpha; 0 for off.")
    cutmix: float = Field(0.0, ge=0.0, description="CutMix alpha; 0 for off.")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="Label smoothing of the training loss.")
    crop_pct: float = Field(
        0.875, gt=0.0, le=1.0, description="Evaluation: resize to image_size / crop_pct, then center crop.")

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.decode == "gpu" and self.randaugment:
            raise ValueError("data.randaugment runs on images decoded in the workers; with data.decode='gpu' they "
                             "are decoded on the GPU: set data.decode='cpu' or data.randaugment=null")
        return self

    @field_validator("shuffle_buffer", mode="before")
    @classmethod
    def _samples_unless_unit(cls, value):
        return int(value) if isinstance(value, str) and value.strip().isdigit() else value  # '5000' is samples

    @field_serializer("shuffle_buffer")
    def _keep_the_unit(self, value):
        return f"{int(value)}B" if isinstance(value, ByteSize) else value  # a saved config reads back as a size


class OptimConfig(Section):
    name: Literal["adamw", "sgd"] = Field("adamw", description="Optimizer.")
    lr: float = Field(1e-3, gt=0.0, description="Peak learning rate, after the scaling rule.")
    lr_scaling: Literal["none", "linear", "sqrt"] = Field(
        "none", description="Rule mapping lr to the global batch: lr * (B / lr_base_batch) or its sqrt.")
    lr_base_batch: int = Field(4096, gt=0, description="Batch size at which lr is given, for lr_scaling.")
    weight_decay: float = Field(
        0.05, ge=0.0, description="Decoupled weight decay (not on norms, biases, pos_embed, cls_token).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0.0, description="AdamW epsilon.")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup from 0 to lr, in optimizer steps.")
    min_lr: float = Field(0.0, ge=0.0, description="Learning rate at the end of the decay.")
    layer_decay: float | None = Field(None, gt=0.0, le=1.0, description="Layer-wise LR decay factor; None for off.")
    layer_decay_buckets: int = Field(4, ge=1, description="Quantise layer-wise LR into this many parameter groups.")
    clip_grad: float | None = Field(1.0, gt=0.0, description="Global gradient-norm clip; None for off.")


class TrainConfig(Section):
    global_batch_size: int = Field(4096, gt=0, description="Images per optimizer step across all ranks.")
    micro_batch_size: int = Field(
        32, gt=0, description="Images per rank per forward pass, at most: lowered to a divisor of the per-rank batch "
        "where that is smaller or not a multiple.")
    total_steps: int | None = Field(None, gt=0, description="Optimizer steps; or give total_samples or epochs.")
    total_samples: int | None = Field(None, gt=0, description="Images to train on; sets total_steps.")
    epochs: float | None = Field(None, gt=0.0, description="Passes over data.samples_per_epoch; sets total_steps.")
    stop_at_step: int | None = Field(
        None, gt=0, description="Save and exit cleanly at this step, as a preemption would.")
    log_every: int = Field(10, gt=0, description="Steps between metric lines.")
    checkpoint_every: int = Field(1000, gt=0, description="Steps between checkpoints (one is also written at the end).")
    keep_checkpoints: int = Field(3, ge=1, description="How many recent checkpoints to keep.")
    resume: str = Field("auto", description="'auto' (latest in the run directory), 'never', or a checkpoint path.")
    max_bad_steps: int = Field(
        0, ge=0, description="Optimizer steps with a non-finite loss to skip (their update is dropped) before "
        "stopping the run; bf16 only.")
    device_peak_tflops: float | None = Field(
        None, gt=0.0, description="Peak bf16 TFLOP/s per device for MFU; default from the device table.")
    eval_every: int | None = Field(
        None, gt=0, description="Steps between validations on data.eval_shards (val/top1, val/top5, val/loss; also at "
        "the end); null for none.")
    ema_decay: float | None = Field(
        None, gt=0.0, lt=1.0, description="Keep an exponential moving average of the weights with this decay "
        "(partitioned like the fp32 weights; saved in checkpoints; validated as val_ema/*); null for none.")
    ema_warmup: bool = Field(
        True, description="With ema_decay: ramp the decay up as 1 - (1 + step)^(-2/3) until it reaches ema_decay "
        "(timm's ModelEmaV3 warmup).")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        given = [k for k in ("total_steps", "total_samples", "epochs") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of train.total_steps, train.total_samples, train.epochs, not {given}")
        return self


class DeepSpeedConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(
        2, description="ZeRO stage: 0 off, 1 optimizer, 2 +gradients, 3 +parameters.")
    precision: Literal["bf16", "fp32"] = Field(
        "bf16", description="Training precision (bf16 mixed precision, fp32 master weights).")
    activation_checkpointing: bool = Field(False, description="Recompute block activations in the backward pass.")
    checkpoint_every_n_blocks: int = Field(
        1, ge=1, description="With activation_checkpointing: checkpoint every n-th block.")
    offload_optimizer: Literal["none", "cpu", "nvme"] = Field("none", description="Where ZeRO keeps optimizer states.")
    offload_param: Literal["none", "cpu", "nvme"] = Field(
        "none", description="ZeRO-3: where parameters live between uses.")
    nvme_path: str | None = Field(None, description="Local NVMe directory for nvme offload.")
    overlap_comm: bool = Field(
        True, description="ZeRO-2/3: reduce gradients in buckets during the backward pass (ZeRO-1 in bf16 with fp32 "
        "accumulation all-reduces after it, whatever this says).")
    contiguous_gradients: bool = Field(True, description="Copy gradients into one buffer as they are produced.")
    reduce_bucket_size: int = Field(
        50_000_000, gt=0, description="Elements per gradient reduce bucket; well under the model's size, or the "
        "reduction waits for the whole backward pass.")
    allgather_bucket_size: int = Field(
        500_000_000, gt=0, description="ZeRO-1/2: elements per parameter all-gather bucket.")
    stage3_prefetch_bucket_size: int = Field(50_000_000, gt=0, description="ZeRO-3: elements prefetched ahead of use.")
    stage3_param_persistence_threshold: int = Field(
        100_000, ge=0, description="ZeRO-3: parameters smaller than this stay whole.")
    grad_accum_dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Dtype gradients accumulate in across micro-batches; auto: fp32 at ZeRO 1-3, bf16 at "
        "stage 0 (DeepSpeed's only choice there).")
    reduce_dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="Dtype of the gradient reduction between ranks (DeepSpeed's communication_data_type).")

    @property
    def accumulation_dtype(self) -> str:
        """The gradient-accumulation dtype in effect ('fp32' or 'bf16')."""
        if self.precision == "fp32":
            return "fp32"
        if self.grad_accum_dtype == "auto":
            return "bf16" if self.zero_stage == 0 else "fp32"
        return self.grad_accum_dtype

    @model_validator(mode="after")
    def _check(self) -> "DeepSpeedConfig":
        if self.offload_param != "none" and self.zero_stage != 3:
            raise ValueError("deepspeed.offload_param needs deepspeed.zero_stage=3")
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
        if "nvme" in (self.offload_param, self.offload_optimizer) and not self.nvme_path:
            raise ValueError("nvme offload needs deepspeed.nvme_path")
        if self.zero_stage == 0 and self.precision == "bf16" and self.grad_accum_dtype == "fp32":
            raise ValueError("deepspeed.grad_accum_dtype='fp32' needs deepspeed.zero_stage >= 1 with bf16: DeepSpeed "
                             "accumulates in bf16 at stage 0 (set deepspeed.zero_stage=1, or grad_accum_dtype to auto)")
        return self


class FinetuneConfig(Section):
    init_from: str | None = Field(
        None, description="Pretraining checkpoint directory or .safetensors file to start from; {output_dir}/NAME is "
        "the run NAME under run.output_dir.")
    reset_head: bool = Field(False, description="Re-initialise the head even when the class count matches.")
    freeze_backbone: bool = Field(False, description="Train the head only (linear probe).")
    use_ema: bool = Field(
        False, description="Start from the EMA weights of the init_from checkpoint (its run set train.ema_decay).")


class EvalConfig(Section):
    checkpoint: str | None = Field(
        None, description="Checkpoint directory or .safetensors file to evaluate; {output_dir}/NAME is the run NAME "
        "under run.output_dir.")
    micro_batch_size: int = Field(
        64, gt=0, description="Images per rank per evaluation forward pass (also validation during training).")
    use_ema: bool = Field(False, description="Evaluate the checkpoint's EMA weights (its run set train.ema_decay).")
    log_model: bool = Field(False, description="Log the evaluated weights as an MLflow model of the evaluation run "
                            "(pyfunc: safetensors for timm, model.json, class names; ViT-H/14: 2.5 GB).")
    register_model: str | None = Field(None, description="Register the evaluated model (logged as eval.log_model does) "
                                       "in MLflow's Model Registry under this name, as a new version.")


class DistillConfig(Section):
    type: Literal["none", "soft", "hard"] = Field(
        "none", description="Knowledge distillation from distill.teacher (DeiT, Touvron et al. 2021): 'hard' trains "
        "the distillation head on the teacher's argmax, 'soft' on its softened distribution (KL at distill.tau); "
        "'none' for no teacher.")
    teacher: str | None = Field(
        None, description="The teacher: a run, checkpoints or checkpoint directory of ours (any ZeRO stage or world "
        "size; its model from the checkpoint), or a .safetensors file (ours or timm's) with distill.teacher_model; "
        "{output_dir}/NAME is the run NAME under run.output_dir.")
    teacher_model: ModelConfig | None = Field(
        None, description="The teacher's model settings (variant, image_size, num_classes, ...): needed for a "
        ".safetensors teacher; a checkpoint's must agree.")
    teacher_resolution: Literal["own", "student"] = Field(
        "own", description="'own': the teacher sees the student's batch resized on the device to its own "
        "image_size, as it was trained; 'student': it runs at the student's resolution, its pos_embed resampled.")
    use_ema: bool = Field(
        False, description="The teacher checkpoint's EMA weights (its run set train.ema_decay), as its evaluation "
        "takes them (eval.use_ema).")
    partition: bool = Field(
        False, description="Partition the teacher's weights over the ranks with ZeRO-3 (gathered layer by layer "
        "in its forward) instead of a whole bf16 copy per rank.")
    alpha: float = Field(
        0.5, ge=0.0, le=1.0, description="Weight of the distillation term: (1 - alpha) x label loss + alpha x "
        "distillation loss (DeiT hard: 0.5).")
    tau: float = Field(1.0, gt=0.0, description="Temperature of soft distillation (DeiT soft: 3.0).")


class MaeConfig(Section):
    mask_ratio: float = Field(0.75, gt=0.0, lt=1.0, description="objective=mae: share of each image's patches hidden "
                              "from the encoder (He et al. 2021: 0.75).")
    decoder_dim: int = Field(512, gt=0, description="Width of the MAE decoder (MAE's 512 for ViT-L/H).")
    decoder_depth: int = Field(8, gt=0, description="Transformer blocks of the MAE decoder.")
    decoder_heads: int = Field(16, gt=0, description="Attention heads of the MAE decoder.")
    norm_pix_loss: bool = Field(
        True, description="Reconstruct each patch's pixels normalised by its own mean and variance (MAE's default, "
        "better representations).")

    @model_validator(mode="after")
    def _check(self) -> "MaeConfig":
        if self.decoder_dim % self.decoder_heads:
            raise ValueError(f"mae.decoder_dim={self.decoder_dim} is not divisible by mae.decoder_heads="
                             f"{self.decoder_heads}")
        return self


class KnnConfig(Section):
    train_shards: str | None = Field(
        None, description="Labelled shards whose features form the k-NN bank (sharded over the ranks); with "
        "knn.eval_shards, knn/top1 is logged at every validation (train.eval_every); null for off.")
    eval_shards: str | None = Field(None, description="Labelled shards the k-NN bank classifies for knn/top1.")
    k: int = Field(20, gt=0, description="Neighbours that vote (DINO: 20).")
    temperature: float = Field(
        0.07, gt=0.0, description="Each neighbour votes exp(cosine similarity / temperature) (DINO: 0.07).")

    @model_validator(mode="after")
    def _check(self) -> "KnnConfig":
        if bool(self.train_shards) != bool(self.eval_shards):
            raise ValueError("knn.train_shards and knn.eval_shards go together: the bank and what it classifies")
        return self


OBJECTIVES = ("classification", "distillation", "mae")


class Config(Section):
    objective: Literal[OBJECTIVES] = Field(
        "classification", description="What training optimises (pipeline/train/objectives/): 'classification' on "
        "the labels, 'distillation' from distill.teacher (the default where distill.type is set), 'mae' (masked "
        "autoencoder, He et al. 2021) on images alone.")
    run: RunConfig = Field(default_factory=RunConfig, description="Run identity and tracking.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The ViT.")
    data: DataConfig = Field(default_factory=DataConfig, description="Shards, decoding and augmentation.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer and schedule.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Batch, length, logging, checkpoints.")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig, description="DeepSpeed engine settings.")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="Fine-tuning source and options.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation stage.")
    distill: DistillConfig = Field(default_factory=DistillConfig, description="A teacher to distill from.")
    mae: MaeConfig = Field(default_factory=MaeConfig, description="objective=mae: masking and the decoder.")
    knn: KnnConfig = Field(default_factory=KnnConfig, description="k-NN monitoring of the representation (any "
                           "objective).")

    @model_validator(mode="before")
    @classmethod
    def _objective_of_distill(cls, data):
        """A config that sets distill.type (and no objective) distils, as before objectives existed."""
        if isinstance(data, dict) and "objective" not in data:
            distill = data.get("distill")
            if isinstance(distill, dict) and distill.get("type", "none") != "none":
                data = {**data, "objective": "distillation"}
        return data

    @model_validator(mode="after")
    def _check(self) -> "Config":
        # Stage links name an earlier stage's run under this run.output_dir, resolved here once, so
        # moving a chain's output (run.output_dir=/scratch/runs) moves its links with it.
        for section, key in ((self.finetune, "init_from"), (self.eval, "checkpoint"), (self.distill, "teacher")):
            link = getattr(section, key)
            if link and OUTPUT_DIR in link:
                setattr(section, key, link.replace(OUTPUT_DIR, self.run.output_dir))
        distilling = self.distill.type != "none"
        if (self.objective == "distillation") != distilling:
            raise ValueError(f"objective={self.objective} with distill.type={self.distill.type}: distillation is "
                             "objective=distillation with distill.type hard or soft (and distill.teacher)")
        if self.objective == "mae" and self.model.patch_dropout:
            raise ValueError("model.patch_dropout drops patches for a supervised objective: objective=mae hides them "
                             "with mae.mask_ratio")
        if self.objective == "mae" and (self.model.distilled or self.model.pre_logits):
            raise ValueError("objective=mae trains an encoder without a head: set model.distilled=false and "
                             "model.pre_logits=null")
        if self.objective == "mae" and self.run.stage == "finetune":
            raise ValueError("objective=mae with run.stage=finetune: MAE pretrains; fine-tune its run with "
                             "objective=classification and finetune.init_from")
        if self.distill.type != "none" and not self.distill.teacher:
            raise ValueError(f"distill.type={self.distill.type} needs distill.teacher (a checkpoint directory or "
                             ".safetensors file)")
        if self.run.stage == "finetune" and not self.finetune.init_from:
            raise ValueError("run.stage='finetune' needs finetune.init_from (a checkpoint directory or .safetensors "
                             "file)")
        if self.deepspeed.zero_stage == 0 and self.deepspeed.offload_optimizer != "none":
            raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
        if self.train.max_bad_steps and self.deepspeed.precision != "bf16":
            raise ValueError("train.max_bad_steps needs deepspeed.precision=bf16: DeepSpeed skips the update of a "
                             "non-finite step only under bf16 (check_grad_overflow), an fp32 run would apply it")
        if self.train.eval_every and not (self.data.eval_shards or self.knn.train_shards):
            raise ValueError("train.eval_every validates on data.eval_shards (and knn.*): set them, or "
                             "train.eval_every=null")
        if self.knn.train_shards and not self.train.eval_every:
            raise ValueError("knn.train_shards: k-NN is measured at each validation: set train.eval_every")
        if self.train.ema_decay is not None and self.deepspeed.zero_stage == 0:
            raise ValueError("train.ema_decay keeps the EMA partitioned like ZeRO's fp32 weights: set "
                             "deepspeed.zero_stage to 1, 2 or 3")
        offloads = (self.deepspeed.offload_optimizer, self.deepspeed.offload_param)
        if self.train.ema_decay is not None and "nvme" in offloads:
            raise ValueError("train.ema_decay reads the fp32 weights in place, which NVMe offload swaps out: "
                             "offload to 'cpu' or 'none'")
        return self

    def check_world_size(self, world_size: int) -> None:
        """Refuse a batch that does not split evenly over ``world_size`` ranks."""
        if self.train.global_batch_size % world_size:
            lower = max(world_size, self.train.global_batch_size // world_size * world_size)
            raise ConfigError(
                f"train.global_batch_size={self.train.global_batch_size} does not split over {world_size} ranks: "
                f"set it to a multiple of {world_size}, e.g. train.global_batch_size={lower}")

    def micro_batch(self, world_size: int) -> int:
        """Images per rank per forward pass at ``world_size`` ranks: ``train.micro_batch_size``, or
        the largest divisor of the per-rank batch below it, so one config (whose micro-batch is
        a memory bound) serves any cluster its global batch splits over."""
        self.check_world_size(world_size)
        per_rank = self.train.global_batch_size // world_size
        return max(d for d in range(1, min(self.train.micro_batch_size, per_rank) + 1) if per_rank % d == 0)

    def grad_accumulation_steps(self, world_size: int) -> int:
        return self.train.global_batch_size // (self.micro_batch(world_size) * world_size)

    def total_steps(self, samples_per_epoch: int | None = None) -> int | None:
        """Optimizer steps: ``train.total_steps``, or from ``total_samples``, or from ``epochs`` x
        samples per epoch (``data.samples_per_epoch``, else the one given). None if unknown."""
        t = self.train
        per_epoch = self.data.samples_per_epoch or samples_per_epoch
        if t.total_steps:
            return t.total_steps
        if t.total_samples:
            return max(1, t.total_samples // t.global_batch_size)
        if t.epochs and per_epoch:
            return max(1, int(t.epochs * per_epoch) // t.global_batch_size)
        return None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """The config as ``{'optim.lr': 0.001, ...}``, for MLflow params."""
        return _flatten(self.model_dump(mode="json"))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml())
        return path


# ---------------------------------------------------------------------------------------------
# Loading


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``3e-4`` as a float (YAML 1.1 wants ``3.0e-4``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_scalar(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def resolve_path(name: str | Path) -> Path:
    """A config path as given, else ``configs/NAME`` (``.yaml`` may be left off)."""
    candidates = [Path(name)]
    for base in (Path.cwd() / "configs", CONFIG_DIR):
        candidates += [base / name, base / f"{name}.yaml"]
    for path in candidates:
        if path.is_file():
            return path.resolve()
    raise ConfigError(f"config '{name}' not found (looked for it as a path and under {CONFIG_DIR})")


def inherit_chain(name: str | Path) -> list[Path]:
    """The files a config inherits from, nearest first (``a.yaml`` inheriting ``b.yaml``
    inheriting ``c.yaml`` -> [b, c])."""
    chain, path = [], resolve_path(name)
    while True:
        tree = yaml.load(path.read_text(), Loader=_Loader) or {}
        parent = tree.get("inherit") if isinstance(tree, dict) else None
        if not isinstance(parent, str) or not parent or len(chain) > 32:
            return chain
        path = (path.parent / parent).resolve()
        chain.append(path)


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict, dict[str, str]]:
    """Read a file and what it inherits. Returns the merged tree and, per dotted key, its file."""
    if path in chain:
        raise ConfigError(f"{path}: inherit cycle: {' -> '.join(map(str, chain + (path,)))}")
    try:
        tree = yaml.load(path.read_text(), Loader=_Loader) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(tree).__name__}")
    parent = tree.pop("inherit", None)
    if parent is not None and not isinstance(parent, str):
        raise ConfigError(f"{path}: inherit must name a file, got {parent!r}")
    merged: dict = {}
    origin: dict[str, str] = {}
    if parent:
        parent_path = (path.parent / parent).resolve()
        if not parent_path.is_file():
            raise ConfigError(f"{path}: inherit: '{parent}' not found (looked at {parent_path})")
        merged, origin = _read_yaml(parent_path, chain + (path,))
    _merge(merged, tree, origin, str(path))
    return merged, origin


def _merge(base: dict, update: dict, origin: dict[str, str], source: str, prefix: str = "") -> None:
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, origin, source, f"{dotted}.")
        else:
            base[key] = value
            for leaf in _flatten({key: value}, prefix):
                origin[leaf] = source
            origin[dotted] = source


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def apply_override(tree: dict, origin: dict[str, str], override: str) -> None:
    """Apply one ``a.b.c=value`` override; the value is parsed as a YAML scalar."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{CLI}: override '{override}' is not of the form section.key=value")
    key = key.strip()
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{CLI}: override '{override}': '{part}' is not a section")
    try:
        node[leaf] = parse_scalar(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{CLI}: override '{override}': the value is not valid YAML ({e.problem or e})") from None
    origin[key] = CLI


def _check_keys(tree: dict, origin: dict[str, str]) -> None:
    """Name every unknown key with its file and the closest valid key."""

    def walk(node: dict, schema: type[BaseModel], prefix: str) -> None:
        fields = schema.model_fields
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if key not in fields:
                valid = [f"{prefix}{name}" for name in fields]
                close = difflib.get_close_matches(dotted, valid, n=1, cutoff=0.6)
                hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
                raise ConfigError(f"{origin.get(dotted, CLI)}: unknown key '{dotted}'{hint}")
            sub = fields[key].annotation
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                if not isinstance(value, dict):
                    raise ConfigError(f"{origin.get(dotted, CLI)}: '{dotted}' must be a section (a mapping), got "
                                      f"{value!r}")
                walk(value, sub, f"{dotted}.")

    walk(tree, Config, "")


def load_config(
    name: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    world_size: int | None = None,
) -> Config:
    """Load, merge, override and validate a config.

    ``name`` is a path or a file name under ``configs/`` (None for the defaults). With
    ``world_size``, also checks that the global batch splits over that many ranks.
    """
    tree: dict = {}
    origin: dict[str, str] = {}
    source = CLI
    if name is not None:
        path = resolve_path(name)
        tree, origin = _read_yaml(path)
        source = str(path)
    for override in overrides:
        apply_override(tree, origin, override)
    _check_keys(tree, origin)
    try:
        config = Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_explain(e, origin, source)) from None
    if world_size is not None:
        config.check_world_size(world_size)
    return config


def _explain(error: ValidationError, origin: dict[str, str], source: str) -> str:
    lines = []
    for item in error.errors():
        loc = ".".join(str(p) for p in item["loc"] if not isinstance(p, int))
        # A cross-field error names its keys; blame where those were set, the command line first.
        named = [origin[k] for k in re.findall(r"\b[a-z_]+\.[a-z_0-9]+\b", item["msg"]) if k in origin]
        where = (CLI if CLI in named else named[0]) if named else origin.get(loc, source)
        message = item["msg"].removeprefix("Value error, ")
        if loc and not message.startswith(loc):
            message = f"'{loc}': {message}" + (f" (got {item['input']!r})" if item["type"] != "value_error" else "")
        lines.append(f"{where}: {message}")
    return "invalid config:\n  " + "\n  ".join(lines)
