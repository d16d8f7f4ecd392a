#!/usr/bin/env python
"""The first run on a GPU, in one command (``make gpu-check``): at most 7 minutes on one H100/H200,
most valuable figures first. Each phase runs in a process of its own with its own timeout under
one deadline, appends one JSON line to RESULTS as it ends, and prints one line: a hang or a crash
costs that phase alone, and a killed run keeps every figure gathered before the kill.

  env          GPU, torch and CUDA; the SDPA backends that run at the ViT head dimensions (64, 80);
               the bf16 matmul ceiling (8192^3) and device copy bandwidth
  eager-H14    the real Trainer step of configs/vit_h14.yaml at its micro-batch (data, validation,
  eager-L16    tracking and length overridden; synthetic uint8 batches on the device): images/s,
               MFU against the datasheet and the measured ceiling, HFU, peak memory against the
               planner, host syncs per step; the same for configs/vit_l16.yaml
  eager-H14mae the same for configs/vit_h14_mae.yaml: MAE's step (mask 0.75, 512 x 8 decoder),
               its images/s beside eager-H14's (the speedup the FLOPs predict: 3.4x)
  compiled-*   the same models with model.compile, each in a fresh process: compile time, block
               graphs and recompile-limit fallbacks, MFU
  correctness  5 steps of a small ViT under ZeRO-1, 2 and 3 in bf16 from the weights and batches in
               benchmarks/gpu_first/ against the losses recorded there on the CPU; compiled vs eager
  decode       data.decode=gpu images/s at 500x375 and 1600x1200, pixels against the CPU path, the
               CPU path per core beside it, and the stream race: long work queued on the compute
               stream, its tensors freed, then a decode; wrong results with the side stream and
               without
  launcher     make_shards, then the deepspeed launcher: data.decode=gpu, ZeRO-2, 20 steps, a
               checkpoint, then a resume

    python benchmarks/gpu_first.py --results gpu_first.jsonl          # on the GPU machine
    python benchmarks/gpu_first.py --device cpu --tiny --results r.jsonl   # the same code, tiny (make test)
    python benchmarks/gpu_first.py --record-reference                      # rewrite benchmarks/gpu_first/
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "benchmarks" / "gpu_first"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# Phase: seconds it may take on the GPU (cut to what the deadline leaves).
PHASES = {"env": 40, "eager-H14": 70, "eager-L16": 50, "eager-H14mae": 60, "compiled-H14": 100, "compiled-L16": 70,
          "correctness": 60, "decode": 45, "launcher": 90}
SHIPPED = {"H14": "configs/vit_h14.yaml", "L16": "configs/vit_l16.yaml", "H14mae": "configs/vit_h14_mae.yaml"}
DATASHEET_TFLOPS = 989.0  # H100/H200 SXM dense bf16
CORRECTNESS_RTOL = 0.02  # GPU vs CPU bf16 losses after 5 steps: other kernels, other rounding
COMPILE_RTOL = 2**-6  # compiled vs eager: two bf16 ulps at 1.0, as benchmarks/train_step.py
REFERENCE_MODEL = ["model.variant=pico/4", "model.image_size=16", "model.num_classes=10"]


def emit(results: Path, record: dict) -> None:
    with results.open("a") as out:
        out.write(json.dumps(record) + "\n")
    ok = "ok" if record.get("ok") else "FAILED"
    shown = {k: v for k, v in record.items() if k not in ("phase", "ok") and not isinstance(v, (dict, list))}
    print(f"[{record['phase']}] {ok} " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                  for k, v in shown.items()), flush=True)


def previous(results: Path, phase: str) -> dict:
    for line in results.read_text().splitlines() if results.exists() else []:
        record = json.loads(line)
        if record.get("phase") == phase:
            return record
    return {}


# -- phases (each runs in its own process) ------------------------------------------------------

def phase_env(args) -> dict:
    import torch

    cuda = args.device == "cuda"
    record = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    if not cuda:
        return {**record, "device": "cpu"}
    device = torch.device("cuda")
    record.update(device=torch.cuda.get_device_name(device), sm=torch.cuda.get_device_capability(device),
                  memory_gb=torch.cuda.get_device_properties(device).total_memory / 2**30)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    backends = {}
    for head_dim in (64, 80):  # L/16: 1024/16, H/14: 1280/16
        q = torch.randn(32, 16, 257, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
        runs = []
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            try:
                with sdpa_kernel([backend]):
                    sdpa(q, q, q).sum().backward()
                runs.append(backend.name)
            except RuntimeError:
                pass
        backends[str(head_dim)] = runs
    record["sdpa_backends"] = backends
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    record["matmul_tflops"] = n**3 * 2 / timed(lambda: a @ b, 10) / 1e12
    x = torch.empty(2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    record["copy_gb_s"] = 2 * x.numel() / timed(lambda: y.copy_(x), 10) / 1e9  # read + write
    return record


def timed(fn, repeats: int) -> float:
    """Seconds per call on the GPU, after 3 warm-ups."""
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def step_case(args, model: str, compiled: bool, work: Path) -> dict:
    """The real Trainer step of a shipped config (tiny: the same config at a test size)."""
    import torch

    from pipeline.config import load_config
    from pipeline.data import TrainBatch
    from pipeline.flops import activation_bytes_per_image, model_state_bytes, train_flops_per_image
    from pipeline.train.objectives import objective_of
    from train_step import TrainerCase, WATCH, batches, host_syncs, setup_distributed, shards, sync

    env = setup_distributed()
    overrides = [f"run.output_dir={work}", "run.tracking_uri=none", f"data.train_shards={shards(work)}",
                 "data.num_workers=0", "train.eval_every=null", "knn.train_shards=null", "knn.eval_shards=null",
                 "train.ema_decay=null", "train.epochs=null",
                 "train.total_samples=null", "train.total_steps=1000000",
                 "train.log_every=1000000", "train.checkpoint_every=1000000", "train.resume=never",
                 f"model.compile={compiled}"]
    if args.tiny:
        overrides += ["model.variant=mu/4", "model.image_size=16", "model.num_classes=10", "train.micro_batch_size=4",
                      "mae.decoder_dim=32", "mae.decoder_depth=1", "mae.decoder_heads=2"]  # an MAE's decoder, tiny
    config = load_config(ROOT / SHIPPED[model], overrides)
    micro = config.train.micro_batch_size  # one micro-batch per optimizer step on one GPU
    config = load_config(ROOT / SHIPPED[model], overrides + [f"train.global_batch_size={micro}"])
    device = torch.device(args.device)
    data = batches(config, 4, seed=0, device=device)
    if device.type == "cuda":
        data = [TrainBatch(b.images.to(device), b.labels.to(device)) for b in data]  # already on the device
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    case = TrainerCase(config, env, data)
    for _ in range(2):
        case.step()
    sync(device)
    first_steps_s = time.perf_counter() - start
    steps = 2 if args.tiny else 8
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        case.step()
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    shape = objective_of(config).shapes(config)  # an MAE's: its encoder on the visible patches and its decoder
    ckpt = config.deepspeed.activation_checkpointing
    record = {"variant": config.model.variant, "objective": config.objective, "image_size": config.model.image_size,
              "micro_batch": micro,
              "zero": config.deepspeed.zero_stage, "checkpointing": ckpt, "compile": compiled,
              "images_per_s": micro / seconds, "s_per_step": seconds, "first_two_steps_s": first_steps_s,
              "model_tflops": micro / seconds * train_flops_per_image(shape) / 1e12,
              "hardware_tflops": micro / seconds * train_flops_per_image(shape, recompute=ckpt) / 1e12}
    if compiled:
        record.update(WATCH.counts())
    if device.type == "cuda":
        ceiling = previous(args.results, "env").get("matmul_tflops")
        plan_gb = (model_state_bytes(shape, config.deepspeed.zero_stage, 1)
                   + micro * activation_bytes_per_image(shape, checkpointing=ckpt)) / 2**30
        peak_gb = torch.cuda.max_memory_allocated(device) / 2**30
        record.update(mfu=record["model_tflops"] / DATASHEET_TFLOPS, hfu=record["hardware_tflops"] / DATASHEET_TFLOPS,
                      mfu_vs_measured=record["model_tflops"] / ceiling if ceiling else None,
                      peak_gb=peak_gb, plan_gb=plan_gb, plan_error=peak_gb / plan_gb - 1,
                      host_syncs_per_step=host_syncs(case, 3))
    case.close()
    return record


def phase_correctness(args, work: Path) -> dict:
    """Losses of 5 steps under ZeRO-1, 2 and 3 from the carried weights and batches, against the
    CPU reference; and compiled against eager at ZeRO-2."""
    import torch
    from safetensors.torch import load_file

    from pipeline.config import load_config
    from pipeline.data import TrainBatch
    from train_step import TrainerCase, setup_distributed, shards

    env = setup_distributed()
    tensors = load_file(str(FIXTURE / "batches.safetensors"))
    data = [TrainBatch(tensors["images"][i], tensors["labels"][i]) for i in range(len(tensors["labels"]))]

    def losses(zero: int, compiled: bool) -> list[float]:
        config = load_config(ROOT / "configs/demo/pretrain.yaml", [
            f"run.output_dir={work}", f"run.name=correct-{zero}-{compiled}", "run.tracking_uri=none",
            "run.stage=finetune", f"finetune.init_from={FIXTURE / 'weights.safetensors'}",
            f"data.train_shards={shards(work)}", "data.num_workers=0", "data.mixup=0", "data.cutmix=0",
            *REFERENCE_MODEL,
            "model.drop_path_rate=0.0", f"model.compile={compiled}", f"deepspeed.zero_stage={zero}",
            "deepspeed.activation_checkpointing=true", f"train.global_batch_size={len(data[0].labels)}",
            f"train.micro_batch_size={len(data[0].labels)}", "train.total_steps=1000000", "train.eval_every=null",
            "train.ema_decay=null", "train.log_every=1000000", "train.checkpoint_every=1000000",
            "train.resume=never", "optim.warmup_steps=0", "optim.lr=3e-3"])
        device = torch.device(args.device)
        case = TrainerCase(config, env, [TrainBatch(b.images.to(device), b.labels.to(device)) for b in data])
        out = [m.mean() for m in (case.step() for _ in data)]
        case.close()
        return out

    got = {f"zero{z}": losses(z, False) for z in (1, 2, 3)}
    if args.record:
        return {"losses": got}
    reference = json.loads((FIXTURE / "reference.json").read_text())
    compiled = losses(2, True)
    worst = max(abs(a - b) / max(abs(b), 1.0) for stage, values in got.items()
                for a, b in zip(values, reference["losses"][stage]))
    compile_diff = max(abs(a - b) / max(abs(b), 1.0) for a, b in zip(compiled, got["zero2"]))
    return {"losses": got, "reference": reference["losses"], "compiled_zero2": compiled,
            "max_rel_diff_vs_cpu": worst, "tolerance": CORRECTNESS_RTOL, "compiled_max_rel_diff": compile_diff,
            "compile_tolerance": COMPILE_RTOL, "ok": worst <= CORRECTNESS_RTOL and compile_diff <= COMPILE_RTOL}


def record_reference(args) -> None:
    """Write benchmarks/gpu_first/: a small ViT's initial weights, 5 batches, and the CPU losses."""
    import torch
    from safetensors.torch import save_file

    from pipeline.model import create_vit

    FIXTURE.mkdir(exist_ok=True)
    torch.manual_seed(0)
    vit = create_vit("pico/4", num_classes=10, image_size=16).init_weights()
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(FIXTURE / "weights.safetensors"))
    g = torch.Generator().manual_seed(0)
    save_file({"images": torch.randint(0, 256, (5, 16, 3, 16, 16), dtype=torch.uint8, generator=g),
               "labels": torch.randint(0, 10, (5, 16), generator=g)}, str(FIXTURE / "batches.safetensors"))
    with tempfile.TemporaryDirectory() as tmp:
        result = phase_correctness(args, Path(tmp))
    reference = {"model": REFERENCE_MODEL, "device": "cpu", "torch": torch.__version__, "losses": result["losses"]}
    (FIXTURE / "reference.json").write_text(json.dumps(reference, indent=1) + "\n")
    print(json.dumps(reference))


def phase_decode(args) -> dict:
    """data.decode=gpu against the CPU path on photos, and the stream race with and without the fix."""
    import random

    import torch

    from pipeline.data.device import BatchFinisher
    from pipeline.data.transforms import DeviceTrainTransform, TrainTransform, stack_images

    device = torch.device(args.device)
    size, per_batch = (16, 8) if args.tiny else (224, 64)
    record = {}
    for width, height in ((500, 375), (1600, 1200)):
        images = photos(width, height, 4 if args.tiny else 16)
        crops = [DeviceTrainTransform(size)(data, random.Random(i)) for i, data in enumerate(images)]
        reference = torch.stack([TrainTransform(size)(data, random.Random(i)) for i, data in enumerate(images)])
        decoder = BatchFinisher(size, device)
        got, _ = decoder(stack_images(crops, [0] * len(crops)))
        diff = (got.cpu().int() - reference.int()).abs().float()
        passes = 1 if args.tiny else max(1, 4 * per_batch // len(images))
        pool = [DeviceTrainTransform(size)(data, random.Random(i)) for i, data in enumerate(images * passes)]
        batches = [stack_images(pool[i:i + per_batch], [0] * len(pool[i:i + per_batch]))
                   for i in range(0, len(pool), per_batch)]
        decoder(batches[0])
        seconds = timed_host(lambda: [decoder(b) for b in batches], device)
        cpu_transform = TrainTransform(size)
        cpu_seconds = timed_host(lambda: [cpu_transform(data, random.Random(0)) for data in images], device)
        key = f"{width}x{height}"
        record.update({f"gpu_images_per_s_{key}": len(pool) / seconds,
                       f"cpu_images_per_s_per_core_{key}": len(images) / cpu_seconds,
                       f"pixel_max_diff_{key}": diff.max().item(), f"pixel_mean_diff_{key}": diff.mean().item()})
    if device.type == "cuda":
        record.update(race(size, device, args.tiny))
        record["ok"] = record["race_wrong_with_side_stream"] == 0
    return record


def race(size: int, device, tiny: bool) -> dict:
    """Long work queued on the compute stream, its tensors freed while it runs, then a decode: how
    many decodes came out wrong, with the side stream and without (the decode on the compute
    stream)."""
    import random

    import torch

    from pipeline.data.device import BatchFinisher
    from pipeline.data.transforms import DeviceTrainTransform, stack_images

    images = photos(1600, 1200, 16)
    batch = stack_images([DeviceTrainTransform(size, hflip=0)(d, random.Random(i)) for i, d in enumerate(images)],
                         [0] * len(images))
    expected, _ = BatchFinisher(size, device)(batch)
    expected = expected.clone()
    torch.cuda.synchronize()
    out = {}
    for side in (True, False):
        decoder, wrong = BatchFinisher(size, device, side_stream=side), 0
        for _ in range(30):
            work = [torch.randn(4096, 4096, device=device) for _ in range(4)]
            for _ in range(8):
                work = [w @ w.T / 4096 for w in work]  # long, queued, not waited for
            del work  # freed to the compute stream's pool while its kernels still run
            got, _ = decoder(batch)
            torch.cuda.synchronize()
            wrong += int(not torch.equal(got, expected))
        out[f"race_wrong_{'with' if side else 'without'}_side_stream"] = wrong
    out["race_trials"] = 30
    return out


def timed_host(fn, device) -> float:
    import torch

    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def photos(width: int, height: int, count: int) -> list[bytes]:
    """scikit-image's photos (on the GPU machine) as JPEGs, else generated ones; ``count`` of them."""
    try:
        from data_throughput import photos_as_jpeg

        images = photos_as_jpeg(width, height)
    except ImportError:
        import io

        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(0)
        images = []
        for _ in range(4):
            y, x = np.mgrid[:height, :width]
            base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
            buffer = io.BytesIO()
            Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)).save(
                buffer, format="JPEG", quality=90)
            images.append(buffer.getvalue())
    return (images * count)[:count]


def phase_launcher(args, work: Path) -> dict:
    """make_shards, then 20 steps (tiny: 4) of data.decode=gpu under ZeRO-2 through the deepspeed
    launcher with a checkpoint at the end, then 5 (2) more resumed from it."""
    steps = 4 if args.tiny else 20
    size = 16 if args.tiny else 112
    shards = work / "shards"
    images = 256 if args.tiny else 4096
    subprocess.run([sys.executable, str(ROOT / "launch/make_shards.py"), "--source", f"synthetic:{images}x{size * 2}",
                    "--out", str(shards), "--val-fraction", "0.25", "--quiet"], check=True, cwd=ROOT)
    common = [f"run.output_dir={work}", "run.name=launcher", "run.tracking_uri=none",
              f"data.train_shards={shards}/train.json", f"data.eval_shards={shards}/val.json", "data.decode=gpu",
              "data.num_workers=2", "data.hflip=0.5", f"model.variant={'pico/4' if args.tiny else 'S/16'}",
              f"model.image_size={size}", "deepspeed.zero_stage=2", "train.global_batch_size=32",
              "train.micro_batch_size=16", f"train.checkpoint_every={steps}", "train.log_every=1",
              "train.eval_every=null", "train.ema_decay=null"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.device == "cpu":
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    record = {}
    for name, total in (("first", steps), ("resumed", steps + (2 if args.tiny else 5))):
        from pipeline.train.distributed import free_port

        start = time.perf_counter()
        # The deepspeed launcher as a module: wheels installed with --target have no console script.
        result = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port",
                                 str(free_port()), str(ROOT / "launch/train.py"), "--config",
                                 str(ROOT / "configs/demo/pretrain.yaml"), *common, f"train.total_steps={total}"],
                                cwd=ROOT, env=env, capture_output=True, text=True)
        record[f"{name}_exit"] = result.returncode
        record[f"{name}_s"] = time.perf_counter() - start
        if result.returncode:
            record[f"{name}_log"] = (result.stdout + result.stderr)[-2000:]
            return {**record, "ok": False}
    lines = [json.loads(line) for line in (work / "launcher/metrics.jsonl").read_text().splitlines()]
    record.update(steps=[r["step"] for r in lines], last_loss=lines[-1]["loss"],
                  images_per_s=lines[-1]["images_per_s"], skipped=lines[-1]["data/skipped"],
                  resumed="resumed from" in result.stderr + result.stdout)
    record["ok"] = record["resumed"] and record["steps"][-1] == total
    return record


def run_phase(args) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING)
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"gpu-first-{args.phase}-") as tmp:
        work = Path(tmp)
        if args.phase == "env":
            record = phase_env(args)
        elif args.phase.startswith(("eager-", "compiled-")):
            kind, model = args.phase.split("-")
            record = step_case(args, model, kind == "compiled", work)
        elif args.phase == "correctness":
            record = phase_correctness(args, work)
        elif args.phase == "decode":
            record = phase_decode(args)
        else:
            record = phase_launcher(args, work)
    record = {"phase": args.phase, "ok": record.pop("ok", True), "seconds": time.perf_counter() - start, **record}
    emit(args.results, record)
    return 0 if record["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="test-sized models and data (the form make test runs)")
    parser.add_argument("--results", type=Path, default=Path("gpu_first.jsonl"), help="JSON lines, appended")
    parser.add_argument("--deadline", type=float, help="seconds for every phase together (default 390; CPU 900)")
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated, from: " + ", ".join(PHASES))
    parser.add_argument("--phase", choices=list(PHASES), help=argparse.SUPPRESS)  # one phase, in this process
    parser.add_argument("--record-reference", dest="record", action="store_true",
                        help="write benchmarks/gpu_first/ (weights, batches, CPU losses) and exit")
    args = parser.parse_args(argv)
    if args.record:
        args.device, args.tiny = "cpu", True
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        record_reference(args)
        return 0
    if args.phase:
        return run_phase(args)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device: run with --device cpu --tiny for the CPU form")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    end, failed = time.monotonic() + (args.deadline or (390.0 if args.device == "cuda" else 900.0)), []
    for phase in args.phases.split(","):
        left = end - time.monotonic()
        budget = min(PHASES[phase] if args.device == "cuda" else 240, left)
        if budget < 5:
            emit(args.results, {"phase": phase, "ok": False, "error": "skipped: the deadline has passed"})
            failed.append(phase)
            continue
        cmd = [sys.executable, __file__, "--phase", phase, "--device", args.device, "--results", str(args.results)]
        try:
            result = subprocess.run(cmd + (["--tiny"] if args.tiny else []), cwd=ROOT, timeout=budget,
                                    capture_output=True, text=True)
            print("".join(line for line in result.stdout.splitlines(keepends=True) if line.startswith(f"[{phase}]")),
                  end="", flush=True)
            if result.returncode and not previous(args.results, phase):
                emit(args.results, {"phase": phase, "ok": False, "exit": result.returncode,
                                    "error": result.stderr[-1500:]})
            failed += [phase] if result.returncode else []
        except subprocess.TimeoutExpired as e:
            tail = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
            emit(args.results, {"phase": phase, "ok": False, "error": f"timed out after {budget:.0f} s",
                                "log": tail[-1500:]})
            failed.append(phase)
    print(json.dumps({"results": str(args.results), "failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
