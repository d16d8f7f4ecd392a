"""What the stage launchers share: arguments, rank discovery, logging, config loading."""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.config import Config, ConfigError, load_config
from pipeline.plan import GPUS
from pipeline.tracking import tracking_unavailable, tracking_uri
from pipeline.train import signals
from pipeline.train.distributed import DistEnv, discover, set_cpu_threads


def stage_parser(doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a config path, or a name under configs/")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 train.total_steps=100")
    # The deepspeed launcher passes --local_rank; torchrun and srun set the environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    check = parser.add_argument_group("dry run (no GPU, no process group: run it on the login node)")
    check.add_argument("--dry-run", action="store_true",
                       help="check the config chain, manifests, shard files, batch split, memory fit and stage "
                            "links at the cluster shape below; exit 0, or 1 listing every problem")
    check.add_argument("--nodes", type=int, default=1, help="--dry-run: nodes of the job (default 1)")
    check.add_argument("--gpus-per-node", type=int, default=8, help="--dry-run: GPUs (ranks) per node (default 8)")
    check.add_argument("--gpu", choices=sorted(GPUS), default="h100", help="--dry-run: GPU kind (default h100)")
    check.add_argument("--after", action="append", default=[], metavar="CONFIG",
                       help="--dry-run: config of an earlier stage of this pipeline, whose run directory this "
                            "stage may start from before it exists (repeatable; inherited configs count already)")
    return parser


def start_stage(args: argparse.Namespace, *, check_world_size: bool) -> tuple[DistEnv, Config | None]:
    """Catch preemption signals, discover the ranks, set up logging (INFO on rank 0), load the
    config, fit the rank's threads to its cores. The config is None after a config error, or
    where MLflow is wanted but not installed, which has been printed."""
    signals.install()
    env = discover(args.local_rank)
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank {env.rank}] %(levelname)s %(name)s: %(message)s")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    try:
        config = load_config(args.config, args.overrides, world_size=env.world_size if check_world_size else None)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return env, None
    problem = tracking_unavailable(tracking_uri(config.run.tracking_uri))
    if problem:
        if env.is_main:
            print(f"error: {problem}", file=sys.stderr)
        return env, None
    set_cpu_threads(config.data.num_workers, warn=env.is_main)
    return env, config
