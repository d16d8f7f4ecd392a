#!/usr/bin/env python
"""Evaluate a checkpoint: top-1, top-5, loss, per-class accuracy, confusion matrix, ECE.

    deepspeed --num_gpus 8 launch/evaluate.py --config vit_h14_eval.yaml
    deepspeed --num_gpus 2 launch/evaluate.py --config configs/demo/evaluate.yaml --checkpoint runs/demo/demo-finetune
    srun python launch/evaluate.py --config vit_l16_eval.yaml eval.micro_batch_size=128

--checkpoint (or eval.checkpoint) is a run directory, a checkpoint directory of any ZeRO stage
and world size, or a .safetensors file; a resolution other than the checkpoint's is resampled.
Writes RUN_DIR/report.json and an MLflow run tagged stage=evaluate.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import ConfigError, load_config  # noqa: E402
from pipeline.train.distributed import discover  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a config path, or a name under configs/")
    parser.add_argument("--checkpoint", help="what to evaluate (default: eval.checkpoint)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.image_size=448")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    env = discover(args.local_rank)
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank {env.rank}] %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import deepspeed
    import torch.distributed as dist

    from pipeline.evaluate import evaluate

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.init_distributed()
    try:
        report = evaluate(config, env, args.checkpoint)
        if env.is_main:
            print(f"top-1 {report['top1']:.4f}  top-5 {report['top5']:.4f}  loss {report['loss']:.4f}  "
                  f"ECE {report['ece']:.4f}  on {report['num_samples']} images ({report['skipped']} unreadable) "
                  f"at {report['image_size']} px -> {config.run.run_dir / 'report.json'}")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
