import json
import time

from mlflow.tracking import MlflowClient

from pipeline.tracking import Tracker, git_commit, tracking_uri


def test_default_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri() == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri() == "http://127.0.0.1:5000" and tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_run_params_metrics_artifacts_and_resume(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tags = {"stage": "pretrain", "pipeline": "p1", "git_commit": git_commit(), "slurm_job_id": "none"}
    tracker = Tracker(uri=uri, experiment="exp", run_name="r", tags=tags)
    run_id = tracker.wait_started(timeout=60)
    assert run_id
    tracker.log_params({"optim.lr": 0.001, "model.variant": "L/16"})
    for step in range(1, 4):
        tracker.log_metrics({"loss": 1.0 / step, "mfu": None, "data/skipped": 0}, step=step)
    tracker.log_text("a: 1\n", "config.yaml")
    tracker.close()
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"optim.lr": "0.001", "model.variant": "L/16"}
    assert run.data.tags["stage"] == "pretrain" and run.data.tags["pipeline"] == "p1"
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [1.0, 0.5, 1 / 3]
    assert "mfu" not in run.data.metrics and run.data.metrics["data/skipped"] == 0
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.yaml"]

    again = Tracker(uri=uri, experiment="exp", run_name="r", tags=tags, run_id=run_id)  # a requeued job
    assert again.wait_started(timeout=60) == run_id
    again.log_params({"optim.lr": 0.001})  # already logged: fine
    again.log_metrics({"loss": 0.1}, step=4)
    again.close()
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4]
    assert len(client.search_runs([client.get_experiment_by_name("exp").experiment_id])) == 1


def test_unreachable_server_never_blocks_or_raises():
    tracker = Tracker(uri="http://127.0.0.1:9", experiment="e", run_name="r", tags={}, max_backoff_s=0.2)
    start = time.monotonic()
    assert tracker.wait_started(timeout=1.0) is None
    for step in range(100):
        tracker.log_metrics({"loss": 1.0}, step=step)
    assert time.monotonic() - start < 3.0
    tracker.close(timeout=1.0)
    assert tracker.undelivered > 0


def test_disabled_tracker_does_nothing():
    tracker = Tracker(uri="http://127.0.0.1:9", experiment="e", run_name="r", tags={}, enabled=False)
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.close()
    assert tracker.run_id is None and tracker.undelivered == 0


def test_resuming_a_run_the_store_does_not_know_starts_a_new_one(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri=uri, experiment="exp", run_name="r", tags={}, run_id="0123456789abcdef0123456789abcdef")
    run_id = tracker.wait_started(timeout=60)
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.close()
    assert run_id and run_id != "0123456789abcdef0123456789abcdef"
    assert MlflowClient(uri).get_run(run_id).info.status == "FINISHED"


def test_pipeline_stages_nest_under_one_parent_with_their_datasets(tmp_path):
    """Stages with a pipeline id: the first creates the parent run (stage=pipeline), the next finds
    it by its tag; both are its children, the parent's status follows the latest stage, and a
    requeued stage continues its own run. The experiment opens on training runs; datasets are
    inputs with their manifest digest, source, counts and context."""
    import json

    from pipeline.tracking import describe_shards

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    manifest = tmp_path / "data" / "train.json"
    manifest.parent.mkdir()
    shards = [{"url": "a.tar", "num_samples": 6}, {"url": "b.tar", "num_samples": 6}]
    manifest.write_text(json.dumps({"split": "train", "num_samples": 12, "num_classes": 3, "shards": shards}))
    first = Tracker(uri=uri, experiment="exp", run_name="pre", tags={"stage": "pretrain", "pipeline": "p"},
                    pipeline="p")
    first.log_datasets([describe_shards(str(manifest), "training"), describe_shards("pipe:cat x.tar", "evaluation")])
    first.close()
    second = Tracker(uri=uri, experiment="exp", run_name="ft", tags={"stage": "finetune", "pipeline": "p"},
                     pipeline="p")
    second.close("KILLED")
    requeued = Tracker(uri=uri, experiment="exp", run_name="ft", tags={}, run_id=second.run_id, pipeline="p")
    assert requeued.wait_started(timeout=60) == second.run_id
    assert MlflowClient(uri).get_run(first.parent_id).info.status == "RUNNING"
    requeued.close()

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("exp")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["ft", "p", "pre"]
    parent = runs["p"]
    assert parent.data.tags["stage"] == "pipeline" and parent.info.run_id == first.parent_id == second.parent_id
    assert parent.info.status == "FINISHED"
    parents = {runs[name].data.tags["mlflow.parentRunId"] for name in ("pre", "ft")}
    assert parents == {parent.info.run_id}
    inputs = {d.dataset.name: d for d in runs["pre"].inputs.dataset_inputs}
    train = inputs["data/train"]
    assert json.loads(train.dataset.profile) == {"num_samples": 12, "num_classes": 3, "num_shards": 2}
    assert train.dataset.source == str(manifest) and len(train.dataset.digest) == 10
    assert [t.value for t in train.tags if t.key == "mlflow.data.context"] == ["training"]
    assert "pipe:cat x.tar" in inputs and not runs["ft"].inputs.dataset_inputs


def test_mlflow_wanted_but_missing_is_one_error_line(tmp_path):
    """A stage whose tracking URI needs MLflow, on a machine without it: one line, exit 2, at once
    (before any model work; the tracker thread would otherwise retry the import for a minute)."""
    import subprocess
    import sys

    from tests.helpers import ROOT

    code = ("import runpy, sys; sys.modules['mlflow'] = None; "  # import mlflow now fails, as where it is missing
            f"sys.argv = ['train.py', '--config', 'configs/demo/pretrain.yaml', 'run.output_dir={tmp_path}']; "
            "runpy.run_path('launch/train.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "MLFLOW_TRACKING_URI": "sqlite:///x.db"})
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "MLflow is not installed" in errors[0] and "run.tracking_uri=none" in errors[0], \
        result.stderr
    assert "Traceback" not in result.stderr


def test_tracking_off_never_starts_mlflow():
    tracker = Tracker(uri="none", experiment="exp", run_name="r", tags={})
    tracker.log_metrics({"loss": 1.0}, step=1)
    assert not tracker.enabled and tracker.wait_started(timeout=60) is None
    tracker.close()


def test_checkpoints_are_logged_models_with_their_validation_and_pruning(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tags = {"stage": "pretrain", "pipeline": "p1", "git_commit": "abc", "slurm_job_id": "none"}
    tracker = Tracker(uri=uri, experiment="exp", run_name="r", tags=tags)
    tracker.model_dataset = {"name": "digits/val", "digest": "0123456789"}
    run_id = tracker.wait_started(timeout=60)
    steps = [10, 20, 30]
    for step in steps:
        kept = [tmp_path / f"step{s:08d}" for s in steps if step - 10 <= s <= step]  # keep_checkpoints: 2
        tracker.log_checkpoint(step, tmp_path / f"step{step:08d}", kept)
        tracker.log_metrics({"val/top1": step / 100, "loss": 1.0}, step=step)
    tracker.log_metrics({"val/top1": 0.9}, step=35)  # no checkpoint at this step: linked to none
    tracker.close()
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("exp").experiment_id
    by_top1 = [{"field_name": "metrics.val/top1", "ascending": False}]
    models = client.search_logged_models([experiment], order_by=by_top1)
    assert [m.name for m in models] == ["step00000030", "step00000020", "step00000010"], "ranked by val/top1"
    for model, step in zip(models, [30, 20, 10]):
        assert model.source_run_id == run_id and model.params == {"step": str(step)} and model.status.name == "READY"
        assert model.tags["checkpoint"] == str(tmp_path / f"step{step:08d}")
        assert model.tags["mlflow.model.isExternal"] == "true"
        assert model.tags["stage"] == "pretrain" and model.tags["pipeline"] == "p1" and model.model_type == "checkpoint"
        linked = [(m.key, m.value, m.step, m.dataset_name) for m in model.metrics]
        assert linked == [("val/top1", step / 100, step, "digits/val")]
    assert [m.tags["checkpoint_state"] for m in models] == ["kept", "kept", "pruned"]
    outputs = client.get_run(run_id).outputs.model_outputs
    assert sorted(o.step for o in outputs) == steps
    assert [m.step for m in client.get_metric_history(run_id, "val/top1")] == [10, 20, 30, 35]


def test_the_evaluated_model_is_logged_and_registered(tmp_path):
    """What the tracker does with a saved model (the real pyfunc model: tests/test_serving.py,
    and through the evaluation stage: tests/system/test_mlflow_server.py)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "MLmodel").write_text("flavors: {}\n")
    tags = {"stage": "evaluate", "pipeline": "p1", "git_commit": "abc123", "slurm_job_id": "none"}
    for _ in range(2):  # two evaluations: two versions of one registered model
        tracker = Tracker(uri=uri, experiment="exp", run_name="e", tags=tags)
        tracker.model_dataset = {"name": "digits/val", "digest": "0123456789"}
        run_id = tracker.wait_started(timeout=60)
        tracker.log_model(model_dir, {"top1": 0.75, "loss": 0.5}, register="vit-demo")
        tracker.close()
        assert tracker.registered[0] == "vit-demo"
    client = MlflowClient(uri)
    assert sorted(int(v.version) for v in client.search_model_versions("name = 'vit-demo'")) == [1, 2]
    version = client.get_model_version("vit-demo", "2")
    assert version.run_id == run_id and version.tags == {"pipeline": "p1", "git_commit": "abc123"}
    assert version.source.startswith("models:/")  # MLflow's sqlite store leaves version.model_id unset
    model = client.get_logged_model(version.source.removeprefix("models:/"))
    assert model.name == "vit-demo" and json.loads(model.tags["mlflow.modelVersions"]) == [
        {"name": "vit-demo", "version": 2}], "the model lists its version (the UI's link)"
    assert model.source_run_id == run_id and model.model_type == "pyfunc" and model.status.name == "READY"
    linked = {(m.key, m.value, m.dataset_name) for m in model.metrics}
    assert linked == {("top1", 0.75, "digits/val"), ("loss", 0.5, "digits/val")}
    assert [a.path for a in client.list_logged_model_artifacts(model.model_id)] == ["MLmodel"]


def test_a_dataset_without_a_manifest_on_disk_is_described_by_its_spec(tmp_path):
    """A stage that does not read its eval shards (train.eval_every: null) may name a manifest
    that is not there: describing it must not fail."""
    from pipeline.tracking import describe_shards

    missing = describe_shards(str(tmp_path / "nowhere" / "val.json"), "evaluation")
    assert missing["name"] == "val.json" and missing["profile"] == "{}" and len(missing["digest"]) == 10
