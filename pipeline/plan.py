"""Job planning: memory per GPU by ZeRO stage, the recommended set-up, step time, wall-clock,
decode cores and communication, from the analytic model in :mod:`pipeline.flops`. Every
assumption is a field of :class:`Assumptions`, printed with its value, and overridable."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

from pydantic import ByteSize

from pipeline.config import Config
from pipeline.data.shards import ShardSet, stream_count
from pipeline.flops import (
    DEVICE_PEAK_TFLOPS, VitShape, activation_bytes_per_image, forward_macs, gradient_bytes_sent_per_gpu,
    inference_weight_bytes, max_micro_batch, model_state_bytes, param_count, train_flops_per_image,
)
from pipeline.train.objectives import objective_of
from pipeline.train.run_plan import RunPlan

GB = 1e9
# name: (memory in GB, dense bf16 TFLOP/s), memory from the vendors' data sheets.
GPUS = {name: (memory, DEVICE_PEAK_TFLOPS[device]) for name, memory, device in [
    ("h100", 80, "H100"), ("h200", 141, "H200"), ("a100", 80, "A100"), ("a100-40gb", 40, "A100"), ("l40s", 48, "L40S")]}


@dataclass
class Assumptions:
    gpu: str = "h100"
    hfu: float = 0.45  # hardware FLOP utilisation the step runs at (recompute counts as work)
    reserved_gb: float = 6.0  # CUDA context, NCCL buffers, allocator slack
    margin: float = 0.1  # share of GPU memory kept free on top: fragmentation, error of the estimate
    intra_node_gbps: float = 3600.0  # NVLink per GPU, Gbit/s (H100 SXM: 450 GB/s)
    inter_node_gbps: float = 400.0  # InfiniBand per GPU, Gbit/s (one NDR port per GPU)
    comm_overlap: float = 0.5  # share of ZeRO-2/3's bucketed gradient reduction hidden behind the backward pass
    decode_images_per_s_per_core: float = 1150.0  # benchmarks/RESULTS.md: fast path, 500x375 JPEG, one core
    # data.decode=gpu: the worker's header parse only (RESULTS.md)
    gpu_decode_worker_images_per_s_per_core: float = 90000.0
    flash_attention: bool = True
    sample_kb: float = 110.0  # a sample in the shards (ImageNet JPEG); the dry run reads it from the manifest
    worker_gb: float = 0.25  # one DataLoader worker's own memory (PSS) besides its buffers, measured on CPU
    prefetch_factor: int = 2  # batches each DataLoader worker prepares ahead (TrainLoader's default)
    host_ram_gb: float = 2048.0  # per node (DGX H100/H200: 2 TB); the dry run warns past half of it


def decode_rate(config: Config, assume: Assumptions) -> float:
    """Images/s one worker core prepares: decoding and cropping, or with data.decode=gpu (nvJPEG
    on the GPU) only reading the JPEG header and drawing the box."""
    return assume.gpu_decode_worker_images_per_s_per_core if config.data.decode == "gpu" \
        else assume.decode_images_per_s_per_core


def plan(run_plan: RunPlan, assume: Assumptions) -> dict:
    """Size the job ``run_plan`` describes on GPUs of ``assume.gpu``: memory per ZeRO stage, the
    recommended stage and micro-batch, step time, wall-clock, decode cores, communication. The
    length and the data's mean sample size are the plan's, where it knows them."""
    config, nodes, gpus_per_node = run_plan.config, run_plan.job.nodes, run_plan.job.ranks_per_node
    shape = objective_of(config).shapes(config)  # the parts that train: one ViT, or a masked autoencoder's two
    gpus = run_plan.world_size
    assume = with_sample_size(assume, run_plan.train_shards)
    memory_gb, peak_tflops = GPUS[assume.gpu]
    gpu_bytes = usable_bytes(assume)
    per_gpu_batch = config.train.global_batch_size // gpus

    teacher = teacher_weight_bytes(run_plan)
    memory = {}
    for stage in range(4):
        states = model_state_bytes(shape, stage, gpus) + teacher
        for ckpt in (False, True):
            memory[(stage, ckpt)] = {
                "model_states_gb": states / GB,
                "activations_gb_per_image": activation_bytes_per_image(shape, checkpointing=ckpt,
                                                                       flash=assume.flash_attention) / GB,
                "max_micro_batch": max_micro_batch(shape, stage, gpus, gpu_bytes, checkpointing=ckpt,
                                                   flash=assume.flash_attention, reserved_bytes=teacher),
            }
    stage, ckpt, micro = recommend(memory, per_gpu_batch)
    hidden = hidden_comm_share(config, stage, assume)
    recompute = ckpt
    flops = train_flops_per_image(shape)
    teacher_flops = run_plan.teacher_flops_per_image or 0  # its forward: work the step does, not in MFU
    hardware_flops = train_flops_per_image(shape, recompute=recompute) + teacher_flops
    compute_s = config.train.global_batch_size * hardware_flops / (gpus * peak_tflops * 1e12 * assume.hfu)
    scaling = {}
    for n in sorted({1, 2, 4, 8, nodes} | ({nodes // 2} if nodes > 2 else set())):
        if n > nodes or n < 1:
            continue
        comm_s = comm_seconds(shape, stage, n * gpus_per_node, n, micro, config, assume)
        step = compute_s * gpus / (n * gpus_per_node) + comm_s * (1 - hidden)
        scaling[n] = (compute_s * gpus / (n * gpus_per_node)) / step
    comm_s = comm_seconds(shape, stage, gpus, nodes, micro, config, assume)
    step_s = compute_s + comm_s * (1 - hidden)
    images_per_s = config.train.global_batch_size / step_s
    steps = run_plan.total_steps
    decode_per_core = decode_rate(config, assume)
    return {
        "variant": config.model.variant, "image_size": config.model.image_size, "nodes": nodes, "gpus": gpus,
        "params": param_count(shape), "forward_gmacs_per_image": forward_macs(shape) / 1e9,
        "backbone_params": param_count(dataclasses.replace(VitShape.from_config(config.model), num_classes=0,
                                                           pre_logits=None)),
        "train_gflops_per_image": flops / 1e9, "teacher_gflops_per_image": teacher_flops / 1e9,
        "teacher_weights_gb": teacher / GB,
        "memory": {f"zero{s}{'+ckpt' if c else ''}": v for (s, c), v in memory.items()},
        "recommended": {"zero_stage": stage, "activation_checkpointing": ckpt, "micro_batch_size": micro,
                        "gradient_accumulation_steps": max(1, per_gpu_batch // max(micro, 1))},
        "step_time_s": step_s, "images_per_s": images_per_s, "images_per_s_per_gpu": images_per_s / gpus,
        "mfu": assume.hfu * flops / hardware_flops,
        "total_steps": steps, "wall_clock_hours": steps * step_s / 3600 if steps else None,
        "decode_cores_per_gpu": images_per_s / gpus / decode_per_core,
        "decode": config.data.decode, "decode_images_per_s_per_core": decode_per_core,
        "gradient_gb_sent_per_gpu_per_step": comm_bytes_per_step(shape, stage, gpus, micro, config) / GB,
        "communication_s_per_step": comm_s, "communication_hidden_share": hidden,
        "scaling_efficiency": {str(n): e for n, e in scaling.items()},
        "host_ram_data_per_node": data_host_memory(config, gpus_per_node, run_plan.micro_batch or min(
            config.train.micro_batch_size, max(per_gpu_batch, 1)), assume),
        "assumptions": asdict(assume),
    }


def with_sample_size(assume: Assumptions, shards: ShardSet | None) -> Assumptions:
    """``assume`` with the mean sample size of the shards' manifest, where it gives one."""
    if shards is None or not shards.sample_bytes:
        return assume
    return dataclasses.replace(assume, sample_kb=shards.sample_bytes / 1e3)


def teacher_weight_bytes(run_plan: RunPlan) -> float:
    """GPU memory of the distillation teacher on each rank: its bf16 weights, whole, or a ZeRO-3
    partition plus the largest layer gathered while it runs. Its forward runs before the
    student's, without autograd, so its activations are gone before the student's are made."""
    if run_plan.teacher is None:
        return 0.0
    shape = VitShape.from_config(run_plan.teacher.model)
    return inference_weight_bytes(shape, 3 if run_plan.teacher_deepspeed else 0, run_plan.world_size)


def data_host_memory(config: Config, gpus_per_node: int, micro: int, assume: Assumptions) -> dict:
    """Host RAM per node that the training data path holds, in GB: every worker's shuffle buffer
    of raw sample bytes, the decoded uint8 batches of ``micro`` images queued between workers and
    the trainer (and the pinned copy), and the worker processes themselves."""
    workers = config.data.num_workers
    buffer = config.data.shuffle_buffer
    in_bytes = isinstance(buffer, ByteSize)
    samples = int(buffer // (assume.sample_kb * 1e3)) if in_bytes else int(buffer)
    buffer_bytes = int(buffer) if in_bytes else samples * assume.sample_kb * 1e3
    batch_bytes = micro * 3 * config.model.image_size ** 2
    queued = assume.prefetch_factor * workers + 2 if workers else 1
    figures = {
        "shuffle_gb": stream_count(gpus_per_node, workers) * buffer_bytes / GB,  # a buffer per stream
        "batches_gb": gpus_per_node * queued * batch_bytes / GB,
        "workers_gb": gpus_per_node * workers * assume.worker_gb,
    }
    return {"total_gb": sum(figures.values()), **figures, "ranks": gpus_per_node, "workers_per_rank": workers,
            "buffer_samples": samples, "sample_kb": assume.sample_kb}


def usable_bytes(assume: Assumptions) -> float:
    """GPU memory a job may plan to fill: the device's, less the reserve and the margin."""
    return GPUS[assume.gpu][0] * GB * (1 - assume.margin) - assume.reserved_gb * GB


def recommend(memory: dict, per_gpu_batch: int) -> tuple[int, bool, int]:
    """The lowest ZeRO stage from 1, without checkpointing if possible, whose largest fitting
    micro-batch is at least 16 (or the whole per-GPU batch); the micro-batch is the largest power
    of two that fits and divides the per-GPU batch. Stage 0 is never chosen: ZeRO-1 moves the same
    bytes, holds less, and accumulates gradients in fp32 (DeepSpeed's BF16 optimizer)."""
    wanted = min(16, per_gpu_batch)
    options = [(s, c) for c in (False, True) for s in range(1, 4)]
    stage, ckpt = next(((s, c) for s, c in options if memory[(s, c)]["max_micro_batch"] >= wanted),
                       max(options, key=lambda k: memory[k]["max_micro_batch"]))
    fits = min(memory[(stage, ckpt)]["max_micro_batch"], per_gpu_batch)
    micro = 1
    while micro * 2 <= fits and per_gpu_batch % (micro * 2) == 0:
        micro *= 2
    return stage, ckpt, micro if fits else 0


def hidden_comm_share(config: Config, stage: int, assume: Assumptions) -> float:
    """The share of the gradient communication that the backward pass hides, as DeepSpeed runs
    ``config`` at ``stage`` (pipeline/train/ds_config.py): ZeRO-2/3 with ``overlap_comm`` reduce in
    buckets during it (``assume.comm_overlap``); stage 0, and ZeRO-1 in bf16 with fp32 accumulation
    (DeepSpeed's BF16 optimizer), all-reduce after it: nothing hidden."""
    ds = config.deepspeed
    bf16_optimizer = ds.precision == "bf16" and ds.grad_accum_dtype != "bf16"
    overlaps = stage >= 2 or (stage == 1 and not bf16_optimizer)
    return assume.comm_overlap if overlaps and ds.overlap_comm else 0.0


def comm_bytes_per_step(shape: VitShape, stage: int, gpus: int, micro: int, config: Config) -> float:
    # ZeRO-2/3 reduce-scatter every micro-batch's gradients; stages 0-1 reduce once per step.
    # An fp32 reduction (deepspeed.reduce_dtype) moves twice the bytes of a bf16 one.
    accumulation = max(1, config.train.global_batch_size // (gpus * max(micro, 1)))
    width = 2 if config.deepspeed.reduce_dtype == "fp32" else 1
    return gradient_bytes_sent_per_gpu(shape, stage, gpus) * (accumulation if stage >= 2 else 1) * width


def comm_seconds(shape, stage, gpus, nodes, micro, config, assume: Assumptions) -> float:
    gbps = assume.inter_node_gbps if nodes > 1 else assume.intra_node_gbps
    return comm_bytes_per_step(shape, stage, gpus, micro, config) * 8 / (gbps * 1e9)


def format_plan(result: dict) -> str:
    r, a = result, result["assumptions"]
    lines = [f"ViT {r['variant']} at {r['image_size']} px on {r['nodes']} node(s) x {r['gpus'] // r['nodes']} "
             f"{a['gpu'].upper()} = {r['gpus']} GPUs",
             f"  parameters                 {r['params']:,}  (backbone without head and pre-logits: "
             f"{r['backbone_params']:,})",
             f"  forward GMAC per image     {r['forward_gmacs_per_image']:.1f}",
             f"  training GFLOP per image   {r['train_gflops_per_image']:.1f}  (3 x forward; recompute not counted)",
             *([f"  teacher GFLOP per image    {r['teacher_gflops_per_image']:.1f}  (its forward, beside the "
                f"student's: not in MFU); its weights {r['teacher_weights_gb']:.1f} GB per GPU, in the model states "
                "below"]
               if r["teacher_gflops_per_image"] else []),
             "", f"  {'memory per GPU':<16} {'model states':>12} {'act./image':>11} {'max micro-batch':>16}"]
    for name, m in r["memory"].items():
        lines.append(f"  {name:<16} {m['model_states_gb']:>9.1f} GB {m['activations_gb_per_image']:>8.3f} GB "
                     f"{m['max_micro_batch']:>16}")
    rec = r["recommended"]
    lines += ["", f"  recommended                ZeRO-{rec['zero_stage']}, activation checkpointing "
                  f"{'on' if rec['activation_checkpointing'] else 'off'}, micro-batch {rec['micro_batch_size']}, "
                  f"accumulation {rec['gradient_accumulation_steps']}",
              f"  step time                  {r['step_time_s']:.3f} s at {a['hfu']:.0%} hardware FLOP utilisation "
              f"(MFU {r['mfu']:.0%})",
              f"  throughput                 {r['images_per_s']:,.0f} images/s "
              f"({r['images_per_s_per_gpu']:,.0f} per GPU)"]
    if r["wall_clock_hours"] is not None:
        lines.append(f"  training length            {r['total_steps']:,} steps = {r['wall_clock_hours']:,.1f} h "
                     f"({r['wall_clock_hours'] / 24:.1f} days)")
    lines += [f"  decode cores per GPU       {r['decode_cores_per_gpu']:.1f} at "
              f"{r['decode_images_per_s_per_core']:,.0f} "
              f"images/s per core (data benchmark; data.decode={r['decode']})",
              f"  gradient traffic           {r['gradient_gb_sent_per_gpu_per_step']:.2f} GB sent per GPU per step, "
              f"{r['communication_s_per_step']:.3f} s at "
              f"{a['inter_node_gbps'] if r['nodes'] > 1 else a['intra_node_gbps']:.0f} Gbit/s, "
              f"{r['communication_hidden_share']:.0%} of it behind the backward pass",
              "  scaling efficiency         "
              + ", ".join(f"{n} node(s) {e:.0%}" for n, e in r["scaling_efficiency"].items()),
              f"  host RAM, data path        {format_host_memory(r['host_ram_data_per_node'])}",
              "", "  assumptions (override with --set NAME=VALUE): "
              + ", ".join(f"{k}={v}" for k, v in a.items())]
    return "\n".join(lines)


def format_host_memory(m: dict) -> str:
    return (f"{m['total_gb']:,.1f} GB per node: shuffle buffers {m['shuffle_gb']:,.1f} GB ({m['ranks']} ranks x "
            f"{max(m['workers_per_rank'], 1)} workers x {m['buffer_samples']:,} samples x {m['sample_kb']:,.0f} kB), "
            f"batches in flight {m['batches_gb']:,.1f} GB, worker processes {m['workers_gb']:,.1f} GB")
