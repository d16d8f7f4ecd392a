#!/usr/bin/env python
"""The real trainer's optimizer step, timed, with its data already in memory (no decode).

--device cpu: ``Trainer.train_step`` (DeepSpeed ZeRO-1, bf16) against a bare torch loop (the
same model, AdamW, bf16 autocast, gradient clipping, no DeepSpeed), alternating round by round
in one process: overhead_vs_bare, our step time over the bare one (target <= 1.05). Then the
eager against the compiled trainer (model.compile) under ZeRO-1, -2 and -3 with activation
checkpointing, on the same batches: compile_matches_eager (losses within bf16 tolerance).

--device cuda: L/16 and H/14 at 224, H/14 at 448; eager and compiled, ZeRO-1 and ZeRO-2,
activation checkpointing on and off, on one GPU: images/s, model TFLOP/s, MFU (model FLOPs,
3 x forward) and HFU (with checkpointing's recomputed forward), host syncs per
optimizer step (torch.cuda.set_sync_debug_mode), peak memory against the planner's prediction
(target within 15%), and the bare loop beside each model.

--objectives (CPU): at equal model and batch, the trainer's step under each training objective:
supervised, MAE (mae.mask_ratio 0.75; the encoder sees a quarter of the patches) and supervised
with patch dropout 0.5, one after another: images/s and the speedups over supervised
(targets: MAE >= 2.5x, patch dropout >= 1.6x).

--parity runs the eager/compiled comparison alone, on as many ranks as it is launched with, and
the same for the gradient reduction overlapped in buckets (ds_config.py) against one after the
backward pass (losses within 1e-5 at ZeRO-1, 2 and 3).

    python benchmarks/train_step.py --device cpu
    python benchmarks/train_step.py --device cpu --objectives --variant L/16 --batch-size 4 --rounds 3 --steps 1
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 benchmarks/train_step.py --device cpu --parity
    python benchmarks/train_step.py --device cuda [--cases H/14@224]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import logging
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import Config, load_config  # noqa: E402
from pipeline.data import Normalize, TrainBatch  # noqa: E402
from pipeline.data.sources import synthetic_source  # noqa: E402
from pipeline.data.writer import write_split  # noqa: E402
from pipeline.flops import VitShape, activation_bytes_per_image, model_state_bytes, train_flops_per_image  # noqa: E402
from pipeline.model import vit_from_config  # noqa: E402
from pipeline.train.metrics import Meter  # noqa: E402

BF16_RTOL = 2**-6  # two bf16 ulps at 1.0: compiled kernels round and fuse differently
CUDA_CASES = [("L/16", 224), ("H/14", 224), ("H/14", 448)]


def setup_distributed():
    """One process without a launcher, or the ranks a launcher started."""
    from pipeline.train.distributed import discover, free_port, init_process_group

    if "RANK" not in os.environ:  # one rank, on a free port
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env = discover()
    init_process_group(env)
    return env


def shards(work: Path) -> Path:
    """A manifest the trainer can open; the timed batches never come from it."""
    manifest = work / "shards" / "train.json"
    if not manifest.exists():
        source = synthetic_source(64, side=16)
        write_split(source.items, manifest.parent, "train", source.classes, progress=False)
    return manifest


def trainer_config(work: Path, name: str, *, variant: str, image_size: int, micro: int, world: int, zero: int,
                   compile: bool, checkpointing: bool, num_classes: int = 1000, lr: float = 1e-4,
                   drop_path: float = 0.0, extra: tuple[str, ...] = ()) -> Config:
    return load_config(ROOT / "configs/demo/pretrain.yaml", [
        f"run.output_dir={work}", f"run.name={name}", "run.tracking_uri=none",
        "run.experiment=benchmark-train-step", f"data.train_shards={shards(work)}", "data.num_workers=0",
        f"model.variant={variant}", f"model.image_size={image_size}", f"model.num_classes={num_classes}",
        f"model.drop_path_rate={drop_path}", f"model.compile={compile}", f"deepspeed.zero_stage={zero}",
        f"deepspeed.activation_checkpointing={checkpointing}", f"train.global_batch_size={micro * world}",
        f"train.micro_batch_size={micro}", "train.total_steps=1000000", "train.log_every=1000000",
        "train.checkpoint_every=1000000", "train.resume=never", "optim.warmup_steps=0", f"optim.lr={lr}",
        "train.eval_every=null", "train.ema_decay=null",  # the step alone: the demo config validates, with an EMA
        *extra,
    ])


def batches(config: Config, count: int, seed: int, device: torch.device) -> list[TrainBatch]:
    """Decoded uint8 batches, as the loader hands them over (pinned on CUDA)."""
    g = torch.Generator().manual_seed(seed)
    size, micro = config.model.image_size, config.train.micro_batch_size
    out = []
    for _ in range(count):
        images = torch.randint(0, 256, (micro, 3, size, size), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, config.model.num_classes, (micro,), generator=g)
        if device.type == "cuda":
            images, labels = images.pin_memory(), labels.pin_memory()
        out.append(TrainBatch(images, labels))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CompileWatch(logging.Handler):
    """Dynamo's recompilations and recompile-limit fallbacks, per function of the model
    (``pipeline/model``), read from its logs; installed by :func:`fresh_compiler`. Under ZeRO-3 a
    block breaks into pieces at DeepSpeed's parameter hooks: each piece (``residuals`` and its
    ``torch_dynamo_resume_in_residuals_*``) counts as a function of its own."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.recompiles: dict[str, int] = {}
        self.fallbacks: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        found = re.search(r"Recompiling function (\S+) in (\S+)", text)
        if found and "pipeline/model" in found.group(2):
            self.recompiles[found.group(1)] = self.recompiles.get(found.group(1), 0) + 1
        found = re.search(r"hit config\.recompile_limit.*?function: '([^']+)' \(([^)]+)\)", text, re.S)
        if found and "pipeline/model" in found.group(2):
            self.fallbacks[found.group(1)] = self.fallbacks.get(found.group(1), 0) + 1

    def counts(self) -> dict:
        """``block_graphs``: the most compiled versions of one piece of model code (at most 2 with
        stochastic depth: with masks and without); ``block_fallbacks``: model code run eagerly
        past the recompile limit; ``graphs``: every graph compiled, DeepSpeed's hooks included."""
        from torch._dynamo.utils import counters

        return {"block_graphs": 1 + max(self.recompiles.values(), default=0),
                "block_fallbacks": sum(self.fallbacks.values()), "graphs": counters["stats"]["unique_graphs"]}


WATCH = CompileWatch()


def fresh_compiler() -> CompileWatch:
    """Forget every compiled graph and dynamo's counters: each compiled case compiles its own
    graphs and counts its own recompilations, instead of inheriting the earlier cases'."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    WATCH.recompiles.clear()
    WATCH.fallbacks.clear()
    if WATCH not in logging.getLogger("torch._dynamo").handlers:
        torch._logging.set_logs(recompiles=True)
        logging.getLogger("torch._dynamo").addHandler(WATCH)
    return WATCH


class TrainerCase:
    """A Trainer on in-memory batches; ``step()`` is one optimizer step."""

    def __init__(self, config: Config, env, data: list[TrainBatch]):
        from pipeline.train.trainer import Trainer  # imports deepspeed: after main() picks the accelerator

        if config.model.compile:
            fresh_compiler()
        self.trainer = Trainer(config, env)
        self.device = self.trainer.device
        self.data = itertools.cycle(data)

    def step(self):
        """One optimizer step; returns its Meter (loss sums still on the device)."""
        meter = Meter(self.trainer.objective.sums)
        self.trainer.train_step(self.data, meter)
        return meter

    def close(self) -> None:
        self.trainer.stops.settle()
        self.trainer.close()
        self.trainer.engine.destroy()
        del self.trainer
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class BareCase:
    """The same model, AdamW and bf16 in plain torch: autocast, clipping, no DeepSpeed."""

    def __init__(self, config: Config, device: torch.device, data: list[TrainBatch]):
        if config.model.compile:
            fresh_compiler()
        torch.manual_seed(config.run.seed)
        self.model = vit_from_config(config.model).init_weights().to(device)
        if config.deepspeed.activation_checkpointing:
            self.model.set_grad_checkpointing(1)
        if config.model.compile:
            self.model.compile_blocks()
        o = config.optim
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps,
                                           weight_decay=o.weight_decay, fused=device.type == "cuda")
        self.device, self.clip = device, o.clip_grad
        self.normalize = Normalize(config.data.mean, config.data.std, device)
        self.data = itertools.cycle(data)

    def step(self) -> None:
        batch = next(self.data)
        images = self.normalize(batch.images.to(self.device, non_blocking=True))
        labels = batch.labels.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(self.model(images).float(), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        del self.model, self.optimizer
        gc.collect()


def time_steps(case, steps: int) -> float:
    sync(case.device)
    start = time.perf_counter()
    for _ in range(steps):
        case.step()
    sync(case.device)
    return (time.perf_counter() - start) / steps


def compare_compile(env, work: Path, steps: int, stages: list[int]) -> dict:
    """Eager and compiled losses over ``steps`` optimizer steps on the same batches, per ZeRO stage,
    with activation checkpointing and stochastic depth (12 blocks, 12 rates: more than dynamo's
    recompile limit of 8 if each rate compiled a graph): the largest relative difference, whether
    it is within bf16, and the compiled case's graphs and eager fallbacks."""
    results = {}
    for zero in stages:
        losses = {}
        for compiled in (False, True):
            config = trainer_config(work, f"compile-z{zero}-{compiled}", variant="Ti/4", image_size=16, micro=8,
                                    world=env.world_size, zero=zero, compile=compiled, checkpointing=True,
                                    num_classes=10, lr=1e-3, drop_path=0.1)  # a loss that moves in 5 steps
            case = TrainerCase(config, env, batches(config, steps, seed=1 + env.rank, device=torch.device("cpu")))
            meters = [case.step() for _ in range(steps)]
            losses[compiled] = [m.mean() for m in meters]
            counts = WATCH.counts() if compiled else {}
            case.close()
        worst = max(abs(a - b) / max(abs(a), 1.0) for a, b in zip(losses[False], losses[True]))
        results[f"zero{zero}"] = {"eager": losses[False], "compiled": losses[True], "max_rel_diff": worst, **counts}
    return results


# Gradient reduction as ds_config.py sets it (overlapped, in buckets during backward) against one
# reduction after backward: the same sums, so the same losses up to fp32 rounding.
COMM_CASES = {"plain": ("deepspeed.overlap_comm=false", "deepspeed.reduce_bucket_size=500000000"),
              "overlapped": ("deepspeed.overlap_comm=true", "deepspeed.reduce_bucket_size=20000")}
COMM_RTOL = 1e-5


def compare_comm(env, work: Path, steps: int, stages: list[int]) -> dict:
    """Losses over ``steps`` optimizer steps per ZeRO stage (bf16, fp32 accumulation over 2
    micro-batches), with the gradient reduction overlapped in small buckets and without."""
    results = {}
    for zero in stages:
        losses = {}
        for name, extra in COMM_CASES.items():
            config = trainer_config(work, f"comm-z{zero}-{name}", variant="pico/4", image_size=16, micro=8,
                                    world=env.world_size, zero=zero, compile=False, checkpointing=False,
                                    num_classes=10, lr=3e-3, extra=extra + ("train.micro_batch_size=4",))
            case = TrainerCase(config, env, batches(config, 2 * steps, seed=7 + env.rank, device=torch.device("cpu")))
            losses[name] = [m.mean() for m in (case.step() for _ in range(steps))]
            case.close()
        worst = max(abs(a - b) / max(abs(a), 1.0) for a, b in zip(losses["plain"], losses["overlapped"]))
        results[f"zero{zero}"] = {**losses, "max_rel_diff": worst}
    return results


def compile_matches(results: dict) -> bool:
    return all(r["max_rel_diff"] <= BF16_RTOL and r["block_graphs"] <= 2 and not r["block_fallbacks"]
               for r in results.values())


def print_compile(results: dict) -> None:
    print(f"\neager vs compiled (model.compile), activation checkpointing on, bf16 tolerance {BF16_RTOL:.4f}")
    print(f"{'stage':<6} {'eager losses':<44} {'max rel diff':>12} {'block graphs':>12} {'block fallbacks':>15} "
          f"{'graphs':>6}")
    for stage, r in results.items():
        print(f"{stage:<6} {' '.join(f'{v:.4f}' for v in r['eager']):<44} {r['max_rel_diff']:>12.2e} "
              f"{r['block_graphs']:>12} {r['block_fallbacks']:>15} {r['graphs']:>6}")


def cpu_benchmark(args, env, work: Path) -> dict:
    config = trainer_config(work, "overhead", variant=args.variant, image_size=args.image_size,
                            micro=args.batch_size, world=1, zero=1, compile=False, checkpointing=False)
    data = batches(config, 4, seed=0, device=torch.device("cpu"))
    cases = {"trainer": TrainerCase(config, env, data), "bare": BareCase(config, torch.device("cpu"), data)}
    for case in cases.values():
        time_steps(case, 1)  # warm-up
    times = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, case in cases.items():
            times[name].append(time_steps(case, args.steps))
    median = {name: statistics.median(t) for name, t in times.items()}
    for case in cases.values():
        case.close()
    flops = train_flops_per_image(VitShape.from_config(config.model))
    print(f"{args.variant} at {args.image_size} px, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"{args.rounds} alternating rounds of {args.steps} optimizer steps (median)")
    print(f"{'loop':<8} {'s/step':>8} {'images/s':>9} {'GFLOP/s':>9}")
    for name, seconds in median.items():
        print(f"{name:<8} {seconds:>8.3f} {args.batch_size / seconds:>9.1f} "
              f"{args.batch_size * flops / seconds / 1e9:>9.1f}")
    overhead = median["trainer"] / median["bare"]
    print(f"overhead_vs_bare (trainer / bare step time): {overhead:.3f}  (target <= 1.05)")
    compiled = compare_compile(env, work, args.compile_steps, args.zero_stages)
    print_compile(compiled)
    return {"device": "cpu", "variant": args.variant, "image_size": args.image_size, "batch_size": args.batch_size,
            "trainer_s_per_step": median["trainer"], "bare_s_per_step": median["bare"], "overhead_vs_bare": overhead,
            "compile_max_rel_diff": {k: v["max_rel_diff"] for k, v in compiled.items()},
            "compile_matches_eager": compile_matches(compiled), "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "torch": torch.__version__}


OBJECTIVE_CASES = {"supervised": (), "mae": ("objective=mae",), "patch_dropout": ("model.patch_dropout=0.5",)}
OBJECTIVE_TARGETS = {"mae": 2.5, "patch_dropout": 1.6}


def objectives_benchmark(args, env, work: Path) -> dict:
    """The trainer's step per objective, at equal model and batch, one objective after another
    (one trainer in memory at a time: an L/16 trainer holds ~10 GB on the CPU)."""
    decoder = [f"mae.decoder_{k}={v}" for k, v in zip(("dim", "depth", "heads"), args.mae_decoder.split("x"))]
    median, flops = {}, {}
    for name, extra in OBJECTIVE_CASES.items():
        config = trainer_config(work, f"objective-{name}", variant=args.variant, image_size=args.image_size,
                                micro=args.batch_size, world=1, zero=1, compile=False, checkpointing=False,
                                extra=(*extra, *decoder))
        case = TrainerCase(config, env, batches(config, 4, seed=0, device=torch.device("cpu")))
        time_steps(case, 1)  # warm-up
        median[name] = statistics.median(time_steps(case, args.steps) for _ in range(args.rounds))
        flops[name] = case.trainer.plan.flops_per_image
        case.close()
    speedup = {name: median["supervised"] / median[name] for name in median}
    print(f"{args.variant} at {args.image_size} px, batch {args.batch_size}, MAE decoder {args.mae_decoder} "
          f"(width x depth x heads), {torch.get_num_threads()} threads, {args.rounds} rounds of {args.steps} "
          "optimizer steps (median)")
    print(f"{'objective':<14} {'s/step':>8} {'images/s':>9} {'GFLOP/img':>10} {'speedup':>8} {'target':>7}")
    for name, seconds in median.items():
        target = f">= {OBJECTIVE_TARGETS[name]}" if name in OBJECTIVE_TARGETS else ""
        print(f"{name:<14} {seconds:>8.3f} {args.batch_size / seconds:>9.2f} {flops[name] / 1e9:>10.1f} "
              f"{speedup[name]:>8.2f} {target:>7}")
    return {"device": "cpu", "variant": args.variant, "image_size": args.image_size, "batch_size": args.batch_size,
            "mae_decoder": args.mae_decoder, "s_per_step": median, "speedup": speedup,
            "gflops_per_image": {k: v / 1e9 for k, v in flops.items()},
            "meets_targets": all(speedup[k] >= v for k, v in OBJECTIVE_TARGETS.items()),
            "threads": torch.get_num_threads(), "machine": platform.machine(), "torch": torch.__version__}


def host_syncs(case: TrainerCase, steps: int) -> float:
    """Synchronising CUDA calls per optimizer step (ours and DeepSpeed's)."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                case.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught) / steps


def cuda_benchmark(args, env, work: Path) -> dict:
    from pipeline.flops import device_peak_tflops

    device = torch.device("cuda", env.local_rank)
    peak = device_peak_tflops(torch.cuda.get_device_name(device))
    wanted = set(args.cases or [])
    rows, figures = [], {"device": torch.cuda.get_device_name(device), "peak_tflops": peak, "cases": []}
    header = (f"{'model':<10} {'loop':<8} {'compile':<8} {'zero':>4} {'ckpt':>5} {'batch':>5} {'images/s':>9} "
              f"{'TFLOP/s':>8} {'MFU':>6} {'HFU':>6} {'syncs':>6} {'peak GB':>8} {'plan GB':>8} {'off':>6}")
    for variant, size in CUDA_CASES:
        if wanted and f"{variant}@{size}" not in wanted:
            continue
        shape = VitShape.from_variant(variant, size, 1000)
        for checkpointing in (False, True):
            micro = args.cuda_batch.get(f"{variant}@{size}", 32) * (2 if checkpointing else 1)
            loops = [(c, z, "trainer") for c in (False, True) for z in (1, 2)] + [(False, 0, "bare")]
            for compiled, zero, loop in loops:
                config = trainer_config(work, f"{variant.replace('/', '')}-{size}-{zero}-{compiled}-{checkpointing}",
                                        variant=variant, image_size=size, micro=micro, world=1, zero=max(zero, 1),
                                        compile=compiled, checkpointing=checkpointing)
                data = batches(config, 4, seed=0, device=device)
                torch.cuda.reset_peak_memory_stats(device)
                try:
                    case = TrainerCase(config, env, data) if loop == "trainer" else BareCase(config, device, data)
                    time_steps(case, args.warmup)
                    seconds = time_steps(case, args.steps)
                    syncs = host_syncs(case, 3) if loop == "trainer" else None
                    peak_gb = torch.cuda.max_memory_allocated(device) / 2**30
                    case.close()
                except torch.cuda.OutOfMemoryError:
                    print(f"{variant}@{size} {loop} zero {zero} ckpt {checkpointing} batch {micro}: out of memory")
                    gc.collect()
                    torch.cuda.empty_cache()
                    continue
                # MFU counts the model's FLOPs (3 x forward); HFU adds the recomputed forward of
                # activation checkpointing, work the hardware does but the model does not need.
                tflops = micro / seconds * train_flops_per_image(shape) / 1e12
                hardware_tflops = micro / seconds * train_flops_per_image(shape, recompute=checkpointing) / 1e12
                plan_gb = (model_state_bytes(shape, max(zero, 1), 1)
                           + micro * activation_bytes_per_image(shape, checkpointing=checkpointing)) / 2**30
                row = {"variant": variant, "image_size": size, "loop": loop, "compile": compiled, "zero": zero,
                       "checkpointing": checkpointing, "batch": micro, "images_per_s": micro / seconds,
                       "tflops": tflops, "mfu": tflops / peak if peak else None,
                       "hfu": hardware_tflops / peak if peak else None, "host_syncs_per_step": syncs,
                       "peak_gb": peak_gb, "plan_gb": plan_gb, "plan_error": peak_gb / plan_gb - 1}
                figures["cases"].append(row)
                rows.append(f"{variant + '@' + str(size):<10} {loop:<8} {str(compiled):<8} {zero:>4} "
                            f"{str(checkpointing):>5} "
                            f"{micro:>5} {row['images_per_s']:>9.1f} {tflops:>8.1f} {row['mfu'] or 0:>6.1%} "
                            f"{row['hfu'] or 0:>6.1%} "
                            f"{'' if syncs is None else f'{syncs:.1f}':>6} {peak_gb:>8.1f} {plan_gb:>8.1f} "
                            f"{row['plan_error']:>+6.0%}")
                print(rows[-1], flush=True)
    print(header, *rows, sep="\n")
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--parity", action="store_true",
                        help="only eager vs compiled, and overlapped vs plain gradient reduction, on the launched "
                             "ranks")
    parser.add_argument("--objectives", action="store_true",
                        help="CPU: supervised vs MAE vs patch dropout 0.5 at equal model and batch")
    parser.add_argument("--mae-decoder", default="512x8x16",
                        help="--objectives: the MAE decoder as WIDTHxDEPTHxHEADS (default MAE's 512x8x16, for L/H)")
    parser.add_argument("--variant", default="Ti/16", help="CPU: the model timed (default Ti/16)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16, help="CPU: images per step")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per timed round")
    parser.add_argument("--compile-steps", type=int, default=5, help="steps compared eager vs compiled")
    parser.add_argument("--zero-stages", type=int, nargs="+", default=[1, 2, 3], help="compared eager vs compiled")
    parser.add_argument("--warmup", type=int, default=3, help="CUDA: untimed steps first (compilation)")
    parser.add_argument("--cases", nargs="*", help="CUDA: e.g. H/14@224 (default: all three)")
    parser.add_argument("--cuda-batch", type=json.loads, default={"L/16@224": 128, "H/14@224": 48, "H/14@448": 8},
                        help="CUDA: micro-batch per case without checkpointing, as JSON (doubled with it)")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher passes it
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.basicConfig(level=logging.WARNING)
    env = setup_distributed()
    with tempfile.TemporaryDirectory(prefix="train-step-") as tmp:
        work = Path(tmp)
        if args.parity:
            results = compare_compile(env, work, args.compile_steps, args.zero_stages)
            comm = compare_comm(env, work, args.compile_steps, args.zero_stages)
            if env.is_main:
                print_compile(results)
                print(f"\ngradient reduction overlapped in buckets vs after backward (tolerance {COMM_RTOL:g})")
                for stage, r in comm.items():
                    print(f"{stage:<6} {' '.join(f'{v:.5f}' for v in r['plain']):<44} {r['max_rel_diff']:>12.2e}")
            figures = {"world_size": env.world_size, "compile_matches_eager": compile_matches(results),
                       "comm": comm, "comm_matches": all(r["max_rel_diff"] <= COMM_RTOL for r in comm.values()),
                       "compile_max_rel_diff": {k: v["max_rel_diff"] for k, v in results.items()},
                       "losses": {k: {"eager": v["eager"], "compiled": v["compiled"]} for k, v in results.items()},
                       "compile_counts": {k: {n: v[n] for n in ("block_graphs", "block_fallbacks", "graphs")}
                                          for k, v in results.items()}}
        elif args.objectives:
            figures = objectives_benchmark(args, env, work)
        elif args.device == "cpu":
            figures = cpu_benchmark(args, env, work)
        else:
            figures = cuda_benchmark(args, env, work)
    if env.is_main:
        print(json.dumps(figures))
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
