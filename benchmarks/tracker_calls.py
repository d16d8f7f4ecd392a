#!/usr/bin/env python
"""What MLflow tracking costs the training thread: the time of each Tracker call where training
makes it (a step's metrics, a checkpoint's LoggedModel), and the time the tracker's own thread
takes to deliver it, against a local sqlite store and against a server that does not answer.
The training thread only enqueues; delivery happens beside it.

    python benchmarks/tracker_calls.py [--checkpoints 20] [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.tracking import Tracker


def measure(uri: str, work: Path, steps: int, checkpoints: int, drain_s: float) -> dict:
    tracker = Tracker(uri=uri, experiment="benchmark-tracker", run_name="calls", max_backoff_s=0.5,
                      tags={"stage": "pretrain", "pipeline": "bench", "git_commit": "none", "slurm_job_id": "none"})
    tracker.model_dataset = {"name": "bench/val", "digest": "0" * 10}
    tracker.wait_started(timeout=30 if uri.startswith("sqlite") else 2)
    metric_us, checkpoint_us = [], []
    every = max(steps // checkpoints, 1)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        t = time.perf_counter()
        tracker.log_metrics({"loss": 1.0 / step, "lr": 1e-3, "images_per_s": 1000.0}, step=step)
        metric_us.append((time.perf_counter() - t) * 1e6)
        if step % every == 0:
            kept = [work / f"step{s:08d}" for s in range(max(step - every, every), step + 1, every)]
            t = time.perf_counter()
            tracker.log_checkpoint(step, work / f"step{step:08d}", kept)
            tracker.log_metrics({"val/top1": step / steps}, step=step)
            checkpoint_us.append((time.perf_counter() - t) * 1e6)
    calls_s = time.perf_counter() - start
    tracker.close(timeout=drain_s)
    delivered_s = time.perf_counter() - start
    return {"metrics_call_us": statistics.median(metric_us), "checkpoint_call_us": statistics.median(checkpoint_us),
            "checkpoint_call_max_us": max(checkpoint_us), "calls_s": calls_s, "delivered_s": delivered_s,
            "undelivered": tracker.undelivered}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="training steps logged (one metrics record each)")
    parser.add_argument("--checkpoints", type=int, default=20, help="checkpoints logged as LoggedModels")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = {"sqlite": measure(f"sqlite:///{work}/mlflow.db", work, args.steps, args.checkpoints, 300),
                   "unreachable": measure("http://127.0.0.1:9", work, args.steps, args.checkpoints, 1)}
    print(f"{args.steps} steps, {args.checkpoints} checkpoints; median time of the call on the training thread")
    print(f"{'store':<12} {'metrics call':>13} {'checkpoint call':>16} {'(max)':>9} {'all calls':>10} "
          f"{'delivered after':>16} {'undelivered':>12}")
    for name, r in results.items():
        print(f"{name:<12} {r['metrics_call_us']:>10.1f} us {r['checkpoint_call_us']:>13.1f} us "
              f"{r['checkpoint_call_max_us']:>6.0f} us {r['calls_s']:>8.3f} s {r['delivered_s']:>14.2f} s "
              f"{r['undelivered']:>12}")
    print(json.dumps({"steps": args.steps, "checkpoints": args.checkpoints, **{
        f"{store}_{key}": round(value, 3) for store, r in results.items() for key, value in r.items()}}))


if __name__ == "__main__":
    main()
