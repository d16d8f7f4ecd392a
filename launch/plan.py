#!/usr/bin/env python
"""Size a job before queueing it: memory per GPU for each ZeRO stage, the recommended stage and
micro-batch, step time, wall-clock, decode cores and communication, for the run plan the dry run
and the run resolve. Prints a table, then one JSON line.

    python launch/plan.py --config vit_h14.yaml --nodes 8 --gpus-per-node 8
    python launch/plan.py --config vit_h14_ft448.yaml --nodes 4 --gpus-per-node 8 --gpu a100 --set hfu=0.4
    python launch/plan.py --config vit_l16_distill.yaml --after vit_h14_ft448.yaml   # with its teacher
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import ConfigError, load_config, parse_scalar
from pipeline.plan import GPUS, Assumptions, format_plan, plan
from pipeline.train.run_plan import JobShape, earlier_runs, resolve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a config path, or a name under configs/")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.num_classes=1000")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    parser.add_argument("--after", action="append", default=[], metavar="CONFIG",
                        help="config of an earlier stage whose run directory this one starts from or distills "
                             "(a teacher not yet trained is sized from its config)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help=f"override an assumption: {', '.join(f.name for f in dataclasses.fields(Assumptions))}")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        earlier = earlier_runs(args.after, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    assume = Assumptions(gpu=args.gpu)
    names = {f.name for f in dataclasses.fields(Assumptions)}
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in names:
            parser.error(f"--set {item}: unknown assumption '{name}'; known: {', '.join(sorted(names))}")
        setattr(assume, name, parse_scalar(value))
    run_plan = resolve(config, JobShape(args.nodes, args.gpus_per_node), "train", check_files=False, earlier=earlier)
    for problem in run_plan.problems:  # sized all the same; the dry run refuses these
        print(f"note: {problem}", file=sys.stderr)
    result = plan(run_plan, assume)
    print(format_plan(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
