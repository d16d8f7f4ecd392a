"""What the stage launchers share: arguments, rank discovery, logging, config loading."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from contextlib import contextmanager
from typing import Iterator

from pipeline.config import Config, load_config
from pipeline.errors import EXIT_USER_ERROR, UserError
from pipeline.plan import GPUS
from pipeline.tracking import tracking_unavailable, tracking_uri
from pipeline.train import signals
from pipeline.train.distributed import DistEnv, discover, set_cpu_threads

USER_ERROR_GRACE_S = 5.0


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
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a user error too (or set VIT_PIPELINE_DEBUG=1)")
    check.add_argument("--plan-json", metavar="FILE",
                       help="--dry-run: also write the resolved run plan as JSON (what the run writes to "
                            "RUN_DIR/plan.json)")
    check.add_argument("--after", action="append", default=[], metavar="CONFIG",
                       help="--dry-run: config of an earlier stage of this pipeline, whose run directory this "
                            "stage may start from before it exists (repeatable; inherited configs count already)")
    return parser


def start_stage(args: argparse.Namespace, *, check_world_size: bool) -> tuple[DistEnv, Config]:
    """Catch preemption signals, discover the ranks, set up logging (INFO on rank 0), load the
    config, check that its tracking can start, fit the rank's threads to its cores. A config
    error, or MLflow wanted but missing, raises a :class:`~pipeline.errors.UserError`."""
    signals.install()
    env = discover(args.local_rank)
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank {env.rank}] %(levelname)s %(name)s: %(message)s")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    config = load_config(args.config, args.overrides, world_size=env.world_size if check_world_size else None)
    problem = tracking_unavailable(tracking_uri(config.run.tracking_uri))
    if problem:
        raise UserError(problem)
    set_cpu_threads(config.data.num_workers, warn=env.is_main)
    return env, config


@contextmanager
def user_errors(debug: bool = False) -> Iterator[None]:
    """A :class:`~pipeline.errors.UserError` raised inside becomes one line, ``error: ...``, on
    rank 0's stderr, and :data:`~pipeline.errors.EXIT_USER_ERROR` on every rank, without a
    traceback; with ``debug`` (``--debug``, or ``VIT_PIPELINE_DEBUG=1``) it is raised as it is.
    Any other exception is a bug and keeps its traceback."""
    try:
        yield
    except UserError as e:
        if debug or os.environ.get("VIT_PIPELINE_DEBUG", "0") not in ("", "0"):
            raise
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        else:
            # Launchers kill every rank once one exits with an error: rank 0, which tells the user,
            # must be first (it usually found the same mistake at the same moment).
            time.sleep(USER_ERROR_GRACE_S)
        raise SystemExit(EXIT_USER_ERROR) from None
