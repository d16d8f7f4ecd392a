"""Knowledge distillation (DeiT, Touvron et al. 2021): a frozen teacher beside the student, and
the loss that trains the student's distillation head (or its one head) on the teacher's output.

The teacher is resolved with the run plan (:func:`teacher_spec`: which checkpoint, which model,
at which resolution), read on rank 0 and built on every rank in eval mode, in bf16, without
gradients or optimizer state: a whole copy per rank, or partitioned with ZeRO-3
(``distill.partition``). It sees the student's augmented, mixed batch, resized on the device to
its own resolution where it runs at its own. It is never saved with the student: its identity
(:func:`teacher_identity`: path and digest) is, and a resume with another teacher is refused.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.config import Config, DistillConfig, ModelConfig
from pipeline.errors import MissingInput, WrongInput
from pipeline.model import build_model
from pipeline.train.checkpoint import COMPLETE, architecture, checkpoint_dir, read_marker
from pipeline.train.consolidate import pretrained
from pipeline.train.distributed import on_rank0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherSpec:
    """The teacher a config names: where its weights are, and the model they run in."""

    source: str  # distill.teacher as given
    model: ModelConfig  # as it runs: at the student's image_size with teacher_resolution='student'
    checkpoint: Path | None  # the complete checkpoint of ours it names; None for a weights file
    pending: bool = False  # the run directory of an earlier stage that has not run yet (a dry run)

    @property
    def path(self) -> Path:
        return self.checkpoint if self.checkpoint is not None else Path(self.source)


def teacher_spec(config: Config, earlier: dict[Path, Config] | None = None) -> TeacherSpec | None:
    """The teacher of ``config`` (None without distillation), checked against the student:
    present, a model the checkpoint or ``distill.teacher_model`` describes, the same classes.
    ``earlier``: the run directories that earlier stages of the pipeline will write, with their
    configs (a dry run before they ran): such a teacher is taken as that stage's model."""
    d = config.distill
    if d.type == "none":
        return None
    stage = (earlier or {}).get(Path(d.teacher).resolve())
    pending = stage is not None and not Path(d.teacher).exists()
    if pending:
        model, checkpoint = stage.model, None
    elif str(d.teacher).endswith(".safetensors"):
        if not Path(d.teacher).is_file():
            raise MissingInput(f"distill.teacher={d.teacher}: weights file not found")
        if d.teacher_model is None:
            raise WrongInput(f"distill.teacher={d.teacher} is a weights file: set distill.teacher_model (its variant, "
                             "image_size, num_classes, ...)")
        model, checkpoint = d.teacher_model, None
    else:
        try:
            checkpoint = checkpoint_dir(d.teacher)
        except MissingInput as e:
            raise MissingInput(f"distill.teacher: {e}") from None
        model = ModelConfig.model_validate(read_marker(checkpoint)["model"])
        if d.teacher_model is not None:
            given, saved = architecture(d.teacher_model), architecture(model)
            differ = {k: (saved.get(k), v) for k, v in given.items() if saved.get(k) != v}
            if differ:
                raise WrongInput(f"distill.teacher_model differs from the model of {checkpoint}: " + ", ".join(
                    f"{k}: checkpoint {a!r}, distill.teacher_model {b!r}" for k, (a, b) in differ.items()))
    if model.num_classes != config.model.num_classes:
        raise WrongInput(f"distill.teacher={d.teacher} has {model.num_classes} classes, the student "
                         f"(model.num_classes) {config.model.num_classes}: distillation needs the same classes")
    if d.teacher_resolution == "student":
        model = model.model_copy(update={"image_size": config.model.image_size})
    return TeacherSpec(d.teacher, model.model_copy(update={"drop_path_rate": 0.0, "dropout": 0.0, "patch_dropout": 0.0,
                                                                    "compile": False}),
                       checkpoint, pending)


def teacher_identity(spec: TeacherSpec, ema: bool = False) -> dict:
    """What the student's checkpoints record of the teacher: its path, a digest (of a
    checkpoint's completion marker, which names its step, time and model, and whether its EMA is
    taken; of a weights file's bytes) and, for a checkpoint of ours, the MLflow run that wrote it."""
    if spec.checkpoint is not None:
        marker = (spec.checkpoint / COMPLETE).read_bytes() + (b"ema" if ema else b"")
        return {"path": str(spec.checkpoint.resolve()), "digest": hashlib.sha256(marker).hexdigest()[:16],
                "ema": ema, "mlflow_run_id": read_marker(spec.checkpoint).get("mlflow_run_id")}
    with open(spec.source, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()[:16]
    return {"path": str(Path(spec.source).resolve()), "digest": digest, "ema": False, "mlflow_run_id": None}


def check_same_teacher(saved: dict | None, current: dict | None, checkpoint: Path) -> None:
    """Refuse to resume a student with another teacher than the one its checkpoint recorded (or
    with one where it had none, or none where it had one)."""
    if saved is None and current is None:
        return
    if current is None:
        raise WrongInput(f"checkpoint {checkpoint} was trained with teacher {saved['path']}: set distill as it was, "
                         "or start a new run (another run.name)")
    if saved is None:
        raise WrongInput(f"distill.teacher is set, but checkpoint {checkpoint} was trained without a teacher: "
                         "start a new run (another run.name) or set distill.type=none")
    if saved["digest"] != current["digest"]:
        raise WrongInput(f"checkpoint {checkpoint} was trained with teacher {saved['path']} (digest "
                         f"{saved['digest']}), distill.teacher names {current['path']} (digest "
                         f"{current['digest']}): resume with the same teacher, or start a new run (another run.name)")


class Teacher:
    """The frozen teacher on this rank: ``teacher(images)`` -> fp32 logits, without gradients."""

    def __init__(self, spec: TeacherSpec, device: torch.device, ds_config: dict | None, ema: bool = False):
        import deepspeed

        self.spec, self.dtype, self.size = spec, torch.bfloat16, spec.model.image_size
        weights = pretrained(spec.path, spec.model, same_head=True, ema=ema)
        with torch.random.fork_rng(devices=[]):  # building it leaves the student's RNG as it was
            model = build_model(spec.model, device=device, ds_config=ds_config, zero3=ds_config is not None,
                                weights=weights)
        model.requires_grad_(False)
        if ds_config is None:
            self.module = model.to(self.dtype).eval()
        else:
            self.module, *_ = deepspeed.initialize(model=model, config=ds_config)
            self.module.eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: the student's normalised (and mixed) batch; resized to the teacher's
        resolution where that differs (bilinear, antialiased)."""
        if images.shape[-1] != self.size:
            images = F.interpolate(images.float(), size=(self.size, self.size), mode="bilinear", antialias=True,
                                   align_corners=False)
        return self.module(images.to(self.dtype)).float()


def start_teacher(plan, device: torch.device, is_main: bool) -> tuple[Teacher | None, dict | None]:
    """The run plan's teacher on this rank, and its identity as rank 0 read it; (None, None)
    without distillation."""
    spec = plan.teacher
    if spec is None:
        return None, None
    ema = plan.config.distill.use_ema
    identity = on_rank0(lambda: teacher_identity(spec, ema), share=True)
    teacher = Teacher(spec, device, plan.teacher_deepspeed, ema)
    if is_main:
        log.info("teacher: %s%s (%s at %d px, %s, digest %s), %s distillation, alpha %s", identity["path"],
                 " (its EMA)" if ema else "", spec.model.variant, spec.model.image_size,
                 "ZeRO-3 partitioned" if plan.teacher_deepspeed else "a copy per rank", identity["digest"],
                 plan.config.distill.type, plan.config.distill.alpha)
    return teacher, identity


def distillation_loss(outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor,
                      teacher_logits: torch.Tensor | None, d: DistillConfig,
                      label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, label term, distillation term). ``outputs``: a distilled student's (class,
    distillation) logits, or one head's. The label term is the class head's cross-entropy; the
    distillation term is the distillation head's (the one head's) cross-entropy against the
    teacher's argmax ('hard'), or tau^2 x KL(teacher || student) at temperature tau ('soft');
    without a teacher, a distilled student's second head learns the labels too. The loss is
    (1 - alpha) x label + alpha x distillation."""
    cls, dist = outputs if isinstance(outputs, tuple) else (outputs, outputs)
    base = F.cross_entropy(cls, targets, label_smoothing=label_smoothing)
    if teacher_logits is None:
        term = F.cross_entropy(dist, targets, label_smoothing=label_smoothing) if dist is not cls else base
    elif d.type == "hard":
        term = F.cross_entropy(dist, teacher_logits.argmax(-1))
    else:
        term = F.kl_div(F.log_softmax(dist / d.tau, -1), F.log_softmax(teacher_logits / d.tau, -1),
                        reduction="batchmean", log_target=True) * d.tau ** 2
    alpha = d.alpha if teacher_logits is not None or dist is not cls else 0.0
    return (1 - alpha) * base + alpha * term, base, term
