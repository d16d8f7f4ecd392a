"""A real ``mlflow server`` on loopback: a 2-rank training run (validated and checkpointed every
40 steps, with an EMA) logs to it under a pipeline's parent run; the server is killed mid-run and
started again; training never stops, and the run ends up with every step, every validation and
a LoggedModel per checkpoint. The evaluation stage then registers its model there, which
``mlflow.pyfunc`` loads and ``mlflow models serve`` serves, predicting the evaluation's classes."""

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import ROOT, deepspeed_cmd, free_port, launch_env, metrics, run_deepspeed, train_args
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


@pytest.fixture(scope="module")
def tracked(digits_shards, tmp_path_factory):
    """One server for the module: a training run that loses it mid-run, checkpointing every 40
    steps (2 kept), then the evaluation stage registering its model there."""
    tmp_path = tmp_path_factory.mktemp("tracked")
    port = free_port()
    store = tmp_path / "server"
    store.mkdir()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(port, store)
    args = train_args(digits_shards, tmp_path, "tracked", "train.total_steps=120", f"run.tracking_uri={uri}",
                      "run.pipeline=system-test", "train.eval_every=40", "train.ema_decay=0.99",
                      "train.checkpoint_every=40", "train.keep_checkpoints=2")
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
        evaluation = run_deepspeed("launch/evaluate.py", 2, "--config", str(ROOT / "configs/demo/evaluate.yaml"),
                                   "--checkpoint", str(run_dir), f"run.output_dir={tmp_path}", "run.name=eval",
                                   f"run.tracking_uri={uri}", f"data.eval_shards={digits_shards}/val.json",
                                   "data.num_workers=1", "model.image_size=8", "run.pipeline=system-test",
                                   # ZeRO-3 swaps nn.Linear's fused addmm for matmul + add, which rounds
                                   # differently in bf16; the model served is a plain module, so the
                                   # image-by-image comparison below evaluates it as one
                                   "deepspeed.zero_stage=2", f"eval.register_model={MODEL}")
        yield {"uri": uri, "client": MlflowClient(uri), "output": output, "run_dir": run_dir, "tmp": tmp_path,
               "report": json.loads((tmp_path / "eval/report.json").read_text()), "shards": digits_shards,
               "evaluate_log": evaluation.stdout + evaluation.stderr}
    finally:
        if training.poll() is None:
            training.kill()
        stop_server(server)


MODEL = "system-vit"


def stage_run(tracked, stage: str):
    client = tracked["client"]
    experiment = client.get_experiment_by_name("vit-pipeline-demo")
    return next(r for r in client.search_runs([experiment.experiment_id]) if r.data.tags["stage"] == stage)


def test_training_survives_the_server_going_away_and_catches_up(tracked):
    client, output = tracked["client"], tracked["output"]
    experiment = client.get_experiment_by_name("vit-pipeline-demo")
    runs = client.search_runs([experiment.experiment_id])
    stage_runs = [r for r in runs if r.data.tags["stage"] == "pretrain"]
    assert len(stage_runs) == 1, "one run for the job, never one per rank"
    run, parent = stage_runs[0], next(r for r in runs if r.data.tags["stage"] == "pipeline")
    assert run.info.status == parent.info.status == "FINISHED" and len(runs) == 3  # and the evaluation
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and parent.info.run_name == "system-test"
    assert run.data.tags["stage"] == "pretrain" and run.data.tags["pipeline"] == "system-test"
    assert run.data.params["deepspeed.zero_stage"] == "2"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert steps == list(range(1, 121)), "metrics logged while the server was down were caught up"
    for key in ("val/top1", "val/top5", "val/loss", "val/time_s", "val_ema/top1", "val_ema/loss"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [40, 80, 120], key
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "deepspeed.json"}
    assert "MLflow at" in output and "training goes on" in output


def test_each_kept_checkpoint_is_a_logged_model_with_its_validation(tracked):
    client, run = tracked["client"], stage_run(tracked, "pretrain")
    models = sorted(client.search_logged_models([run.info.experiment_id],
                                                filter_string=f"source_run_id = '{run.info.run_id}'"),
                    key=lambda m: int(m.params["step"]))
    checkpoints = tracked["run_dir"] / "checkpoints"
    assert [(m.params["step"], m.tags["checkpoint"]) for m in models] == [
        (str(step), str(checkpoints / f"step{step:08d}")) for step in (40, 80, 120)]
    assert [m.tags["checkpoint_state"] for m in models] == ["pruned", "kept", "kept"], "keep_checkpoints: 2"
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("step")) == ["step00000080",
                                                                                          "step00000120"]
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/top1")}
    for model in models:
        linked = {m.key: m for m in model.metrics}
        assert linked["val/top1"].value == history[int(model.params["step"])]
        assert linked["val/top1"].dataset_name == f"{tracked['shards'].name}/val" and "val_ema/top1" in linked
        assert model.tags["stage"] == "pretrain" and model.tags["pipeline"] == "system-test"


def val_images(tracked) -> tuple[list[bytes], list[int]]:
    from pipeline.data import resolve_shards
    from pipeline.data.tarindex import shard_samples

    images, labels = [], []
    for url in resolve_shards(f"{tracked['shards']}/val.json").urls:
        for sample in shard_samples(url):
            images.append(next(sample[k] for k in ("jpg", "png", "webp") if k in sample))
            labels.append(int(sample["cls"]))
    return images, labels


def per_class_accuracy(predicted: list[int], labels: list[int]) -> dict[str, float]:
    counts = Counter(labels)
    correct = Counter(label for label, guess in zip(labels, predicted) if label == guess)
    return {str(c): correct[c] / counts[c] for c in sorted(counts)}


def test_the_evaluated_model_is_registered_and_loads_in_a_fresh_process(tracked):
    client, report = tracked["client"], tracked["report"]
    version = client.get_model_version(MODEL, "1")
    run = stage_run(tracked, "evaluate")
    assert version.run_id == run.info.run_id and version.tags["pipeline"] == "system-test"
    assert version.tags["git_commit"] == run.data.tags["git_commit"]
    assert f"registered as MLflow model {MODEL} version 1" in tracked["evaluate_log"]
    images, labels = val_images(tracked)
    folder = tracked["tmp"] / "images"
    folder.mkdir()
    for i, data in enumerate(images):
        (folder / f"{i:04d}").write_bytes(data)
    script = f"""
import json, mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/{MODEL}/1")
paths = [f"{folder}/{{i:04d}}" for i in range({len(images)})]
print(json.dumps(model.predict(pd.DataFrame({{"path": paths}}))["class_id"].tolist()))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env=dict(launch_env(), MLFLOW_TRACKING_URI=tracked["uri"]), cwd=tracked["tmp"])
    assert result.returncode == 0, result.stderr[-3000:]
    predicted = json.loads(result.stdout.strip().splitlines()[-1])
    # the evaluation's report, image by image: every class's accuracy, and so top-1, is the same
    assert per_class_accuracy(predicted, labels) == pytest.approx(report["per_class_accuracy"], abs=1e-12)
    assert sum(p == y for p, y in zip(predicted, labels)) / len(labels) == pytest.approx(report["top1"], abs=1e-12)
    tracked["predicted"] = predicted


def test_mlflow_models_serve_answers_with_the_evaluations_classes(tracked):
    if "predicted" not in tracked:
        pytest.skip("needs the pyfunc test's predictions")
    port = free_port()
    venv = Path(sys.executable).parent  # mlflow runs the uvicorn it finds on PATH
    env = dict(launch_env(), MLFLOW_TRACKING_URI=tracked["uri"], PATH=f"{venv}:{os.environ['PATH']}")
    serve = subprocess.Popen([str(venv / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}/1",
                              "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                             env=env, cwd=tracked["tmp"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if serve.poll() is not None or time.time() > deadline:
                stop_server(serve)
                raise AssertionError(f"mlflow models serve did not come up:\n{serve.stdout.read()[-3000:]}")
            time.sleep(0.5)
        images, _ = val_images(tracked)
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b).decode()]
                                                                              for b in images[:40]]}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())["predictions"]
        assert [row["class_id"] for row in answer] == tracked["predicted"][:40]
        assert all(row["class_name"] == str(row["class_id"]) and 0 < row["probability"] <= 1 for row in answer)
    finally:
        stop_server(serve)
