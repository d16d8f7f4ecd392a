"""A real ``mlflow server`` on loopback: a 2-rank training run (validated every 40 steps, with
an EMA) logs to it under a pipeline's parent run; the server is killed mid-run and started again;
training never stops, and the run ends up with every step and every validation."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import ROOT, deepspeed_cmd, free_port, launch_env, metrics, train_args
from tests.system.jobs import here

pytestmark = pytest.mark.system


def start_server(port: int, store: Path, host: str = "127.0.0.1", wrap=here, allowed_hosts: str | None = None
                 ) -> subprocess.Popen:
    """``mlflow server`` on ``host:port``; ``wrap`` turns a command into one run where the server
    should live (a network namespace), and the health check runs there too."""
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", host, "--port", str(port),
           "--backend-store-uri", f"sqlite:///{store}/server.db", "--artifacts-destination", f"file://{store}/artifacts",
           "--workers", "1", *(["--allowed-hosts", allowed_hosts] if allowed_hosts else [])]
    server = subprocess.Popen(wrap(*cmd), cwd=store, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    health = wrap(sys.executable, "-c", "import sys, urllib.request; "
                  f"sys.exit(urllib.request.urlopen('http://{host}:{port}/health', timeout=2).status != 200)")
    deadline = time.time() + 120
    while time.time() < deadline:
        if subprocess.run(health, capture_output=True).returncode == 0:
            return server
        time.sleep(0.5)
    stop_server(server)
    raise RuntimeError("mlflow server did not start within 120 s")


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGKILL)  # the server and its workers, as a crash would
        server.wait(timeout=30)


def wait_for_steps(run_dir: Path, steps: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= steps:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with {proc.returncode}")
        time.sleep(0.3)
    raise AssertionError(f"no step {steps} within {timeout} s")


def test_training_survives_the_server_going_away_and_catches_up(digits_shards, tmp_path):
    port = free_port()
    store = tmp_path / "server"
    store.mkdir()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(port, store)
    args = train_args(digits_shards, tmp_path, "tracked", "train.total_steps=120", f"run.tracking_uri={uri}",
                      "run.pipeline=system-test", "train.eval_every=40", "train.ema_decay=0.99")
    training = subprocess.Popen(deepspeed_cmd("launch/train.py", 2, *args), cwd=ROOT, env=launch_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        run_dir = tmp_path / "tracked"
        wait_for_steps(run_dir, 5, training)
        stop_server(server)  # the server goes away mid-run
        down_at = max(metrics(run_dir))
        wait_for_steps(run_dir, down_at + 20, training)  # training goes on without it
        server = start_server(port, store)  # and comes back
        output, _ = training.communicate(timeout=300)
        assert training.returncode == 0, output[-4000:]
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("vit-pipeline-demo")
        runs = client.search_runs([experiment.experiment_id])
        stage_runs = [r for r in runs if r.data.tags["stage"] != "pipeline"]
        assert len(stage_runs) == 1, "one run for the job, never one per rank"
        run, parent = stage_runs[0], next(r for r in runs if r.data.tags["stage"] == "pipeline")
        assert run.info.status == parent.info.status == "FINISHED" and len(runs) == 2
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and parent.info.run_name == "system-test"
        assert run.data.tags["stage"] == "pretrain" and run.data.tags["pipeline"] == "system-test"
        assert run.data.params["deepspeed.zero_stage"] == "2"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        assert steps == list(range(1, 121)), "metrics logged while the server was down were caught up"
        for key in ("val/top1", "val/top5", "val/loss", "val/time_s", "val_ema/top1", "val_ema/loss"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [40, 80, 120], key
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "deepspeed.json"}
        assert "MLflow at" in output and "training goes on" in output
    finally:
        if training.poll() is None:
            training.kill()
        stop_server(server)
