"""Two SLURM nodes, each its own network, UTS and mount namespace (hostname, address, /etc/hosts,
/dev/shm, slurmd), under one controller with task/affinity, tracking to a real mlflow server in
the controller's namespace (tests/system/twonode.py). What a one-node run cannot show: global
versus local ranks, rendezvous on the first node's address, per-node shared memory, the CPUs srun
hands each rank, and preemption across nodes."""

import json
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import BIN, ROOT, deepspeed_cmd, free_port, launch_env, metrics, read_log
from tests.system.conftest import _ensure_slurm_installed, _start_munge
from tests.system.jobs import demo_overrides, job_env, job_state, wait_for_end
from tests.system.test_mlflow_server import start_server, stop_server
from tests.system.twonode import HEAD, NODES, TwoNodeCluster, check_can_namespace

pytestmark = pytest.mark.system

STEPS = 30  # the preempted pretraining run
MLFLOW_PORT = 5000  # in the head's own network namespace: no clash with anything on the host


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = _ensure_slurm_installed() or check_can_namespace()
    if reason:
        pytest.fail(f"the two-node cluster cannot be built here: {reason}")
    _start_munge()
    cluster = TwoNodeCluster(tmp_path_factory.mktemp("twonode"))
    server = None
    try:
        cluster.create_network()
        cluster.start_slurm()
        store = cluster.dir / "mlflow"
        store.mkdir()
        server = start_server(MLFLOW_PORT, store, host=cluster.addr[HEAD], wrap=lambda *cmd: cluster.on(HEAD, *cmd),
                              allowed_hosts=f"{HEAD},{HEAD}:{MLFLOW_PORT}")
        cluster.tracking_uri = f"http://{HEAD}:{MLFLOW_PORT}"  # the name the nodes resolve, as on a cluster
        cluster.store = MlflowClient(f"sqlite:///{store}/server.db")
        yield cluster
    finally:
        if server is not None:
            stop_server(server)
        cluster.stop()


def submit(cluster, tmp_path, script: str, resources: list[str], *args: str) -> str:
    result = subprocess.run(cluster.client("sbatch", "--parsable", *resources, str(ROOT / "slurm" / script), *args),
                            cwd=tmp_path, env=job_env(cluster.env), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def runs_of(cluster, pipeline: str, stage_runs: bool = True):
    """The pipeline's stage runs (or only its parent run, with ``stage_runs=False``)."""
    experiment = cluster.store.get_experiment_by_name("vit-pipeline-demo")
    return cluster.store.search_runs([experiment.experiment_id], f"tags.pipeline = '{pipeline}' and "
                                     f"tags.stage {'!=' if stage_runs else '='} 'pipeline'")


@pytest.fixture(scope="module")
def preempted_pretrain(cluster, digits_shards, tmp_path_factory):
    """sbatch --nodes=2 --ntasks-per-node=2 slurm/pretrain.sh: 4 ranks, SIGUSR1 mid-run to the
    job (scancel --signal=USR1: every rank on both nodes), requeue, resume, run to the end."""
    out = tmp_path_factory.mktemp("pretrain2n")
    (out / "logs").mkdir()
    overrides = demo_overrides(digits_shards, out, STEPS, cluster.tracking_uri)
    overrides += ["train.log_every=1", "train.checkpoint_every=1000", "run.pipeline=two-node",
                  "run.system_metrics_interval=1"]
    job = submit(cluster, out, "pretrain.sh", ["--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1",
                                               "--gpus-per-node=0", "--time=30"],
                 str(ROOT / "configs/demo/pretrain.yaml"), *overrides)
    run_dir = out / "demo-pretrain"
    deadline = time.time() + 600
    while time.time() < deadline and not ((run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= 3):
        state = job_state(cluster.env, job, cluster.client)
        assert state.get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), state
        time.sleep(1)
    log_path = out / "logs" / f"vit-pretrain-{job}.out"
    assert (run_dir / "metrics.jsonl").exists(), read_log(log_path)[-3000:] if log_path.exists() else "no log"
    placements_before = json.loads((run_dir / "ranks.json").read_text())
    subprocess.run(cluster.client("scancel", "--signal=USR1", job), env=cluster.env, check=True)
    final = wait_for_end(cluster.env, job, deadline, cluster.client)
    return dict(job=job, out=out, run_dir=run_dir, final=final, log=read_log(log_path),
                placements=[placements_before, json.loads((run_dir / "ranks.json").read_text())])


def test_ranks_are_placed_across_both_nodes(cluster, preempted_pretrain):
    """Rank r on node r // 2 with LOCAL_RANK r % 2; every rank rendezvoused on the first node's
    address; task/affinity gave each rank its own core (--cpus-per-task=1)."""
    job = preempted_pretrain
    assert job["final"]["JobState"] == "COMPLETED", job["log"][-4000:]
    assert "4 ranks on 2 host(s) (vnode1: 0-1, vnode2: 2-3)" in job["log"]
    for placements in job["placements"]:  # the first start and the requeued one
        assert [(p["host"], p["local_rank"]) for p in placements] == [(NODES[r // 2], r % 2) for r in range(4)]
        assert {p["master"].split(":")[0] for p in placements} == {NODES[0]}
        assert {p["master_ip"] for p in placements} == {cluster.addr[NODES[0]]}
        for node in NODES:
            cores = [p["cpus"] for p in placements if p["host"] == node]
            assert all(len(c) == 1 for c in cores) and cores[0] != cores[1], cores
        assert {p["threads"] for p in placements} == {1}


def test_signal_saves_every_rank_at_one_step_and_the_job_resumes(cluster, preempted_pretrain):
    job = preempted_pretrain
    log, run_dir = job["log"], job["run_dir"]
    assert job["final"]["JobState"] == "COMPLETED" and int(job["final"]["Restarts"]) == 1, log[-4000:]
    assert "preempted (what was worth keeping is saved): requeueing" in log and "restart 1" in log
    saved = [line for line in log.splitlines() if "exiting with 75 for a requeue" in line]
    steps = {line.split("saved step ")[1].split()[0] for line in saved}
    assert len(saved) == 4 and len(steps) == 1, saved  # all four ranks, both nodes, one step
    step = int(steps.pop())
    assert 3 <= step < STEPS and f"resumed from {run_dir}/checkpoints/step{step:08d}" in log
    checkpoint = run_dir / f"checkpoints/step{step:08d}"
    shards = sorted(p.name for p in checkpoint.rglob("*optim_states.pt"))
    assert len(shards) == 4, shards  # every rank's ZeRO partition of the optimizer, saved at that step
    assert json.loads((checkpoint / "complete.json").read_text())["world_size"] == 4
    assert max(metrics(run_dir)) == STEPS
    runs = runs_of(cluster, "two-node")
    assert len(runs) == 1, "the requeued job continues its MLflow run on the server"
    history = cluster.store.get_metric_history(runs[0].info.run_id, "loss")
    assert sorted({m.step for m in history}) == list(range(1, STEPS + 1))
    assert runs[0].info.status == "FINISHED"
    (parent,) = runs_of(cluster, "two-node", stage_runs=False)
    assert runs[0].data.tags["mlflow.parentRunId"] == parent.info.run_id and parent.info.status == "FINISHED"
    # system metrics from local rank 0 of each node, apart by hostname
    logged = {k.split("/")[1] for k in runs[0].data.metrics if k.startswith("system/")
              and k.endswith("/cpu_utilization_percentage")}
    assert logged == set(NODES), logged


def test_the_tracking_server_is_reached_from_both_nodes(cluster, preempted_pretrain):
    """By the name each node resolves in its own /etc/hosts (rank 0, the only writer, sits on
    the first node; a requeued job may start anywhere)."""
    for node in NODES:
        probe = subprocess.run(cluster.on(node, sys.executable, "-c", "import socket, urllib.request; print("
                                          f"socket.gethostname(), "
                                          f"urllib.request.urlopen('{cluster.tracking_uri}/health')"
                                          ".status)"), capture_output=True, text=True, timeout=60)
        assert probe.stdout.split() == [node, "200"], probe.stderr
    (run,) = runs_of(cluster, "two-node")
    uploaded = {p.name for p in (cluster.dir / "mlflow/artifacts").glob(f"*/{run.info.run_id}/artifacts/*")}
    assert {"config.yaml", "ranks.json"} <= uploaded, uploaded  # through the server, from the first node


def test_loss_matches_a_one_node_run(preempted_pretrain, digits_shards, tmp_path):
    """The same config on one node, 4 ranks, uninterrupted (deepspeed launcher): the two-node
    run, preempted and resumed, has the same loss at every step (equal to the last bit here)."""
    out = preempted_pretrain["out"]
    overrides = demo_overrides(digits_shards, tmp_path, STEPS) + ["train.log_every=1", "train.checkpoint_every=1000"]
    result = subprocess.run(deepspeed_cmd("launch/train.py", 4, "--config", str(ROOT / "configs/demo/pretrain.yaml"),
                                          *overrides), cwd=ROOT, env=launch_env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    one_node, two_nodes = metrics(tmp_path / "demo-pretrain"), metrics(out / "demo-pretrain")
    assert sorted(one_node) == sorted(two_nodes) == list(range(1, STEPS + 1))
    for step in one_node:
        assert two_nodes[step]["loss"] == pytest.approx(one_node[step]["loss"], rel=1e-6), step


def test_pipeline_runs_three_stages_across_two_nodes(cluster, digits_shards, tmp_path):
    """slurm/pipeline.sh: pretrain -> fine-tune -> evaluate, each on 2 nodes x 1 rank with 2 CPUs
    a rank. srun hands --cpus-per-task on (Slurm >= 22.05 does not by itself): each rank's
    affinity holds 2 cores."""
    (tmp_path / "logs").mkdir()
    overrides = demo_overrides(digits_shards, tmp_path, 10, cluster.tracking_uri)
    overrides += [f"finetune.init_from={tmp_path}/demo-pretrain", f"eval.checkpoint={tmp_path}/demo-finetune"]
    configs = [str(ROOT / f"configs/demo/{name}.yaml") for name in ("pretrain", "finetune", "evaluate")]
    resources = "--nodes=2 --ntasks-per-node=1 --cpus-per-task=2 --gpus-per-node=0 --time=30"
    submitted = subprocess.run(cluster.client(str(ROOT / "slurm/pipeline.sh"), *configs, "--", *overrides),
                               cwd=tmp_path, env=job_env(cluster.env, SBATCH_ARGS=resources,
                                                         VIT_PIPELINE_ID="two-node-pipeline"),
                               capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert "dry run of pretrain.sh at 2 node(s) x 1 ranks" in submitted.stdout
    jobs = submitted.stdout.strip().splitlines()[-1].split()
    deadline = time.time() + 900
    states = {}
    for job in jobs:
        states[job] = wait_for_end(cluster.env, job, deadline, cluster.client)
    logs = "\n".join(read_log(p)[-1500:] for p in (tmp_path / "logs").glob("*.out"))
    assert [states[j]["JobState"] for j in jobs] == ["COMPLETED"] * 3, logs
    assert [states[j]["NodeList"] for j in jobs] == ["vnode[1-2]"] * 3
    assert states[jobs[0]]["EndTime"] <= states[jobs[1]]["StartTime"] <= states[jobs[1]]["EndTime"] \
        <= states[jobs[2]]["StartTime"]
    for stage in ("pretrain", "finetune"):
        placements = json.loads((tmp_path / f"demo-{stage}/ranks.json").read_text())
        assert [p["host"] for p in placements] == list(NODES)
        assert [len(p["cpus"]) for p in placements] == [2, 2], placements
        assert [p["threads"] for p in placements] == [1, 1]  # 2 cores less data.num_workers=1
    report = json.loads((tmp_path / "demo-evaluate/report.json").read_text())
    val = json.loads((digits_shards / "val.json").read_text())
    assert report["num_samples"] + report["skipped"] == val["num_samples"]
    runs = runs_of(cluster, "two-node-pipeline")
    assert sorted(r.data.tags["stage"] for r in runs) == ["evaluate", "finetune", "pretrain"]
    (parent,) = runs_of(cluster, "two-node-pipeline", stage_runs=False)
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}, "one run tree, three jobs"


def test_torchrun_across_two_nodes(cluster, digits_shards, tmp_path):
    """Without SLURM: one torchrun per node namespace, c10d rendezvous on the first node."""
    port = free_port()
    args = ["--config", str(ROOT / "configs/demo/pretrain.yaml"),
            *demo_overrides(digits_shards, tmp_path, 3), "train.log_every=1"]
    env = launch_env()
    env.pop("OMP_NUM_THREADS")
    procs = [subprocess.Popen(cluster.on(node, str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "2",
                                         "--rdzv-backend", "c10d",
                                         "--rdzv-endpoint", f"{NODES[0]}:{port}", "--rdzv-id", "two-node",
                                         str(ROOT / "launch/train.py"), *args),
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in NODES]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=600)[0])
        finally:
            proc.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    placements = json.loads((tmp_path / "demo-pretrain/ranks.json").read_text())
    assert sorted((p["host"], p["local_rank"]) for p in placements) == [(n, r) for n in NODES for r in (0, 1)]
    assert max(metrics(tmp_path / "demo-pretrain")) == 3
