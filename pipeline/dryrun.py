"""The dry run: check a stage's whole config chain at the cluster shape it will run on, before the
queue. No GPU, no process group, no tar reading: config, manifests, file existence, arithmetic.

    python launch/train.py --config vit_h14.yaml --dry-run --nodes 4 --gpus-per-node 8

Every problem names the key to change and a value that works; warnings do not fail the run.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import Config, ConfigError, inherit_chain, load_config, resolve_path
from pipeline.data.shards import (
    ShardSet, check_exist, is_seekable, logical_workers, resolve_shards, shards_for_streams, shuffle_samples,
    stream_count,
)
from pipeline.flops import (
    VitShape, activation_bytes_per_image, inference_bytes_per_image, inference_weight_bytes, model_state_bytes,
    param_count,
)
from pipeline.plan import GB, Assumptions, data_host_memory, format_host_memory, plan, usable_bytes
from pipeline.tracking import tracking_uri
from pipeline.train.checkpoint import checkpoint_dir, read_marker

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
            gpu: str = "h100", after: list[str] = (), checkpoint: str | None = None) -> tuple[bool, str]:
    """Check ``config_name`` + ``overrides`` for ``stage`` ('train' or 'evaluate') on
    ``nodes`` x ``gpus_per_node`` GPUs of kind ``gpu``. ``after`` names the configs of earlier
    stages of the same pipeline: their run directories count as present. Returns (ok, report)."""
    report = Report()
    title = f"dry run: {config_name} ({stage}) on {nodes} node(s) x {gpus_per_node} {gpu.upper()} = " \
            f"{nodes * gpus_per_node} GPUs"
    try:
        config = load_config(config_name, overrides)
    except ConfigError as e:
        report.problems.append(str(e))
        return False, report.render(title)
    world = nodes * gpus_per_node
    chain = [resolve_path(config_name), *inherit_chain(config_name)]
    given = f"; overrides: {' '.join(overrides)}" if overrides else ""
    report.add("config", " <- ".join(_short(p) for p in chain) + given)
    shape = VitShape.from_config(config.model)
    m = config.model
    report.add("model", f"ViT {m.variant} at {m.image_size} px, {param_count(shape):,} parameters, {m.num_classes} "
                        f"classes" + (f", pre-logits {m.pre_logits}" if m.pre_logits else ""))
    assume = Assumptions(gpu=gpu)
    if stage == "train":
        micro = _check_batch(config, world, report)
        _check_train_memory(config, shape, micro or config.train.micro_batch_size, nodes, gpus_per_node, assume,
                            report)
        shards = _check_shards(config, "data.train_shards", config.data.train_shards, report)
        if shards is not None:
            _check_train_streams(config, shards, world, report)
        _check_host_memory(config, shards, micro or config.train.micro_batch_size, gpus_per_node, assume, report)
        if config.train.eval_every:
            _check_shards(config, "data.eval_shards", config.data.eval_shards, report)
        if config.run.stage == "finetune":
            _check_link(config, "finetune.init_from", config.finetune.init_from, chain[1:], after, overrides, report)
        else:
            report.add("starts from", "fresh weights (run.stage: pretrain)")
    else:
        _check_eval_memory(config, shape, world, assume, report)
        shards = _check_shards(config, "data.eval_shards", config.data.eval_shards, report)
        if shards is not None:
            _check_eval_streams(config, shards, world, report)
        key = "--checkpoint" if checkpoint else "eval.checkpoint"
        _check_link(config, key, checkpoint or config.eval.checkpoint, chain[1:], after, overrides, report,
                    same_head=True)
    _check_tracking(config, nodes, report)
    return not report.problems, report.render(title)


def _short(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# -- batch and memory ------------------------------------------------------------------------


def _check_batch(config: Config, world: int, report: Report) -> int | None:
    """The micro-batch at ``world`` ranks, or None (a problem) if the global batch does not split."""
    t = config.train
    try:
        micro = config.micro_batch(world)
    except ConfigError as e:
        report.problems.append(str(e))
        return None
    lowered = f" (train.micro_batch_size {t.micro_batch_size}, lowered to fit the per-rank batch)" \
        if micro != t.micro_batch_size else ""
    report.add("batch", f"global {t.global_batch_size} = micro {micro} x {world} ranks x accumulation "
                        f"{config.grad_accumulation_steps(world)}{lowered}")
    return micro


def _check_train_memory(config: Config, shape: VitShape, micro: int, nodes: int, gpus_per_node: int,
                        assume: Assumptions, report: Report) -> None:
    ds = config.deepspeed
    states = model_state_bytes(shape, ds.zero_stage, nodes * gpus_per_node)
    if config.train.ema_decay is not None:  # an fp32 EMA, partitioned over the ranks like the fp32 weights
        states += 4 * param_count(shape) / (nodes * gpus_per_node)
    activations = micro * activation_bytes_per_image(shape, checkpointing=ds.activation_checkpointing,
                                                     flash=assume.flash_attention)
    usable = usable_bytes(assume)
    report.add("memory", f"ZeRO-{ds.zero_stage}, checkpointing {'on' if ds.activation_checkpointing else 'off'}: "
                         f"{states / GB:.1f} GB model states + {activations / GB:.1f} GB activations (micro-batch "
                         f"{micro}) = {(states + activations) / GB:.1f} GB of {usable / GB:.1f} GB usable per GPU")
    if states + activations > usable:
        rec = plan(config, nodes, gpus_per_node, assume)["recommended"]
        report.problems.append(
            f"memory: {(states + activations) / GB:.1f} GB per GPU does not fit {usable / GB:.1f} GB usable on a "
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


def _check_shards(config: Config, key: str, spec: str | None, report: Report) -> ShardSet | None:
    """Read the manifest and check that every local shard file exists (without opening it)."""
    if not spec:
        report.problems.append(f"{key} is not set: give a manifest (DIR/train.json from launch/make_shards.py)")
        return None
    try:
        shards = resolve_shards(spec, check_exists=False)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        report.problems.append(f"{key}={spec}: {e}")
        return None
    try:
        check_exist(shards)
    except FileNotFoundError as e:
        report.problems.append(f"{key}={spec}: {e}")
    remote = sum(not is_seekable(u) for u in shards.urls)
    samples = (f"{shards.num_samples:,} samples" if shards.num_samples is not None
               else "sample count unknown (no manifest)")
    report.add(key.split(".")[1].replace("_shards", " data"),
               f"{spec}: {len(shards.urls):,} shards, {samples}"
               + (f", {len(shards.classes):,} classes" if shards.classes else "")
               + (f" ({remote} remote, not checked)" if remote else ""))
    if shards.classes and len(shards.classes) > config.model.num_classes:
        report.problems.append(f"model.num_classes={config.model.num_classes}, but {spec} lists "
                               f"{len(shards.classes)} classes: set model.num_classes={len(shards.classes)}")
    return shards


def _check_train_streams(config: Config, shards: ShardSet, world: int, report: Report) -> None:
    if config.data.samples_per_epoch is None and shards.num_samples is None:
        report.problems.append(f"data.samples_per_epoch: unknown for {config.data.train_shards} (no manifest): set it, "
                               "or point data.train_shards at a manifest (make_shards.py --index DIR writes one)")
    elif config.data.samples_per_epoch and shards.num_samples and config.data.samples_per_epoch != shards.num_samples:
        report.warnings.append(f"data.samples_per_epoch={config.data.samples_per_epoch:,}, but the manifest holds "
                               f"{shards.num_samples:,} samples: epochs (and train.epochs) count the former")
    report.add("streams", shards_for_streams(len(shards.urls), world, config.data.num_workers))


def _check_host_memory(config: Config, shards: ShardSet | None, micro: int, gpus_per_node: int,
                       assume: Assumptions, report: Report) -> None:
    """Host RAM of the data path per node, with the manifest's mean sample size when there is one."""
    if shards is not None:
        try:
            shuffle_samples(config.data.shuffle_buffer, shards)
        except ValueError as e:
            report.problems.append(str(e))
        if shards.sample_bytes:
            assume = dataclasses.replace(assume, sample_kb=shards.sample_bytes / 1e3)
    memory = data_host_memory(config, gpus_per_node, micro, assume)
    report.add("host RAM", format_host_memory(memory))
    if memory["total_gb"] > assume.host_ram_gb / 2:
        report.warnings.append(f"the data path holds {memory['total_gb']:,.0f} GB of host RAM per node, over half of "
                               f"the {assume.host_ram_gb:,.0f} GB of a node: lower data.shuffle_buffer (samples, or a "
                               f"size such as '256MiB') or data.num_workers")


def _check_eval_streams(config: Config, shards: ShardSet, world: int, report: Report) -> None:
    streams = stream_count(world, config.data.num_workers)
    seekable = all(is_seekable(u) for u in shards.urls)
    if len(shards.urls) >= streams:
        how = "whole shards per stream"
    elif seekable:
        how = "fewer shards than streams: each stream opens its shard at its first sample (tar headers only)"
    else:
        how = "fewer remote shards than streams: whole shards, some streams idle"
        report.warnings.append(f"{len(shards.urls)} remote eval shards for {streams} streams: "
                               f"{streams - len(shards.urls)} streams will have nothing to read")
    report.add("streams", f"{streams:,} streams ({world} ranks x {logical_workers(config.data.num_workers)} "
                          f"workers), {how}")


# -- stage links and tracking ---------------------------------------------------------------


def _check_link(config: Config, key: str, source: str | None, inherited: list[Path], after: list[str],
                overrides: list[str], report: Report, same_head: bool = False) -> None:
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
    earlier = {}
    for previous in [*after, *inherited]:
        try:
            earlier[load_config(previous, overrides).run.run_dir.resolve()] = previous
        except ConfigError as e:
            report.warnings.append(f"could not read the earlier stage {previous}: {e}")
    if path.resolve() in earlier:
        report.add("starts from", f"{source}, written by the earlier stage "
                                  f"{_short(Path(str(earlier[path.resolve()])))}")
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
    """What a launcher's ``--dry-run`` does: print the report, exit 0 or 1."""
    ok, text = dry_run(args.config, args.overrides, stage=stage, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                       gpu=args.gpu, after=args.after, checkpoint=getattr(args, "checkpoint", None))
    print(text)
    return 0 if ok else 1
