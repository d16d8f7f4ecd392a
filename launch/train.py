#!/usr/bin/env python
"""Pretrain or fine-tune a ViT with DeepSpeed.

    deepspeed --num_gpus 8 launch/train.py --config vit_h14.yaml
    deepspeed --hostfile hosts launch/train.py --config vit_l16.yaml optim.lr=5e-4 deepspeed.zero_stage=3
    srun python launch/train.py --config vit_h14.yaml          # SLURM: ranks from srun
    deepspeed --num_gpus 2 launch/train.py --config configs/demo/pretrain.yaml   # CPU demo
    python launch/train.py --config vit_h14.yaml --dry-run --nodes 4 --gpus-per-node 8   # before the queue

Overrides are dotted keys, anywhere on the command line. Exit status: 0 done, 75 saved after
SIGUSR1/SIGTERM (requeue me), 2 the user's mistake (one "error:" line; --debug shows the
traceback), 1 failure (--dry-run: 1 lists every problem found).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.cli import stage_parser, start_stage, user_errors


def main(argv: list[str] | None = None) -> int:
    args = stage_parser(__doc__).parse_intermixed_args(argv)
    if args.dry_run:
        from pipeline.dryrun import main as dry_run

        return dry_run(args, stage="train")
    with user_errors(args.debug):
        env, config = start_stage(args, check_world_size=True)

        import torch.distributed as dist

        from pipeline.train.distributed import init_process_group
        from pipeline.train.trainer import EXIT_PREEMPTED, Trainer

        init_process_group(env)
        trainer, code, status = None, 1, "FAILED"
        try:
            trainer = Trainer(config, env)
            code = trainer.train()
            status = "KILLED" if code == EXIT_PREEMPTED else "FINISHED"
        finally:
            if trainer is not None:
                trainer.close(status)
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
