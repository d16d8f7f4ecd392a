#!/usr/bin/env python
"""bf16 numerics: how far do the weights drift from an fp32 run, per gradient-accumulation and
gradient-reduction dtype, at each ZeRO stage? 2 CPU ranks through the deepspeed launcher, the
demo ViT on the digits, 8 accumulation micro-steps per optimizer step.

    python benchmarks/grad_accum_dtype.py                 # stages 1-3, ~20 s a run
    python benchmarks/grad_accum_dtype.py --steps 40 --stages 1 2

Prints a table, then one JSON line. The distance is ||w - w_fp32|| / ||w_fp32 - w_0||: the error
as a share of how far training moved the weights (0 is the fp32 run itself).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.train.distributed import free_port  # noqa: E402


def train(shards: Path, out: Path, name: str, steps: int, *overrides: str) -> Path:
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(ROOT / "launch/train.py"), "--config", str(ROOT / "configs/demo/pretrain.yaml"),
           f"run.output_dir={out}", f"run.name={name}", f"run.tracking_uri=sqlite:///{out}/mlflow.db",
           f"data.train_shards={shards}/train.json", "data.num_workers=1", "model.drop_path_rate=0.0",
           "train.global_batch_size=64", "train.micro_batch_size=4",  # 64 = 4 x 2 ranks x 8 micro-steps
           f"train.total_steps={steps}", f"train.checkpoint_every={steps}", "train.log_every=10",
           "optim.warmup_steps=0", "train.eval_every=null", "train.ema_decay=null", *overrides]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return out / name


def weights(run_dir: Path) -> torch.Tensor:
    """The run's consolidated fp32 weights as one vector (DeepSpeed's chatter goes to stderr)."""
    from pipeline.train.consolidate import consolidated_state_dict

    with contextlib.redirect_stdout(sys.stderr):
        state = consolidated_state_dict(run_dir)
    return torch.cat([state[k].flatten().double() for k in sorted(state)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run (default 20)")
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3], help="ZeRO stages (default 1 2 3)")
    args = parser.parse_args()

    from pipeline.data.sources import digits_source
    from pipeline.data.writer import write_shards

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_shards(digits_source(), tmp / "shards", val_fraction=0.2, max_count=200, progress=False)
        rows = []
        for stage in args.stages:
            # Each stage against an fp32 run of its own: ZeRO-3 initialises under zero.Init, so its
            # starting weights differ from the other stages'.
            common = (f"deepspeed.zero_stage={stage}",)
            start = weights(train(tmp / "shards", tmp, f"zero{stage}-init", 1, *common, "optim.lr=1e-30"))
            reference = weights(train(tmp / "shards", tmp, f"zero{stage}-fp32", args.steps, *common,
                                      "deepspeed.precision=fp32"))
            moved = float((reference - start).norm())
            for accumulate in ("bf16", "fp32"):
                for reduce in ("bf16", "fp32"):
                    name = f"zero{stage}-accum_{accumulate}-reduce_{reduce}"
                    trained = weights(train(tmp / "shards", tmp, name, args.steps, *common,
                                            f"deepspeed.grad_accum_dtype={accumulate}",
                                            f"deepspeed.reduce_dtype={reduce}"))
                    rows.append({"zero_stage": stage, "grad_accum_dtype": accumulate, "reduce_dtype": reduce,
                                 "distance": float((trained - reference).norm()) / moved, "fp32_update_norm": moved})
                    print(f"  {name}: {rows[-1]['distance']:.4f}", file=sys.stderr, flush=True)
    print(f"{'ZeRO':>4}  {'accumulate':>10}  {'reduce':>6}  {'distance from fp32':>18}")
    for r in rows:
        print(f"{r['zero_stage']:>4}  {r['grad_accum_dtype']:>10}  {r['reduce_dtype']:>6}  {r['distance']:>18.4f}")
    print(json.dumps({"steps": args.steps, "accumulation_steps": 8, "ranks": 2, "runs": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
