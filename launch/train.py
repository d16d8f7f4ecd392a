#!/usr/bin/env python
"""Pretrain or fine-tune a ViT with DeepSpeed.

    deepspeed --num_gpus 8 launch/train.py --config vit_h14.yaml
    deepspeed --hostfile hosts launch/train.py --config vit_l16.yaml optim.lr=5e-4 deepspeed.zero_stage=3
    srun python launch/train.py --config vit_h14.yaml          # SLURM: ranks from srun
    deepspeed --num_gpus 2 launch/train.py --config configs/demo/pretrain.yaml   # CPU demo

Overrides are dotted keys after the config. Exit status: 0 done, 75 saved after SIGUSR1/SIGTERM
(requeue me), 2 bad config, 1 failure.
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
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 train.total_steps=100")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    env = discover(args.local_rank)
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank {env.rank}] %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, args.overrides, world_size=env.world_size)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import deepspeed
    import torch.distributed as dist

    from pipeline.train.trainer import EXIT_PREEMPTED, Trainer

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.init_distributed()
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
