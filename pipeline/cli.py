"""What the stage launchers share: arguments, rank discovery, logging, config loading."""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.config import Config, ConfigError, load_config
from pipeline.train import signals
from pipeline.train.distributed import DistEnv, discover


def stage_parser(doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a config path, or a name under configs/")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 train.total_steps=100")
    # The deepspeed launcher passes --local_rank; torchrun and srun set the environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def start_stage(args: argparse.Namespace, *, check_world_size: bool) -> tuple[DistEnv, Config | None]:
    """Catch preemption signals, discover the ranks, set up logging (INFO on rank 0), load the
    config. The config is None after a config error, which has been printed."""
    signals.install()
    env = discover(args.local_rank)
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank {env.rank}] %(levelname)s %(name)s: %(message)s")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    try:
        return env, load_config(args.config, args.overrides, world_size=env.world_size if check_world_size else None)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return env, None
