"""The SLURM scripts under a real controller on a 1-node CPU cluster: sbatch --wait
slurm/pretrain.sh, pipeline.sh refusing a shape its dry run rejects, a preempted evaluation.
The pipeline and a preempted pretraining run are tested across two nodes
(test_slurm_multinode.py)."""

import json
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import ROOT, metrics, read_log
from tests.system.jobs import demo_overrides, job_env, submit, wait_for_end, wait_for_log

pytestmark = pytest.mark.system

# The scripts ask for GPUs and several nodes; this cluster has one CPU node.
RESOURCES = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--time=30"]


@pytest.fixture(scope="module")
def sbatch_pretrain(slurm_cluster, digits_shards, tmp_path_factory):
    """``sbatch --wait slurm/pretrain.sh``, 10 steps: the job's result and its folder (the
    preempted evaluation evaluates its checkpoint)."""
    out = tmp_path_factory.mktemp("sbatch-pretrain")
    (out / "logs").mkdir()  # sbatch opens --output before the script runs
    result = subprocess.run(
        ["sbatch", "--wait", "--parsable", *RESOURCES, str(ROOT / "slurm/pretrain.sh"),
         str(ROOT / "configs/demo/pretrain.yaml"), *demo_overrides(digits_shards, out, 10)],
        cwd=out, env=job_env(slurm_cluster), capture_output=True, text=True, timeout=600)
    return result, out


def test_sbatch_pretrain(slurm_cluster, sbatch_pretrain):
    result, out = sbatch_pretrain
    job_id = result.stdout.strip().split(";")[0]
    logs = list((out / "logs").glob(f"vit-pretrain-{job_id}.out"))
    log_text = read_log(logs[0]) if logs else "(no log)"
    assert result.returncode == 0, f"{result.stderr}\n{log_text[-4000:]}"
    state = subprocess.run(["scontrol", "show", "job", job_id], env=slurm_cluster, capture_output=True,
                           text=True).stdout
    assert "JobState=COMPLETED" in state
    assert f"job {job_id}" in log_text and "2 ranks" in log_text
    run_dir = out / "demo-pretrain"
    assert (run_dir / "checkpoints/step00000010/complete.json").is_file()
    assert json.loads((run_dir / "checkpoints/step00000010/complete.json").read_text())["world_size"] == 2
    assert max(metrics(run_dir)) == 10
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("vit-pipeline-demo").experiment_id],
                              "tags.stage = 'pretrain'")
    assert len(runs) == 1 and runs[0].data.tags["slurm_job_id"] == job_id
    assert runs[0].data.tags["pipeline"] == f"slurm-{job_id}"  # a job is a pipeline of one stage: nested
    assert client.get_run(runs[0].data.tags["mlflow.parentRunId"]).data.tags["stage"] == "pipeline"


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
    distill = ["--distill", str(ROOT / "configs/demo/distill.yaml")]  # a fourth stage, its teacher the fine-tune
    result = subprocess.run([str(ROOT / "slurm/pipeline.sh"), *distill, *configs, "--", *overrides], cwd=tmp_path,
                            env=job_env(slurm_cluster, SBATCH_ARGS=resources), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "dry run of pretrain.sh at 3 node(s) x 2 ranks" in result.stdout
    assert "train.global_batch_size=64 does not split over 6 ranks" in result.stdout
    assert "dry run: " + str(ROOT / "configs/demo/distill.yaml") in result.stdout
    assert f"teacher     {tmp_path}/demo-finetune (written by the earlier stage" in result.stdout
    assert "nothing was submitted" in result.stderr
    after = subprocess.run(["squeue", "-h", "-o", "%i"], env=slurm_cluster, capture_output=True, text=True).stdout
    assert after == before


def test_preempted_evaluation_exits_75_and_is_requeued(slurm_cluster, sbatch_pretrain, digits_shards, tmp_path):
    """SIGUSR1 mid-evaluation: every rank stops at the same batch, the job exits 75 and is
    requeued, and the requeued job evaluates everything."""
    (tmp_path / "logs").mkdir()
    train, trained = sbatch_pretrain
    assert train.returncode == 0, train.stderr
    # One image per batch (180 a rank): long enough to be signalled mid-way.
    overrides = [f"run.output_dir={tmp_path}", f"run.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
                 f"data.eval_shards={digits_shards}/val.json", "data.num_workers=1", "eval.micro_batch_size=1",
                 f"eval.checkpoint={trained}/demo-pretrain", "model.image_size=32"]
    job, log_path = submit(slurm_cluster, tmp_path, RESOURCES, "evaluate", "configs/demo/evaluate.yaml", overrides)
    deadline = time.time() + 600
    assert wait_for_log(log_path, "batch/s", deadline, poll=0.5), "evaluation did not start"
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm_cluster, check=True)
    final, log_text = wait_for_end(slurm_cluster, job, deadline), read_log(log_path)
    controller_log = (Path(slurm_cluster["SLURM_CONF"]).parent / "slurmctld.log").read_text()
    assert final["JobState"] == "COMPLETED" and int(final["Restarts"]) == 1, \
        f"{final}\n{log_text[-3000:]}\nslurmctld.log:\n{controller_log[-3000:]}"
    assert "evaluation stopped on SIGUSR1: exiting with 75" in log_text
    assert "preempted (what was worth keeping is saved): requeueing" in log_text and "restart 1" in log_text
    report = json.loads((tmp_path / "demo-evaluate/report.json").read_text())
    val = json.loads((digits_shards / "val.json").read_text())
    assert report["num_samples"] + report["skipped"] == val["num_samples"]


def test_a_short_job_trains_before_its_signal(slurm_cluster, digits_shards, tmp_path):
    """sbatch --time=1: the signal comes 6 s before the limit (10% of it), not at once as a fixed
    USR1@600 would, so the job trains well past step 1 before its first save, exits 75 and is
    requeued (then cancelled here)."""
    (tmp_path / "logs").mkdir()
    overrides = demo_overrides(digits_shards, tmp_path, 100000) + ["train.checkpoint_every=100000"]
    resources = [r if not r.startswith("--time") else "--time=1" for r in RESOURCES]
    job, log_path = submit(slurm_cluster, tmp_path, resources, "pretrain", "configs/demo/pretrain.yaml", overrides)
    wait_for_log(log_path, "requeueing job", time.time() + 300, poll=1)
    subprocess.run(["scancel", job], env=slurm_cluster, check=False)
    log_text = read_log(log_path) if log_path.exists() else "(no log)"
    assert "requeueing job" in log_text, log_text[-3000:]
    assert "time limit 60 s" in log_text and "6 s before it" in log_text, log_text[-3000:]
    saved = sorted((tmp_path / "demo-pretrain/checkpoints").glob("step*"))
    assert saved, log_text[-3000:]
    assert int(saved[0].name.removeprefix("step")) > 1, f"first save at {saved[0].name}"
