"""What the SLURM system tests share: demo overrides, the job environment, job states."""

import subprocess
import sys
import time

from tests.helpers import ROOT


def demo_overrides(shards, out, steps: int, tracking_uri: str | None = None) -> list[str]:
    return [f"run.output_dir={out}", f"run.tracking_uri={tracking_uri or f'sqlite:///{out}/mlflow.db'}",
            f"data.train_shards={shards}/train.json", f"data.eval_shards={shards}/val.json", "data.num_workers=1",
            f"train.total_steps={steps}", "train.log_every=5", f"train.checkpoint_every={steps}"]


def job_env(cluster_env, **extra):
    return dict(cluster_env, PYTHON=sys.executable, VIT_PIPELINE_ROOT=str(ROOT), DS_ACCELERATOR="cpu", **extra)


def here(*cmd: str) -> list[str]:
    return list(cmd)


def job_state(cluster_env, job: str, client=here) -> dict:
    """``scontrol show job`` as a dict; ``client`` turns a command into one run where the controller is."""
    info = subprocess.run(client("scontrol", "show", "job", job), env=cluster_env, capture_output=True,
                          text=True).stdout
    return dict(field.split("=", 1) for field in info.split() if "=" in field)


def wait_for_end(cluster_env, job: str, deadline: float, client=here) -> dict:
    """The job's final state (a requeued job runs again before it ends). Slurm holds a requeued
    job for about two minutes (``Reason=BeginTime``), then starts it at its next scheduling pass;
    that wait tests nothing of ours, so a held job is made eligible after 3 s. Not at once: a
    start in the second of the requeue finds the killed instance's credential revoked, and slurmctld
    fails the job ("Killing non-startable batch job: Job credential revoked", seen in CI)."""
    held_since = None
    while (state := job_state(cluster_env, job, client)).get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED") \
            and time.time() < deadline:
        if state.get("JobState") == "PENDING" and state.get("Reason") == "BeginTime" and int(state.get("Restarts", 0)):
            held_since = held_since or time.time()
            if time.time() - held_since >= 3:
                subprocess.run(client("scontrol", "update", f"JobId={job}", "StartTime=now"), env=cluster_env,
                               capture_output=True)
        time.sleep(1)
    return job_state(cluster_env, job, client)


def submit(cluster_env, cwd, resources: list[str], stage: str, config: str, overrides: list[str]):
    """``sbatch slurm/STAGE.sh CONFIG OVERRIDES`` without waiting: the job id and its log's path."""
    submitted = subprocess.run(["sbatch", "--parsable", *resources, str(ROOT / f"slurm/{stage}.sh"),
                                str(ROOT / config), *overrides],
                               cwd=cwd, env=job_env(cluster_env), capture_output=True, text=True, timeout=60)
    job = submitted.stdout.strip().split(";")[0]
    return job, cwd / "logs" / f"vit-{stage}-{job}.out"


def wait_for_log(path, text: str, deadline: float, poll: float) -> bool:
    """Whether ``text`` appeared in the log at ``path`` before ``deadline``."""
    from tests.helpers import read_log

    while time.time() < deadline and not (path.exists() and text in read_log(path)):
        time.sleep(poll)
    return path.exists() and text in read_log(path)
