"""The resolved run plan: every figure a stage derives from its config and the job's shape,
worked out once. ``--dry-run`` resolves it without hardware and prints it, ``launch/plan.py``
sizes a job against it, and the Trainer and the evaluation build only what it describes, so the
dry run and the real run cannot disagree. Resolving reads manifests and checkpoint markers, never
a tar or a weight; what is wrong is kept in :attr:`RunPlan.problems` (all of them, for the dry
run), and :meth:`RunPlan.check` raises the first (for the run).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.config import Config, load_config
from pipeline.data.shards import ShardSet, check_exist, resolve_shards, shuffle_samples, stream_count
from pipeline.errors import UserError, WrongInput
from pipeline.flops import VitShape, forward_macs
from pipeline.train.checkpoint import architecture, is_universal, read_marker, resolve_resume
from pipeline.train.distill import TeacherSpec, teacher_spec
from pipeline.train.ds_config import build_deepspeed_config, build_eval_deepspeed_config, compute_dtype
from pipeline.train.objectives import objective_of

STAGES = ("train", "evaluate")


@dataclass(frozen=True)
class JobShape:
    """Where a stage runs: ``nodes`` x ``ranks_per_node`` ranks, each computing on a ``device``
    (``cuda`` or ``cpu``)."""

    nodes: int
    ranks_per_node: int
    device: str = "cuda"

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    @classmethod
    def of(cls, placements: list[dict], device: torch.device) -> JobShape:
        """The shape of the running job, from every rank's placement (one host a node)."""
        nodes = len({p["host"] for p in placements})
        return cls(nodes, len(placements) // nodes, device.type)


@dataclass
class RunPlan:
    stage: str  # "train" or "evaluate"
    config: Config
    job: JobShape
    streams: int  # reader streams over the job: ranks x logical workers
    micro_batch: int | None = None  # train: images per rank per forward pass
    accumulation: int | None = None  # train: micro-batches per optimizer step
    total_steps: int | None = None  # train: optimizer steps to run
    samples_per_epoch: int | None = None  # train: data.samples_per_epoch, else the manifest's count
    shuffle_buffer: int | None = None  # train: samples each stream's shuffle buffer holds
    flops_per_image: float | None = None  # train: the model's training FLOPs an image (MFU counts these)
    train_shards: ShardSet | None = None
    eval_shards: ShardSet | None = None  # train: with train.eval_every; evaluate: always
    knn_shards: tuple[ShardSet, ShardSet] | None = None  # train with knn.*: the k-NN bank and its queries
    resume: Path | None = None  # train: the checkpoint this run resumes
    deepspeed: dict | None = None  # train: DeepSpeed's training config
    eval_deepspeed: dict | None = None  # ZeRO-3: the partitioned evaluation's DeepSpeed config
    teacher: TeacherSpec | None = None  # train with distill.type: the teacher and the model it runs in
    teacher_deepspeed: dict | None = None  # distill.partition: the partitioned teacher's DeepSpeed config
    teacher_flops_per_image: float | None = None  # its forward FLOPs an image (beside the student's, not in MFU)
    problems: list[UserError] = field(default_factory=list)

    @property
    def precision(self) -> str:
        """``deepspeed.precision``: what the model computes in."""
        return self.config.deepspeed.precision

    @property
    def dtype(self) -> torch.dtype:
        return compute_dtype(self.config)

    @property
    def world_size(self) -> int:
        return self.job.world_size

    @property
    def zero3(self) -> bool:
        """Whether parameters are partitioned (ZeRO-3): every forward is collective."""
        return self.config.deepspeed.zero_stage == 3

    def check(self) -> RunPlan:
        """The plan, if nothing is wrong; else the first problem, raised."""
        if self.problems:
            raise self.problems[0]
        return self

    def summary(self) -> dict:
        """The plan as JSON: what the dry run prints and the run writes to ``plan.json``."""
        return {
            "stage": self.stage, "objective": self.config.objective,
            "job": {"nodes": self.job.nodes, "ranks_per_node": self.job.ranks_per_node,
                                         "world_size": self.world_size, "device": self.job.device},
            "precision": self.precision, "streams": self.streams, "micro_batch": self.micro_batch,
            "accumulation": self.accumulation, "total_steps": self.total_steps,
            "shuffle_buffer": self.shuffle_buffer, "flops_per_image": self.flops_per_image,
            "train_shards": describe(self.train_shards), "eval_shards": describe(self.eval_shards),
            "knn_shards": [describe(s) for s in self.knn_shards] if self.knn_shards else None,
            "resume": str(self.resume) if self.resume else None,
            "deepspeed": self.deepspeed, "eval_deepspeed": self.eval_deepspeed,
            "teacher": {"path": str(self.teacher.path), "model": architecture(self.teacher.model)}
            if self.teacher else None,
            "teacher_deepspeed": self.teacher_deepspeed, "teacher_flops_per_image": self.teacher_flops_per_image,
            "problems": [str(p) for p in self.problems],
        }

    def write(self, run_dir: Path) -> None:
        """``run_dir/plan.json``: what the stage was built from (rank 0 writes it)."""
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "plan.json").write_text(json.dumps(self.summary(), indent=1) + "\n")


def earlier_runs(configs: list[str], overrides: list[str] = ()) -> dict[Path, Config]:
    """The run directories that the earlier stages ``configs`` of a pipeline write (with the
    same overrides), and their configs: where a later stage may start from before they ran."""
    runs: dict[Path, Config] = {}
    for name in configs:
        stage = load_config(name, list(overrides))
        runs.setdefault(stage.run.run_dir.resolve(), stage)
    return runs


def describe(shards: ShardSet | None) -> dict | None:
    """A shard list in a line: its spec, size, and a digest of the exact URL list."""
    if shards is None:
        return None
    return {"spec": shards.spec, "shards": len(shards.urls), "samples": shards.num_samples,
            "classes": len(shards.classes), "manifest": shards.digest,
            "urls": hashlib.sha256("\n".join(shards.urls).encode()).hexdigest()[:10]}


def resolve(config: Config, job: JobShape, stage: str = "train", *, resume: Path | None | str = "find",
            check_files: bool = True, earlier: dict[Path, Config] | None = None) -> RunPlan:
    """The plan of ``stage`` for ``config`` on ``job``. ``resume``: the checkpoint the run
    resumes, as the ranks agreed on it (the Trainer), or ``"find"`` to look for it as rank 0
    would (the dry run). ``check_files``: check that local shard files exist. ``earlier``: the
    run directories earlier stages will write, and their configs (the dry run's ``--after``)."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r}: one of {STAGES}")
    c, problems = config, []

    def attempt(what, *args, **kwargs):
        try:
            return what(*args, **kwargs)
        except (UserError, OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            problems.append(e if isinstance(e, UserError) else WrongInput(str(e)))
            return None

    world = job.world_size
    plan = RunPlan(stage, c, job, stream_count(world, c.data.num_workers), problems=problems)
    if stage == "train":
        plan.flops_per_image = objective_of(c).flops_per_image(c)
        plan.micro_batch = attempt(c.micro_batch, world)
        if plan.micro_batch is not None:
            plan.accumulation = c.grad_accumulation_steps(world)
        plan.train_shards = attempt(shards_of, "data.train_shards", c.data.train_shards)
        per_epoch = c.data.samples_per_epoch or (plan.train_shards.num_samples if plan.train_shards else None)
        plan.samples_per_epoch, plan.total_steps = per_epoch, c.total_steps(per_epoch)
        if plan.train_shards is not None:
            problems += check_shards("data.train_shards", plan.train_shards, c, check_files)
            if objective_of(c).needs_labels:
                problems += check_labelled("data.train_shards", plan.train_shards, c)
            plan.shuffle_buffer = attempt(shuffle_samples, c.data.shuffle_buffer, plan.train_shards)
            if not per_epoch:
                problems.append(WrongInput(f"data.samples_per_epoch: unknown for {c.data.train_shards} (no manifest): "
                                           "set it, or point data.train_shards at a manifest (make_shards.py --index "
                                           "DIR writes one)"))
            elif plan.total_steps is None:
                problems.append(WrongInput("the run's length is unknown: set train.total_steps, train.total_samples, "
                                           "or train.epochs"))
        plan.resume = attempt(resolve_resume, c.train.resume, c.run.run_dir / "checkpoints") \
            if resume == "find" else resume
        plan.teacher = attempt(teacher_spec, c, earlier)
        if plan.teacher is not None:
            plan.teacher_flops_per_image = 2 * forward_macs(VitShape.from_config(plan.teacher.model))
            if c.distill.partition and plan.micro_batch is not None:
                plan.teacher_deepspeed = {**build_eval_deepspeed_config(c, world, plan.micro_batch),
                                          "bf16": {"enabled": True}}  # the teacher runs in bf16
        if plan.micro_batch is not None:
            universal = plan.resume is not None and (
                is_universal(plan.resume) or read_marker(plan.resume)["world_size"] != world)
            plan.deepspeed = build_deepspeed_config(c, world, load_universal=universal)
    if stage == "train" and c.knn.train_shards:
        plan.knn_shards = attempt(knn_shards_of, c, check_files)
    if stage == "evaluate" or c.train.eval_every and c.data.eval_shards:
        plan.eval_shards = attempt(shards_of, "data.eval_shards", c.data.eval_shards)
        if plan.eval_shards is not None:
            problems += check_shards("data.eval_shards", plan.eval_shards, c, check_files)
            if stage == "evaluate" or objective_of(c).needs_labels:
                problems += check_labelled("data.eval_shards", plan.eval_shards, c)
    if plan.zero3:
        plan.eval_deepspeed = build_eval_deepspeed_config(c, world)
    return plan


def shards_of(key: str, spec: str | None) -> ShardSet:
    """The shards ``key`` names (its manifest read once)."""
    if not spec:
        raise WrongInput(f"{key} is not set: give a manifest (DIR/train.json from launch/make_shards.py)")
    try:
        return resolve_shards(spec, check_exists=False)
    except UserError as e:
        raise type(e)(f"{key}={spec}: {e}") from None


def knn_shards_of(config: Config, check_files: bool) -> tuple[ShardSet, ShardSet]:
    """The k-NN bank and queries: labelled, local files present, with the same classes."""
    k = config.knn
    bank, queries = shards_of("knn.train_shards", k.train_shards), shards_of("knn.eval_shards", k.eval_shards)
    for key, shards in (("knn.train_shards", bank), ("knn.eval_shards", queries)):
        if check_files:
            check_exist(shards)
        for problem in check_labelled(key, shards, config):
            raise problem
        if not shards.classes:
            raise WrongInput(f"{key}={shards.spec}: no classes in its manifest (k-NN needs labelled shards)")
    if bank.classes != queries.classes:
        raise WrongInput(f"knn.eval_shards={k.eval_shards} lists {len(queries.classes)} classes "
                         f"({', '.join(queries.classes[:3])}, ...), knn.train_shards={k.train_shards} "
                         f"{len(bank.classes)} ({', '.join(bank.classes[:3])}, ...): the bank votes for its classes, "
                         "the queries must have the same")
    return bank, queries


def check_labelled(key: str, shards: ShardSet, config: Config) -> list[UserError]:
    """A problem where the manifest of ``shards`` says they carry no labels."""
    if shards.labelled is not False:
        return []
    return [WrongInput(f"{key}={shards.spec}: its shards carry no labels (no .cls in {shards.urls[0]}, as its "
                       f"manifest says): objective={config.objective} needs them; objective=mae trains on images "
                       "alone")]


def check_shards(key: str, shards: ShardSet, config: Config, check_files: bool) -> list[UserError]:
    """What is wrong with ``shards``: a local file missing, more classes than the model's."""
    problems: list[UserError] = []
    if check_files:
        try:
            check_exist(shards)
        except UserError as e:
            problems.append(type(e)(f"{key}={shards.spec}: {e}"))
    if len(shards.classes) > config.model.num_classes:
        problems.append(WrongInput(f"model.num_classes={config.model.num_classes}, but {shards.spec} lists "
                                   f"{len(shards.classes)} classes: set model.num_classes={len(shards.classes)}"))
    return problems
