"""Helpers for multi-rank runs on the CPU through the ``deepspeed`` launcher."""

import json
import os
import subprocess
import sys
from pathlib import Path

from pipeline.train.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def launch_env(**extra) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def deepspeed_cmd(script: str, ranks: int, *args: str) -> list[str]:
    return [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()),
            str(ROOT / script), *args]


def run_deepspeed(script: str, ranks: int, *args: str, timeout: int = 600, check: bool = True):
    result = subprocess.run(deepspeed_cmd(script, ranks, *args), cwd=ROOT, env=launch_env(), capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def read_log(path: Path) -> str:
    """A file another process may be writing: a multi-byte character cut at the end is replaced, not an error."""
    return path.read_bytes().decode("utf-8", errors="replace")


def metrics(run_dir: Path, validation: bool = False) -> dict[int, dict]:
    """step -> the last training record of that step, or with ``validation`` the validation
    record (``val/*``) of that step (a line still being written is left out)."""

    def is_validation(record: dict) -> bool:
        return any(key.startswith("val/") for key in record)

    text = read_log(run_dir / "metrics.jsonl")
    lines = text.splitlines()[:text.count("\n")]
    return {record["step"]: record for record in map(json.loads, lines) if is_validation(record) == validation}


def train_args(shards: Path, out: Path, name: str, *extra: str) -> list[str]:
    """A small, fast training run on the digits: 2 micro-batches of 16 per rank per step."""
    return ["--config", str(ROOT / "configs/demo/pretrain.yaml"),
            f"run.output_dir={out}", f"run.name={name}", f"run.tracking_uri=sqlite:///{out}/mlflow.db",
            f"data.train_shards={shards}/train.json", f"data.eval_shards={shards}/val.json",
            "data.num_workers=1", "data.shuffle_buffer=100", "train.global_batch_size=64",
            "train.micro_batch_size=16", "train.total_steps=8", "train.log_every=1", "train.checkpoint_every=100",
            *extra]
