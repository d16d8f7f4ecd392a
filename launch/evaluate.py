#!/usr/bin/env python
"""Evaluate a checkpoint: top-1, top-5, loss, per-class accuracy, confusion matrix, ECE.

    deepspeed --num_gpus 8 launch/evaluate.py --config vit_h14_eval.yaml
    deepspeed --num_gpus 2 launch/evaluate.py --config configs/demo/evaluate.yaml --checkpoint runs/demo/demo-finetune
    srun python launch/evaluate.py --config vit_l16_eval.yaml eval.micro_batch_size=128
    python launch/evaluate.py --config vit_h14_eval.yaml --dry-run --nodes 4 --gpus-per-node 8

--checkpoint (or eval.checkpoint) is a run directory, a checkpoint directory of any ZeRO stage
and world size, or a .safetensors file; a resolution other than the checkpoint's is resampled.
Writes RUN_DIR/report.json and an MLflow run tagged stage=evaluate. Overrides are dotted keys,
anywhere on the command line. Exit status: 0 done, 75 stopped on SIGUSR1/SIGTERM (requeue me;
evaluation restarts), 2 the user's mistake (one "error:" line), 1 failure.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.cli import stage_parser, start_stage, user_errors


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("--checkpoint", help="what to evaluate (default: eval.checkpoint)")
    args = parser.parse_intermixed_args(argv)
    if args.dry_run:
        from pipeline.dryrun import main as dry_run

        return dry_run(args, stage="evaluate")
    with user_errors(args.debug):
        env, config = start_stage(args, check_world_size=False)

        import torch.distributed as dist

        from pipeline.evaluate import evaluate
        from pipeline.train.evaluation import Preempted
        from pipeline.train import signals
        from pipeline.train.distributed import init_process_group

        init_process_group(env)
        try:
            report = evaluate(config, env, args.checkpoint)
            if env.is_main:
                print(f"top-1 {report['top1']:.4f}  top-5 {report['top5']:.4f}  loss {report['loss']:.4f}  "
                      f"ECE {report['ece']:.4f}  on {report['num_samples']} images ({report['skipped']} unreadable) "
                      f"at {report['image_size']} px -> {config.run.run_dir / 'report.json'}")
            dist.barrier()  # leave together: the others wait while rank 0 writes the report and MLflow run
        except Preempted as e:
            print(f"{e}: exiting with {signals.EXIT_PREEMPTED} for a requeue (evaluation restarts)", file=sys.stderr)
            if env.is_main:
                signals.mark_preempted("evaluation")
            return signals.EXIT_PREEMPTED
        finally:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
