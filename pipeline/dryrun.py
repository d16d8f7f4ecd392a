"""The dry run: check a stage's whole config chain at the cluster shape it will run on, before the
queue. No GPU, no process group, no tar reading: config, manifests, file existence, arithmetic.

    python launch/train.py --config vit_h14.yaml --dry-run --nodes 4 --gpus-per-node 8

Every problem names the key to change and a value that works; warnings do not fail the run.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import Config, ConfigError, inherit_chain, load_config, resolve_path
from pipeline.data.shards import ShardSet, is_seekable, shards_for_streams
from pipeline.flops import (
    VitShape, activation_bytes_per_image, inference_bytes_per_image, inference_weight_bytes, model_state_bytes,
    param_count,
)
from pipeline.plan import (
    GB, Assumptions, data_host_memory, format_host_memory, plan, teacher_weight_bytes, usable_bytes,
    with_sample_size,
)
from pipeline.tracking import tracking_uri
from pipeline.train.checkpoint import checkpoint_dir, read_marker
from pipeline.train.objectives import objective_of
from pipeline.train.run_plan import JobShape, RunPlan, earlier_runs, resolve

SLURM_DIR = Path(__file__).resolve().parent.parent / "slurm"
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "smbfs", "beegfs", "ceph", "glusterfs",
                       "fuse.glusterfs", "fuse.sshfs", "9p", "weka", "wekafs")


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def add(self, label: str, text: str) -> None:
        self.lines.append(f"  {label:<12}{text}")

    def render(self, title: str) -> str:
        out = [title, *self.lines]
        out += [f"  warning: {w}" for w in self.warnings]
        if self.problems:
            out.append(f"{len(self.problems)} problem(s):")
            out += [f"  - {p}" for p in self.problems]
        else:
            out.append("dry run OK: nothing found that would stop this job")
        return "\n".join(out)


def dry_run(config_name: str, overrides: list[str], *, stage: str, nodes: int, gpus_per_node: int,
            gpu: str = "h100", after: list[str] = (),
            checkpoint: str | None = None) -> tuple[bool, str, RunPlan | None]:
    """Check ``config_name`` + ``overrides`` for ``stage`` ('train' or 'evaluate') on
    ``nodes`` x ``gpus_per_node`` GPUs of kind ``gpu``: resolve its run plan (as the run will),
    then check what the run cannot until it starts (memory fit, host RAM, stage links, tracking).
    ``after`` names the configs of earlier stages of the same pipeline: their run directories
    count as present. Returns (ok, report, the plan)."""
    report = Report()
    title = f"dry run: {config_name} ({stage}) on {nodes} node(s) x {gpus_per_node} {gpu.upper()} = " \
            f"{nodes * gpus_per_node} GPUs"
    try:
        config = load_config(config_name, overrides)
    except ConfigError as e:
        report.problems.append(str(e))
        return False, report.render(title), None
    chain = [resolve_path(config_name), *inherit_chain(config_name)]
    earlier = earlier_stages([*after, *chain[1:]], overrides, report)
    run_plan = resolve(config, JobShape(nodes, gpus_per_node), stage,
                       earlier={path: stage_config for path, (_, stage_config) in earlier.items()})
    report.problems += [str(p) for p in run_plan.problems]
    given = f"; overrides: {' '.join(overrides)}" if overrides else ""
    report.add("config", " <- ".join(_short(p) for p in chain) + given)
    shape = VitShape.from_config(config.model)
    m = config.model
    if config.objective == "mae" and stage == "train":
        a = config.mae
        report.add("model", f"MAE: ViT {m.variant} encoder at {m.image_size} px on {1 - a.mask_ratio:.0%} of the "
                            f"patches, decoder {a.decoder_depth} x {a.decoder_dim} wide, "
                            f"{param_count(objective_of(config).shapes(config)):,} parameters")
    else:
        report.add("model", f"ViT {m.variant} at {m.image_size} px, {param_count(shape):,} parameters, "
                            f"{m.num_classes} classes" + (f", pre-logits {m.pre_logits}" if m.pre_logits else ""))
    report.add("objective", config.objective)
    report.add("precision", f"{run_plan.precision}, ZeRO-{config.deepspeed.zero_stage}")
    assume = Assumptions(gpu=gpu)
    if stage == "train":
        micro = run_plan.micro_batch or config.train.micro_batch_size
        _report_batch(run_plan, report)
        _check_train_memory(run_plan, objective_of(config).shapes(config), micro, assume, report)
        _report_shards(run_plan.train_shards, "train data", report)
        if run_plan.train_shards is not None:
            _check_train_streams(run_plan, report)
        _check_host_memory(config, run_plan.train_shards, micro, gpus_per_node, assume, report)
        _report_shards(run_plan.eval_shards, "eval data", report)
        _report_knn(run_plan, report)
        _report_teacher(run_plan, earlier, report)
        if run_plan.resume is not None:
            report.add("resumes", f"{run_plan.resume}" + (" (another world size: converted to a universal "
                                                          "checkpoint first)" if run_plan.deepspeed and
                                                          "checkpoint" in run_plan.deepspeed else ""))
        if config.run.stage == "finetune":
            _check_link(config, "finetune.init_from", config.finetune.init_from, earlier, report)
        else:
            report.add("starts from", "fresh weights (run.stage: pretrain)")
        _check_slurm_script(run_plan, SLURM_DIR / f"{config.run.stage}.sh", assume, report)
    else:
        _check_eval_memory(config, shape, run_plan.world_size, assume, report)
        _report_shards(run_plan.eval_shards, "eval data", report)
        if run_plan.eval_shards is not None:
            _check_eval_streams(run_plan, report)
        key = "--checkpoint" if checkpoint else "eval.checkpoint"
        _check_link(config, key, checkpoint or config.eval.checkpoint, earlier, report, same_head=True)
        _check_slurm_script(run_plan, SLURM_DIR / "evaluate.sh", assume, report)
    _check_tracking(config, nodes, report)
    return not report.problems, report.render(title), run_plan


def _short(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# -- batch and memory ------------------------------------------------------------------------


def _report_batch(run_plan: RunPlan, report: Report) -> None:
    t, micro = run_plan.config.train, run_plan.micro_batch
    if micro is None:
        return  # the global batch does not split: a problem of the plan
    lowered = f" (train.micro_batch_size {t.micro_batch_size}, lowered to fit the per-rank batch)" \
        if micro != t.micro_batch_size else ""
    report.add("batch", f"global {t.global_batch_size} = micro {micro} x {run_plan.world_size} ranks x accumulation "
                        f"{run_plan.accumulation}{lowered}")
    if run_plan.total_steps:
        report.add("length", f"{run_plan.total_steps:,} optimizer steps, "
                             f"{run_plan.flops_per_image / 1e9:,.1f} GFLOP an image trained")


def _check_train_memory(run_plan: RunPlan, shape, micro: int, assume: Assumptions, report: Report) -> None:
    config, world = run_plan.config, run_plan.world_size
    ds = config.deepspeed
    states = model_state_bytes(shape, ds.zero_stage, world)
    if config.train.ema_decay is not None:  # an fp32 EMA, partitioned over the ranks like the fp32 weights
        states += 4 * param_count(shape) / world
    teacher = teacher_weight_bytes(run_plan)
    activations = micro * activation_bytes_per_image(shape, checkpointing=ds.activation_checkpointing,
                                                     flash=assume.flash_attention)
    if run_plan.teacher is not None:  # its forward's, before the student's are made
        activations = max(activations, micro * inference_bytes_per_image(VitShape.from_config(run_plan.teacher.model)))
    total, usable = states + teacher + activations, usable_bytes(assume)
    with_teacher = f" + {teacher / GB:.1f} GB teacher weights" if run_plan.teacher is not None else ""
    report.add("memory", f"ZeRO-{ds.zero_stage}, checkpointing {'on' if ds.activation_checkpointing else 'off'}: "
                         f"{states / GB:.1f} GB model states{with_teacher} + {activations / GB:.1f} GB activations "
                         f"(micro-batch {micro}) = {total / GB:.1f} GB of {usable / GB:.1f} GB usable per GPU")
    if total > usable:
        rec = plan(run_plan, assume)["recommended"]
        report.problems.append(
            f"memory: {total / GB:.1f} GB per GPU does not fit {usable / GB:.1f} GB usable on a "
            f"{assume.gpu.upper()} ({assume.reserved_gb:.0f} GB reserved, {assume.margin:.0%} margin): launch/plan.py "
            f"recommends deepspeed.zero_stage={rec['zero_stage']} deepspeed.activation_checkpointing="
            f"{str(rec['activation_checkpointing']).lower()} train.micro_batch_size={rec['micro_batch_size']}")


def _check_eval_memory(config: Config, shape: VitShape, world: int, assume: Assumptions, report: Report) -> None:
    stage, micro = config.deepspeed.zero_stage, config.eval.micro_batch_size
    weights = inference_weight_bytes(shape, stage, world)
    activations = micro * inference_bytes_per_image(shape)
    usable = usable_bytes(assume)
    report.add("memory", f"{'ZeRO-3 partitioned' if stage == 3 else 'whole'} bf16 weights {weights / GB:.1f} GB + "
                         f"{activations / GB:.1f} GB activations (eval.micro_batch_size {micro}) of "
                         f"{usable / GB:.1f} GB usable per GPU")
    if weights + activations > usable:
        fits = max(1, int((usable - weights) // inference_bytes_per_image(shape)))
        report.problems.append(f"memory: evaluation needs {(weights + activations) / GB:.1f} GB per GPU, "
                               f"{usable / GB:.1f} GB usable: set eval.micro_batch_size={fits}")


# -- data ----------------------------------------------------------------------------------------


def _report_shards(shards: ShardSet | None, label: str, report: Report) -> None:
    """What the plan resolved for one shard list (its problems are the plan's)."""
    if shards is None:
        return
    remote = sum(not is_seekable(u) for u in shards.urls)
    samples = (f"{shards.num_samples:,} samples" if shards.num_samples is not None
               else "sample count unknown (no manifest)")
    report.add(label, f"{shards.spec}: {len(shards.urls):,} shards, {samples}"
               + (f", {len(shards.classes):,} classes" if shards.classes else "")
               + (f" ({remote} remote, not checked)" if remote else ""))


def _report_knn(run_plan: RunPlan, report: Report) -> None:
    """The k-NN bank and queries, and the features each rank keeps of the bank."""
    if run_plan.knn_shards is None:
        return
    bank, queries = run_plan.knn_shards
    _report_shards(bank, "knn bank", report)
    _report_shards(queries, "knn queries", report)
    m = run_plan.config.model
    width = m.pre_logits or VitShape.from_config(m).width
    per_rank = (bank.num_samples or 0) * width * 4 / run_plan.world_size
    report.add("knn memory", f"{per_rank / 2**20:,.1f} MiB of bank features per rank (fp32, {width} wide), at "
                              f"every validation (train.eval_every)")


def _check_train_streams(run_plan: RunPlan, report: Report) -> None:
    config, shards = run_plan.config, run_plan.train_shards
    if config.data.samples_per_epoch and shards.num_samples and config.data.samples_per_epoch != shards.num_samples:
        report.warnings.append(f"data.samples_per_epoch={config.data.samples_per_epoch:,}, but the manifest holds "
                               f"{shards.num_samples:,} samples: epochs (and train.epochs) count the former")
    report.add("streams", shards_for_streams(len(shards.urls), run_plan.world_size, config.data.num_workers))


def _check_host_memory(config: Config, shards: ShardSet | None, micro: int, gpus_per_node: int,
                       assume: Assumptions, report: Report) -> None:
    """Host RAM of the data path per node, with the manifest's mean sample size when there is one."""
    assume = with_sample_size(assume, shards)
    memory = data_host_memory(config, gpus_per_node, micro, assume)
    report.add("host RAM", format_host_memory(memory))
    if memory["total_gb"] > assume.host_ram_gb / 2:
        report.warnings.append(f"the data path holds {memory['total_gb']:,.0f} GB of host RAM per node, over half of "
                               f"the {assume.host_ram_gb:,.0f} GB of a node: lower data.shuffle_buffer (samples, or a "
                               f"size such as '256MiB') or data.num_workers")


def _check_eval_streams(run_plan: RunPlan, report: Report) -> None:
    shards, streams, world = run_plan.eval_shards, run_plan.streams, run_plan.world_size
    seekable = all(is_seekable(u) for u in shards.urls)
    if len(shards.urls) >= streams:
        how = "whole shards per stream"
    elif seekable:
        how = "fewer shards than streams: each stream opens its shard at its first sample (tar headers only)"
    else:
        how = "fewer remote shards than streams: whole shards, some streams idle"
        report.warnings.append(f"{len(shards.urls)} remote eval shards for {streams} streams: "
                               f"{streams - len(shards.urls)} streams will have nothing to read")
    report.add("streams", f"{streams:,} streams ({world} ranks x {streams // world} workers), {how}")


# -- the SLURM script of the stage ---------------------------------------------------------------


def sbatch_options(script: Path) -> dict[str, str]:
    """The ``#SBATCH --key=value`` lines of ``script`` ({} where it is not there)."""
    if not script.exists():
        return {}
    found = re.findall(r"^#SBATCH\s+--([a-z-]+)=(\S+)", script.read_text(), re.MULTILINE)
    return dict(found)


def slurm_seconds(limit: str) -> int:
    """SLURM's --time formats in seconds: minutes, minutes:seconds, hours:minutes:seconds,
    days-hours, days-hours:minutes, days-hours:minutes:seconds."""
    days, _, clock = limit.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days or len(parts) == 3:
        hours, minutes, seconds = parts + [0] * (3 - len(parts))
    else:
        hours, (minutes, seconds) = 0, (parts + [0])[:2]
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


def _check_slurm_script(run_plan: RunPlan, script: Path, assume: Assumptions, report: Report) -> None:
    """The planner's wall time against the stage script's --time, and the data workers against its
    --cpus-per-task (the SLURM scripts request these unless the sbatch line overrides them)."""
    options = sbatch_options(script)
    if not options:
        return
    name, config = f"slurm/{script.name}", run_plan.config
    if "time" in options and run_plan.total_steps and run_plan.micro_batch and run_plan.stage == "train":
        hours = plan(run_plan, assume)["wall_clock_hours"]
        limit_h = slurm_seconds(options["time"]) / 3600
        report.add("wall time", f"{hours:,.1f} h predicted (planner, {assume.hfu:.0%} hardware FLOP utilisation) "
                                f"against --time={options['time']} ({limit_h:,.1f} h) of {name}")
        if hours > limit_h:
            report.warnings.append(f"the planner predicts {hours:,.1f} h, over {name}'s --time={options['time']}: "
                                   f"the job saves and requeues itself about {int(hours // limit_h)} time(s) "
                                   f"(queue waits between); sbatch --time=... runs it in fewer")
    cpus = int(options.get("cpus-per-task", 0))
    if cpus and config.data.num_workers + 1 > cpus:
        report.warnings.append(f"data.num_workers={config.data.num_workers} workers + the rank need "
                               f"{config.data.num_workers + 1} CPUs, over {name}'s --cpus-per-task={cpus}: set "
                               f"data.num_workers={cpus - 1}, or sbatch --cpus-per-task={config.data.num_workers + 1}")


# -- stage links and tracking ---------------------------------------------------------------


def earlier_stages(configs: list, overrides: list[str], report: Report) -> dict[Path, tuple[str, Config]]:
    """The run directories that the earlier stages ``configs`` (``--after``, then the inherited
    configs) write, with each one's name and config."""
    earlier = {}
    for previous in configs:
        try:
            (path, stage_config), = earlier_runs([previous], overrides).items()
        except ConfigError as e:
            report.warnings.append(f"could not read the earlier stage {previous}: {e}")
            continue
        earlier.setdefault(path, (_short(Path(str(previous))), stage_config))
    return earlier


def _report_teacher(run_plan: RunPlan, earlier: dict[Path, tuple[str, Config]], report: Report) -> None:
    teacher = run_plan.teacher
    if teacher is None:
        return
    where = f"written by the earlier stage {earlier[teacher.path.resolve()][0]}" if teacher.pending else "present"
    how = "ZeRO-3 partitioned" if run_plan.teacher_deepspeed else "a bf16 copy per rank"
    report.add("teacher", f"{teacher.source} ({where}): ViT {teacher.model.variant} at {teacher.model.image_size} px, "
                          f"{how}, {run_plan.teacher_flops_per_image / 1e9:,.1f} GFLOP forward an image "
                          f"({run_plan.config.distill.type} distillation, alpha {run_plan.config.distill.alpha})")


def _check_link(config: Config, key: str, source: str | None, earlier: dict[Path, tuple[str, Config]],
                report: Report, same_head: bool = False) -> None:
    """``source`` must exist, or be the run directory an earlier stage of the pipeline writes."""
    if not source:
        report.problems.append(f"{key} is not set: name the checkpoint (a run directory or .safetensors file)")
        return
    path = Path(source)
    if path.exists():
        try:
            marker = {} if path.suffix == ".safetensors" else read_marker(checkpoint_dir(path)).get("model", {})
        except (OSError, ValueError) as e:
            report.problems.append(f"{key}={source}: {e}")
            return
        report.add("starts from", f"{source} (present)")
        if marker and marker.get("variant") != config.model.variant:
            report.problems.append(f"{key}={source} holds a {marker.get('variant')} model, model.variant is "
                                   f"{config.model.variant}: set model.variant={marker.get('variant')}")
        if same_head and marker and marker.get("num_classes") != config.model.num_classes:
            report.problems.append(f"{key}={source} has {marker.get('num_classes')} classes: set "
                                   f"model.num_classes={marker.get('num_classes')}")
        return
    if path.resolve() in earlier:
        report.add("starts from", f"{source}, written by the earlier stage {earlier[path.resolve()][0]}")
    else:
        known = ", ".join(str(d) for d in earlier) or "none"
        report.problems.append(f"{key}={source} does not exist and is not the run directory of an earlier stage "
                               f"(known: {known}): point it at a checkpoint, or pass the earlier stage's config "
                               f"with --after")


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding ``path`` (its nearest existing parent), from /proc/mounts."""
    path = path.resolve()
    while not path.exists():
        path = path.parent
    best, kind = "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    for line in mounts:
        parts = line.split()
        if len(parts) > 2:
            point = parts[1].replace("\\040", " ")
            if (str(path) == point or str(path).startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                best, kind = point, parts[2]
    return kind


def _check_tracking(config: Config, nodes: int, report: Report) -> None:
    uri = tracking_uri(config.run.tracking_uri)
    if not uri.startswith("sqlite:"):
        report.add("tracking", uri)
        return
    db = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else Path("mlflow.db")
    kind = filesystem_type(db)
    report.add("tracking", f"{uri} (on {kind})")
    if kind in NETWORK_FILESYSTEMS or kind.startswith("fuse."):
        report.warnings.append(f"the MLflow sqlite store {db} is on a network filesystem ({kind}), where concurrent "
                               "writers corrupt it: run an `mlflow server` and set MLFLOW_TRACKING_URI")
    elif nodes > 1:
        report.warnings.append(f"{nodes} nodes track to a local sqlite file ({db}): only rank 0 writes, but reviewing "
                               "runs from several jobs is easier with an `mlflow server` (MLFLOW_TRACKING_URI)")


def main(args, stage: str) -> int:
    """What a launcher's ``--dry-run`` does: print the report (and with ``--plan-json`` write the
    run plan), exit 0 or 1."""
    ok, text, run_plan = dry_run(args.config, args.overrides, stage=stage, nodes=args.nodes,
                                 gpus_per_node=args.gpus_per_node, gpu=args.gpu, after=args.after,
                                 checkpoint=getattr(args, "checkpoint", None))
    print(text)
    if args.plan_json and run_plan is not None:
        Path(args.plan_json).write_text(json.dumps(run_plan.summary(), indent=1) + "\n")
    return 0 if ok else 1
