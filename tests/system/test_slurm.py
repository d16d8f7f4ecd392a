"""The SLURM scripts under a real controller: sbatch --wait slurm/pretrain.sh, and
slurm/pipeline.sh running pretrain -> fine-tune -> evaluate in order, on a 1-node CPU cluster."""

import json
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import ROOT, metrics, read_log

pytestmark = pytest.mark.system

# The scripts ask for GPUs and several nodes; this cluster has one CPU node.
RESOURCES = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--time=30"]


def demo_overrides(shards, out, steps: int) -> list[str]:
    return [f"run.output_dir={out}", f"run.tracking_uri=sqlite:///{out}/mlflow.db",
            f"data.train_shards={shards}/train.json", f"data.eval_shards={shards}/val.json", "data.num_workers=1",
            f"train.total_steps={steps}", "train.log_every=5", f"train.checkpoint_every={steps}"]


def job_state(cluster_env, job: str) -> dict:
    info = subprocess.run(["scontrol", "show", "job", job], env=cluster_env, capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in info.split() if "=" in field)


def wait_for_end(cluster_env, job: str, deadline: float) -> dict:
    """The job's final state (a requeued job runs again before it ends)."""
    while time.time() < deadline and job_state(cluster_env, job).get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED"):
        time.sleep(2)
    return job_state(cluster_env, job)


def job_env(cluster_env, **extra):
    return dict(cluster_env, PYTHON=sys.executable, VIT_PIPELINE_ROOT=str(ROOT), DS_ACCELERATOR="cpu",
                OMP_NUM_THREADS="1", **extra)


def test_sbatch_pretrain(slurm_cluster, digits_shards, tmp_path):
    (tmp_path / "logs").mkdir()  # sbatch opens --output before the script runs
    result = subprocess.run(
        ["sbatch", "--wait", "--parsable", *RESOURCES, str(ROOT / "slurm/pretrain.sh"),
         str(ROOT / "configs/demo/pretrain.yaml"), *demo_overrides(digits_shards, tmp_path, 10)],
        cwd=tmp_path, env=job_env(slurm_cluster), capture_output=True, text=True, timeout=600)
    job_id = result.stdout.strip().split(";")[0]
    logs = list((tmp_path / "logs").glob(f"vit-pretrain-{job_id}.out"))
    log_text = read_log(logs[0]) if logs else "(no log)"
    assert result.returncode == 0, f"{result.stderr}\n{log_text[-4000:]}"
    state = subprocess.run(["scontrol", "show", "job", job_id], env=slurm_cluster, capture_output=True, text=True).stdout
    assert "JobState=COMPLETED" in state
    assert f"job {job_id}" in log_text and "2 ranks" in log_text
    run_dir = tmp_path / "demo-pretrain"
    assert (run_dir / "checkpoints/step00000010/complete.json").is_file()
    assert json.loads((run_dir / "checkpoints/step00000010/complete.json").read_text())["world_size"] == 2
    assert max(metrics(run_dir)) == 10
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("vit-pipeline-demo").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["slurm_job_id"] == job_id
    assert runs[0].data.tags["pipeline"] == f"slurm-{job_id}"


def test_pipeline_runs_three_stages_in_order(slurm_cluster, digits_shards, tmp_path):
    (tmp_path / "logs").mkdir()
    overrides = demo_overrides(digits_shards, tmp_path, 10)
    overrides += [f"finetune.init_from={tmp_path}/demo-pretrain", f"eval.checkpoint={tmp_path}/demo-finetune"]
    configs = [str(ROOT / f"configs/demo/{name}.yaml") for name in ("pretrain", "finetune", "evaluate")]
    submitted = subprocess.run(
        [str(ROOT / "slurm/pipeline.sh"), *configs, "--", *overrides], cwd=tmp_path,
        env=job_env(slurm_cluster, SBATCH_ARGS=" ".join(RESOURCES), VIT_PIPELINE_ID="ci-pipeline"),
        capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    jobs = submitted.stdout.strip().splitlines()[-1].split()
    assert len(jobs) == 3
    deadline = time.time() + 900
    while time.time() < deadline:
        queue = subprocess.run(["squeue", "-h", "-j", ",".join(jobs)], env=slurm_cluster, capture_output=True, text=True)
        if not queue.stdout.strip():
            break
        time.sleep(2)
    states = {job: job_state(slurm_cluster, job) for job in jobs}
    logs = "\n".join(read_log(p)[-1500:] for p in (tmp_path / "logs").glob("*.out"))
    assert [states[j]["JobState"] for j in jobs] == ["COMPLETED"] * 3, logs
    # In order: each stage started after the one before it ended.
    assert states[jobs[0]]["EndTime"] <= states[jobs[1]]["StartTime"] <= states[jobs[1]]["EndTime"] <= states[jobs[2]]["StartTime"]
    report = json.loads((tmp_path / "demo-evaluate/report.json").read_text())
    assert report["num_samples"] + report["skipped"] == json.loads((digits_shards / "val.json").read_text())["num_samples"]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("vit-pipeline-demo").experiment_id])
    assert sorted(r.data.tags["stage"] for r in runs) == ["evaluate", "finetune", "pretrain"]
    assert {r.data.tags["pipeline"] for r in runs} == {"ci-pipeline"}


def test_pipeline_submits_nothing_when_a_dry_run_fails(slurm_cluster, digits_shards, tmp_path):
    """pipeline.sh dry-runs the three stages at the allocation it would request; one problem and
    no job is submitted."""
    (tmp_path / "logs").mkdir()
    overrides = demo_overrides(digits_shards, tmp_path, 10) + [f"finetune.init_from={tmp_path}/demo-pretrain",
                                                               f"eval.checkpoint={tmp_path}/demo-finetune"]
    configs = [str(ROOT / f"configs/demo/{name}.yaml") for name in ("pretrain", "finetune", "evaluate")]
    before = subprocess.run(["squeue", "-h", "-o", "%i"], env=slurm_cluster, capture_output=True, text=True).stdout
    # 64 images do not split over 3 nodes x 2 ranks: the pretrain and fine-tune dry runs say so.
    resources = " ".join(RESOURCES).replace("--nodes=1", "--nodes=3")
    result = subprocess.run([str(ROOT / "slurm/pipeline.sh"), *configs, "--", *overrides], cwd=tmp_path,
                            env=job_env(slurm_cluster, SBATCH_ARGS=resources), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "dry run of pretrain.sh at 3 node(s) x 2 ranks" in result.stdout
    assert "train.global_batch_size=64 does not split over 6 ranks" in result.stdout
    assert "nothing was submitted" in result.stderr
    after = subprocess.run(["squeue", "-h", "-o", "%i"], env=slurm_cluster, capture_output=True, text=True).stdout
    assert after == before


def test_preempted_evaluation_exits_75_and_is_requeued(slurm_cluster, digits_shards, tmp_path):
    """SIGUSR1 mid-evaluation: every rank stops at the same batch, the job exits 75 and is
    requeued, and the requeued job evaluates everything."""
    (tmp_path / "logs").mkdir()
    trained = demo_overrides(digits_shards, tmp_path, 2)
    train = subprocess.run(["sbatch", "--wait", "--parsable", *RESOURCES, str(ROOT / "slurm/pretrain.sh"),
                            str(ROOT / "configs/demo/pretrain.yaml"), *trained],
                           cwd=tmp_path, env=job_env(slurm_cluster), capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr
    # One image per batch over the training split: long enough to be signalled mid-way.
    overrides = [f"run.output_dir={tmp_path}", f"run.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
                 f"data.eval_shards={digits_shards}/train.json", "data.num_workers=1", "eval.micro_batch_size=1",
                 f"eval.checkpoint={tmp_path}/demo-pretrain", "model.image_size=32"]
    submitted = subprocess.run(["sbatch", "--parsable", *RESOURCES, str(ROOT / "slurm/evaluate.sh"),
                                str(ROOT / "configs/demo/evaluate.yaml"), *overrides],
                               cwd=tmp_path, env=job_env(slurm_cluster), capture_output=True, text=True, timeout=60)
    job = submitted.stdout.strip().split(";")[0]
    log_path = tmp_path / "logs" / f"vit-evaluate-{job}.out"
    deadline = time.time() + 600
    while time.time() < deadline and not (log_path.exists() and "batch/s" in read_log(log_path)):
        time.sleep(0.5)
    assert log_path.exists() and "batch/s" in read_log(log_path), "evaluation did not start"
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm_cluster, check=True)
    final, log_text = wait_for_end(slurm_cluster, job, deadline), read_log(log_path)
    assert final["JobState"] == "COMPLETED" and int(final["Restarts"]) == 1, log_text[-3000:]
    assert "evaluation stopped on SIGUSR1: exiting with 75" in log_text
    assert "preempted (what was worth keeping is saved): requeueing" in log_text and "restart 1" in log_text
    report = json.loads((tmp_path / "demo-evaluate/report.json").read_text())
    assert report["num_samples"] + report["skipped"] == json.loads((digits_shards / "train.json").read_text())["num_samples"]


def test_preempted_job_saves_requeues_and_resumes_its_run(slurm_cluster, digits_shards, tmp_path):
    """SIGUSR1 (what --signal=USR1@600 sends before the time limit) to the job's ranks: they save
    and exit 75, the script requeues the job, and the requeued job resumes the checkpoint and the
    MLflow run to the end."""
    (tmp_path / "logs").mkdir()
    overrides = demo_overrides(digits_shards, tmp_path, 100) + ["train.checkpoint_every=1000"]
    submitted = subprocess.run(["sbatch", "--parsable", *RESOURCES, str(ROOT / "slurm/pretrain.sh"),
                                str(ROOT / "configs/demo/pretrain.yaml"), *overrides],
                               cwd=tmp_path, env=job_env(slurm_cluster), capture_output=True, text=True, timeout=60)
    job = submitted.stdout.strip().split(";")[0]
    run_dir = tmp_path / "demo-pretrain"
    deadline = time.time() + 600
    while time.time() < deadline and not ((run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= 2):
        time.sleep(1)
    assert (run_dir / "metrics.jsonl").exists(), "training did not start"
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm_cluster, check=True)
    final = wait_for_end(slurm_cluster, job, deadline)
    log_text = read_log(tmp_path / "logs" / f"vit-pretrain-{job}.out")
    assert final["JobState"] == "COMPLETED" and int(final["Restarts"]) == 1, log_text[-3000:]
    assert "preempted (what was worth keeping is saved): requeueing" in log_text and "restart 1" in log_text
    assert "resumed from" in log_text
    records = metrics(run_dir)
    assert max(records) == 100 and (run_dir / "checkpoints/step00000100/complete.json").is_file()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("vit-pipeline-demo").experiment_id])
    assert len(runs) == 1, "the requeued job continues its MLflow run"
    steps = sorted({m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")})
    assert steps == list(range(5, 101, 5)) and runs[0].info.status == "FINISHED"
