#!/usr/bin/env python
"""Training-step speed of our ViT against timm's VisionTransformer of the same shape.

--device cpu: forward + backward + AdamW step of both models, alternating round by round in
one process; prints a table, then a JSON line with ratio_vs_timm (our step time over timm's;
target <= 1.05).

--device cuda: ViT-L/16 and ViT-H/14 at 224, and H/14 at 448 with activation checkpointing,
each under the DeepSpeed engine on one GPU with ZeRO-2 and bf16, ours and timm's: images/s,
TFLOP/s, MFU, and peak memory against launch/plan.py's prediction.

    python benchmarks/model_step.py --device cpu
    python benchmarks/model_step.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.flops import (
    VitShape, activation_bytes_per_image, device_peak_tflops, model_state_bytes, train_flops_per_image,
)
from pipeline.model import create_vit
from pipeline.model.weights import timm_config
from pipeline.train.distributed import free_port


def both_models(variant: str, image_size: int, num_classes: int):
    """Our ViT and timm's built from the same arguments, with the same weights."""
    from timm.models.vision_transformer import VisionTransformer

    ours = create_vit(variant, num_classes=num_classes, image_size=image_size).init_weights()
    theirs = VisionTransformer(**timm_config(ours))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return {"ours": ours, "timm": theirs}


def cpu_benchmark(args) -> dict:
    torch.manual_seed(0)
    models = both_models(args.variant, args.image_size, 1000)
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    y = torch.randint(0, 1000, (args.batch_size,))

    def step(name):
        loss = torch.nn.functional.cross_entropy(models[name](x), y)
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)

    for name in models:  # warm-up
        step(name)
    times = {name: [] for name in models}
    for _ in range(args.rounds):
        for name in models:
            start = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            times[name].append((time.perf_counter() - start) / args.steps)
    median = {name: statistics.median(t) for name, t in times.items()}
    shape = VitShape.from_variant(args.variant, args.image_size, 1000)
    print(f"{args.variant} at {args.image_size} px, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"{args.rounds} alternating rounds of {args.steps} steps (median)")
    print(f"{'model':<6} {'s/step':>8} {'images/s':>9} {'GFLOP/s':>9}")
    for name, seconds in median.items():
        print(f"{name:<6} {seconds:>8.3f} {args.batch_size / seconds:>9.1f} "
              f"{args.batch_size * train_flops_per_image(shape) / seconds / 1e9:>9.1f}")
    ratio = median["ours"] / median["timm"]
    print(f"ratio_vs_timm (ours / timm step time): {ratio:.3f}  (target <= 1.05)")
    return {"device": "cpu", "variant": args.variant, "image_size": args.image_size, "batch_size": args.batch_size,
            "ours_s_per_step": median["ours"], "timm_s_per_step": median["timm"], "ratio_vs_timm": ratio,
            "threads": torch.get_num_threads(), "machine": platform.machine(), "torch": torch.__version__}


def cuda_benchmark(args) -> dict:
    import deepspeed

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    deepspeed.init_distributed()
    device_name = torch.cuda.get_device_name()
    peak = device_peak_tflops(device_name)
    cases = [("L/16", 224, False, 64), ("H/14", 224, False, 32), ("H/14", 448, True, 16)]
    rows, figures = [], {"device": device_name, "peak_tflops": peak}
    for variant, size, ckpt, batch in cases:
        shape = VitShape.from_variant(variant, size, 1000)
        activations = batch * activation_bytes_per_image(shape, checkpointing=ckpt)
        predicted_gb = (model_state_bytes(shape, 2, 1) + activations) / 2**30
        for name, model in both_models(variant, size, 1000).items():
            model.set_grad_checkpointing(ckpt)  # ours takes every-n-blocks; True is every block
            config = {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1,
                      "bf16": {"enabled": True}, "zero_optimization": {"stage": 2}, "gradient_clipping": 1.0,
                      "zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1}
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
            x = torch.randn(batch, 3, size, size, device=engine.device, dtype=torch.bfloat16)
            y = torch.randint(0, 1000, (batch,), device=engine.device)
            torch.cuda.reset_peak_memory_stats()
            for i in range(args.warmup + args.steps):
                if i == args.warmup:
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                loss = torch.nn.functional.cross_entropy(engine(x).float(), y)
                engine.backward(loss)
                engine.step()
            torch.cuda.synchronize()
            seconds = (time.perf_counter() - start) / args.steps
            images_per_s = batch / seconds
            tflops = images_per_s * train_flops_per_image(shape) / 1e12
            peak_gb = torch.cuda.max_memory_allocated() / 2**30
            key = f"{name}_{variant.replace('/', '')}_{size}{'_ckpt' if ckpt else ''}"
            figures.update({f"{key}_images_per_s": images_per_s, f"{key}_tflops": tflops,
                            f"{key}_mfu": tflops / peak if peak else None, f"{key}_peak_gb": peak_gb,
                            f"{key}_predicted_gb": predicted_gb})
            mfu = tflops / peak if peak else float("nan")
            rows.append((name, variant, size, ckpt, batch, images_per_s, tflops, mfu, peak_gb, predicted_gb))
            del engine, optimizer, model
            torch.cuda.empty_cache()
    print(f"one {device_name}, DeepSpeed ZeRO-2, bf16, fused AdamW; {args.steps} timed steps after {args.warmup}")
    print(f"{'model':<6} {'variant':<6} {'px':>4} {'ckpt':>5} {'batch':>5} {'img/s':>8} {'TFLOP/s':>8} {'MFU':>6} "
          f"{'peak GB':>8} {'plan GB':>8}")
    for name, variant, size, ckpt, batch, ips, tf, mfu, peak_gb, plan_gb in rows:
        print(f"{name:<6} {variant:<6} {size:>4} {str(ckpt):>5} {batch:>5} {ips:>8.1f} {tf:>8.1f} {mfu:>6.1%} "
              f"{peak_gb:>8.1f} {plan_gb:>8.1f}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--variant", default="S/16", help="cpu: the ViT size (default S/16)")
    parser.add_argument("--image-size", type=int, default=224, help="cpu: resolution (default 224)")
    parser.add_argument("--batch-size", type=int, default=8, help="cpu: batch (default 8)")
    parser.add_argument("--rounds", type=int, default=5, help="cpu: alternating rounds (default 5)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round (cpu) or per case (cuda)")
    parser.add_argument("--warmup", type=int, default=5, help="cuda: untimed steps first (default 5)")
    args = parser.parse_args()
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device here")
        args.steps = max(args.steps, 20)
        figures = cuda_benchmark(args)
    else:
        figures = cpu_benchmark(args)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
