#!/usr/bin/env python
"""Validate a GPU machine in one command (``make gpu-check``): the pipeline end to end on
synthetic shards, through the real launchers on one GPU, then the CUDA trainer benchmark.

1. shards: ``make_shards.py --source synthetic:N`` (generated JPEGs, nothing downloaded);
2. pretrain a small ViT at SIZE px under ZeRO-1, ZeRO-2 and ZeRO-3, each with bf16, activation
   checkpointing and ``model.compile`` (ZeRO-2 with ``data.decode=gpu``: nvJPEG);
3. fine-tune the ZeRO-1 run at 2 x SIZE px (pos_embed resampled) under ZeRO-3;
4. evaluate the fine-tuned run;
5. ``benchmarks/train_step.py --device cuda`` (skip with --no-benchmark).

Prints a table of the stages (exit status, steps, last loss, images/s, peak memory), then one
JSON line with every figure. ``--device cpu`` runs the same chain on 2 CPU ranks, tiny, as
the test suite does (tests/integration/test_gpu_check.py).

    make gpu-check
    python benchmarks/gpu_check.py --device cuda --variant S/16 --image-size 112
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
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))

from pipeline.train.distributed import free_port  # noqa: E402


def launch(script: str, ranks: int, config: str, overrides: list[str], env: dict, log: Path) -> tuple[int, float]:
    start = time.time()
    with log.open("w") as out:
        code = subprocess.run([str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()),
                               str(ROOT / script), "--config", str(ROOT / config), *overrides],
                              cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    return code, time.time() - start


def last_metrics(run_dir: Path) -> dict:
    """The latest value of every key: the last training line with the last validation's figures."""
    path = run_dir / "metrics.jsonl"
    merged: dict = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        merged.update(json.loads(line))
    return merged


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--variant", help="model (default: S/16 on CUDA, pico/4 on the CPU)")
    parser.add_argument("--image-size", type=int, help="pretraining px; fine-tuning at twice it (default 112 / 16)")
    parser.add_argument("--images", type=int, help="synthetic images (default 4096 / 256)")
    parser.add_argument("--steps", type=int, help="optimizer steps per training stage (default 60 / 4)")
    parser.add_argument("--no-benchmark", action="store_true", help="skip benchmarks/train_step.py")
    parser.add_argument("--work", help="keep outputs here (default: a temporary directory)")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device: run with --device cpu for the CPU path")
    variant = args.variant or ("S/16" if cuda else "pico/4")
    size = args.image_size or (112 if cuda else 16)
    images, steps = args.images or (4096 if cuda else 256), args.steps or (60 if cuda else 4)
    ranks, batch = (1, 64) if cuda else (2, 16)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    if not cuda:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        shards = work / "shards"
        subprocess.run([sys.executable, str(ROOT / "launch/make_shards.py"), "--source", f"synthetic:{images}x{size * 2}",
                        "--out", str(shards), "--val-fraction", "0.25", "--max-count", str(max(images // 8, 16)),
                        "--quiet"], check=True, cwd=ROOT)
        common = [f"run.output_dir={work}", f"run.tracking_uri=sqlite:///{work}/mlflow.db", "run.experiment=gpu-check",
                  f"data.train_shards={shards}/train.json", f"data.eval_shards={shards}/val.json",
                  "data.num_workers=2", f"model.variant={variant}", "model.compile=true", "data.hflip=0.5",
                  f"train.global_batch_size={batch * ranks}", f"train.micro_batch_size={batch // 2}",
                  f"train.total_steps={steps}", f"train.log_every={max(steps // 4, 1)}", f"train.checkpoint_every={steps}",
                  "deepspeed.activation_checkpointing=true", "deepspeed.precision=bf16"]
        stages = [(f"pretrain-zero{z}", "launch/train.py", "configs/demo/pretrain.yaml",
                   [f"run.name=pretrain-zero{z}", f"model.image_size={size}", f"deepspeed.zero_stage={z}",
                    f"data.decode={'gpu' if z == 2 else 'cpu'}"])
                  for z in (1, 2, 3)]
        stages.append(("finetune-zero3", "launch/train.py", "configs/demo/finetune.yaml",
                       ["run.name=finetune-zero3", f"model.image_size={size * 2}", "deepspeed.zero_stage=3",
                        f"finetune.init_from={work}/pretrain-zero1"]))
        stages.append(("evaluate", "launch/evaluate.py", "configs/demo/evaluate.yaml",
                       ["run.name=evaluate", f"model.image_size={size * 2}", f"eval.checkpoint={work}/finetune-zero3"]))
        rows, ok = [], True
        print(f"{'stage':<16} {'exit':>4} {'s':>6} {'steps':>5} {'loss':>7} {'img/s':>8} {'GB':>6}  (logs in {work})")
        for name, script, config, extra in stages:
            code, seconds = launch(script, ranks, config, common + extra, env, work / f"{name}.log")
            run_dir = work / extra[0].split("=", 1)[1]
            row = {"stage": name, "exit": code, "seconds": round(seconds, 1), **{k: last_metrics(run_dir).get(k) for k in
                   ("step", "loss", "images_per_s", "max_memory_gb", "mfu", "val/top1", "val_ema/top1")}}
            if name == "evaluate" and (run_dir / "report.json").exists():
                report = json.loads((run_dir / "report.json").read_text())
                row.update(top1=report["top1"], num_samples=report["num_samples"])
            rows.append(row)
            ok &= code == 0
            cells = [fmt(row[k], spec) for k, spec in (("step", "d"), ("loss", ".3f"), ("images_per_s", ".0f"),
                                                         ("max_memory_gb", ".1f"))]
            print(f"{name:<16} {code:>4} {seconds:>6.0f} {cells[0]:>5} {cells[1]:>7} {cells[2]:>8} {cells[3]:>6}"
                  + (f"  top-1 {row['top1']:.3f} on {row['num_samples']}" if "top1" in row else ""), flush=True)
            if code != 0:
                print((work / f"{name}.log").read_text()[-3000:], file=sys.stderr)
                break
        figures = {"device": args.device, "variant": variant, "image_size": size, "stages": rows, "pipeline_ok": ok}
        if cuda and ok and not args.no_benchmark:
            bench = subprocess.run([sys.executable, str(ROOT / "benchmarks/train_step.py"), "--device", "cuda"],
                                   cwd=ROOT, env=env, capture_output=True, text=True)
            print(bench.stdout[-8000:], bench.stderr[-3000:] if bench.returncode else "")
            lines = bench.stdout.strip().splitlines()
            figures["train_step"] = json.loads(lines[-1]) if bench.returncode == 0 and lines else {"exit": bench.returncode}
            ok &= bench.returncode == 0
    print(json.dumps(figures))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
