"""MLflow tracking on rank 0. No call here raises or blocks training.

Every MLflow request runs on one background thread. A request that fails (server down, network
gone) stays at the head of the queue and is retried with backoff, so metrics logged while the
server is away are delivered, in order, once it is back. Other ranks get a tracker that does
nothing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import queue
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# One short attempt per request: the retry loop below is ours, so training never waits on
# MLflow's own (minutes-long) HTTP backoff.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


MODEL_IS_EXTERNAL = "mlflow.model.isExternal"  # a LoggedModel whose files MLflow does not hold
TRACKING_OFF = "none"  # run.tracking_uri (or $MLFLOW_TRACKING_URI): no MLflow, not even imported


def tracking_uri(configured: str | None = None) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def tracking_unavailable(uri: str) -> str | None:
    """Why a stage cannot track to ``uri``, in one sentence; None where it can, or tracking is off.
    Checked at start: MLflow missing, a store's folder that does not exist, a scheme MLflow does
    not know would otherwise be retried by the tracker thread in vain (a server that is down is
    no mistake: the tracker waits for it)."""
    if uri == TRACKING_OFF:
        return None
    if importlib.util.find_spec("mlflow") is None:
        return (f"MLflow is not installed, and run.tracking_uri is {uri}: install it (pip install mlflow), or set "
                f"run.tracking_uri={TRACKING_OFF} to run without tracking")
    scheme, _, rest = uri.partition("://")
    if scheme in ("sqlite", "file") and rest.startswith("/"):
        folder = Path(rest[1:] if scheme == "sqlite" else rest).parent  # sqlite:///x.db is relative, ////x.db not
        if not folder.is_dir():
            return f"run.tracking_uri {uri}: folder '{folder}' does not exist"
    elif "://" in uri and scheme not in ("http", "https", "databricks", "file", "sqlite", "postgresql", "mysql",
                                         "mssql"):
        return f"run.tracking_uri {uri}: MLflow cannot track to a '{scheme}' URI"
    return None


def ui_url(uri: str, experiment_id: str | None, run_id: str | None = None) -> str:
    """The MLflow UI page of an experiment (or of one run) on its training view. MLflow 3.17 keeps
    the choice between its GenAI and machine-learning views in the browser, so the address says
    ``workflowType=machine_learning``. A server's UI is the server; a local store's is ``mlflow
    ui`` on 127.0.0.1:5000."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    page = f"/runs/{run_id}" if run_id else ""
    return f"{base}/#/experiments/{experiment_id}{page}?workflowType=machine_learning"


def git_commit() -> str:
    """The commit of this code: $VIT_PIPELINE_GIT_COMMIT where set (the Docker image, from its
    GIT_COMMIT build argument: it has no .git), else ``git rev-parse HEAD``."""
    if os.environ.get("VIT_PIPELINE_GIT_COMMIT"):
        return os.environ["VIT_PIPELINE_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # the UI opens on training runs


def pipeline_id(config) -> str | None:
    """The pipeline a stage belongs to, where one is named (``run.pipeline``, else
    $VIT_PIPELINE_ID, which make demo and the SLURM scripts set): its stages nest under one
    parent run. None for a stage run on its own."""
    return config.run.pipeline or os.environ.get("VIT_PIPELINE_ID") or None


def describe_shards(spec: str, context: str) -> dict[str, str]:
    """An MLflow dataset input for a shard spec: its name (manifest folder/split, or the spec), a
    digest of the manifest (or of the spec), the source, and a profile of sample, class and
    shard counts; ``context`` is 'training' or 'evaluation'."""
    from pipeline.data.shards import resolve_shards

    path = Path(spec)
    shards = resolve_shards(spec, check_exists=False) if spec.endswith(".json") and path.is_file() else None
    if shards is not None and shards.manifest is not None:
        manifest = shards.manifest
        name, digest = f"{path.parent.name}/{manifest.get('split', path.stem)}", shards.digest
        profile = {"num_samples": manifest.get("num_samples"), "num_classes": manifest.get("num_classes"),
                   "num_shards": len(shards.urls)}
    else:
        name, digest, profile = spec.rsplit("/", 1)[-1][:100], hashlib.sha256(spec.encode()).hexdigest()[:10], {}
    return {"name": name, "digest": digest, "source": spec, "source_type": "webdataset",
            "profile": json.dumps(profile), "context": context}


def stage_tags(config, stage: str) -> dict[str, str]:
    """The tags every stage's run carries; ``pipeline`` is shared by the stages of one pipeline."""
    return {
        "stage": stage,
        "pipeline": config.run.pipeline or os.environ.get("VIT_PIPELINE_ID") or config.run.name,
        "git_commit": git_commit(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID", "none"),
    }


def start_system_metrics(uri: str, run_id: str | None, interval: float | None, resume: bool):
    """MLflow's system metrics (CPU, memory, disk, network; GPU utilisation and memory through
    nvidia-ml-py on CUDA) of this node, every ``interval`` s, into ``run_id`` as
    ``system/HOSTNAME/...``; one rank per node calls it. Returns the monitor (``finish()`` it), or
    None where it is off or cannot start, which never stops training."""
    if not interval or not run_id:
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, node_id=socket.gethostname(),
                                       tracking_uri=uri, resume_logging=resume)
        monitor.start()
        return monitor
    except Exception as e:  # noqa: BLE001 - tracking must never stop training
        log.warning("MLflow system metrics not started: %s", str(e).splitlines()[0][:200])
        return None


class Tracker:
    """One MLflow run per stage. ``run_id`` resumes an existing run (a requeued job). With a
    ``pipeline`` id the run is a child of that pipeline's parent run (tagged ``stage=pipeline``),
    found by its ``pipeline`` tag or created by the first stage; the parent's status follows the
    latest stage's."""

    def __init__(self, *, uri: str, experiment: str, run_name: str, tags: dict[str, str], run_id: str | None = None,
                 enabled: bool = True, max_backoff_s: float = 30.0, pipeline: str | None = None):
        self.enabled = enabled and uri != TRACKING_OFF
        self.run_id = run_id
        self.parent_id: str | None = None
        self.registered: tuple[str, str] | None = None  # (name, version) of the model registered by log_model
        self.undelivered = 0
        if not self.enabled:
            return
        self.uri, self.experiment, self.run_name, self.tags = uri, experiment, run_name, tags
        self.pipeline = pipeline
        self.experiment_id: str | None = None
        self.model_dataset: dict[str, str] | None = None  # what checkpoints' validation metrics are measured on
        self._checkpoint_models: dict[int, str] = {}  # step -> LoggedModel id, on the tracker thread
        self._logged_model: str | None = None  # the evaluated model, logged but not yet registered
        self.max_backoff_s = max_backoff_s
        self._queue: queue.Queue = queue.Queue()
        self._client = None
        self._warned_at = 0.0
        self._thread = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)
        self._started = threading.Event()
        self._put("start", None)  # create (or reopen) the run now, so its id can be shared early
        self._thread.start()

    # -- the API training calls; all of it just enqueues -------------------------------------

    def wait_started(self, timeout: float) -> str | None:
        """Wait up to ``timeout`` s for the run to exist (so its id can be broadcast); its id or None."""
        if self.enabled:
            self._started.wait(timeout)
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        self._put("params", {k: str(v)[:6000] for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float | None], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v == v}
        self._put("metrics", (clean, step, int(time.time() * 1000)))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._put("text", (text, artifact_file))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._put("artifact", (str(path), artifact_path))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._put("tags", tags)

    def log_datasets(self, datasets: list[dict[str, str]]) -> None:
        """Dataset inputs of the run (:func:`describe_shards`): the Dataset column of the UI."""
        self._put("inputs", datasets)

    def log_teacher(self, identity: dict) -> None:
        """A distillation's teacher: tags (path, digest, the run that trained it), and where that
        run logged the teacher's checkpoint as a LoggedModel, that model as an input of this run
        (the UI links the two)."""
        self._put("teacher", identity)

    def log_checkpoint(self, step: int, path: Path, kept: list[Path]) -> None:
        """The checkpoint at ``path`` as an MLflow LoggedModel of this run (its step, the
        directory as an external location, the run's stage and pipeline tags); the ``val/*``
        and ``val_ema/*`` metrics logged later at ``step`` are linked to it, on
        :attr:`model_dataset`. This run's checkpoint models that are not in ``kept`` (pruned by
        ``train.keep_checkpoints``) are tagged ``checkpoint_state=pruned``."""
        self._put("checkpoint", (step, str(path), [str(p) for p in kept]))

    def log_model(self, path: Path, metrics: dict[str, float], *, register: str | None = None) -> None:
        """The MLflow model saved at ``path`` (:func:`pipeline.serving.save_pyfunc`) as a
        LoggedModel of this run, with ``metrics`` linked to it on :attr:`model_dataset`; with
        ``register``, a new version of that registered model, tagged with the pipeline and the
        git commit."""
        self._put("model", (str(path), metrics, register))

    def close(self, status: str = "FINISHED", timeout: float = 30.0) -> None:
        """End the run, waiting up to ``timeout`` s for queued records; reports what was not sent."""
        if not self.enabled:
            return
        self._put("end", status)
        self._put("stop", None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.undelivered = self._queue.qsize()
            log.warning("MLflow at %s unreachable: %d queued records were not delivered", self.uri, self.undelivered)

    # -- the background thread ---------------------------------------------------------------

    def _put(self, kind: str, payload: Any) -> None:
        if self.enabled:
            self._queue.put((kind, payload))

    def _work(self) -> None:
        backoff = 1.0
        pending = None
        while True:
            if pending is None:
                pending = self._queue.get()
            if pending[0] == "stop":
                return
            try:
                self._ensure_run()
                self._send(*pending)
                pending, backoff = None, 1.0
            except Exception as e:  # noqa: BLE001 - tracking must never stop training
                now = time.monotonic()
                if now - self._warned_at > 60:
                    log.warning("MLflow at %s failed (%s); training goes on, records are kept and retried",
                                self.uri, str(e).splitlines()[0][:200])
                    self._warned_at = now
                time.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)

    def _ensure_run(self) -> None:
        if self._client is None:
            import mlflow
            from mlflow.tracking import MlflowClient

            mlflow.set_tracking_uri(self.uri)  # where MLflow's own helpers (register_model) look models up
            self._client = MlflowClient(self.uri)
        if self.run_id is not None and self._started.is_set():
            return
        from mlflow.exceptions import MlflowException

        client = self._client
        if self.run_id is not None:  # resuming: mark the run (and its pipeline's) running again
            try:
                client.update_run(self.run_id, status="RUNNING")
                run = client.get_run(self.run_id)
                self.parent_id = run.data.tags.get("mlflow.parentRunId")
                self.experiment_id = run.info.experiment_id
                if self.parent_id:
                    client.update_run(self.parent_id, status="RUNNING")
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.warning("MLflow run %s is not in %s (another store?): starting a new run", self.run_id, self.uri)
                self.run_id = None
        if self.run_id is None:
            experiment = client.get_experiment_by_name(self.experiment)
            experiment_id = experiment.experiment_id if experiment else \
                client.create_experiment(self.experiment, tags=dict([EXPERIMENT_KIND]))
            if experiment and EXPERIMENT_KIND[0] not in experiment.tags:
                client.set_experiment_tag(experiment_id, *EXPERIMENT_KIND)
            tags = dict(self.tags)
            if self.pipeline:
                self.parent_id = tags["mlflow.parentRunId"] = self._parent_run(experiment_id)
            self.run_id = client.create_run(experiment_id, run_name=self.run_name, tags=tags).info.run_id
            self.experiment_id = experiment_id
        self._started.set()

    def _parent_run(self, experiment_id: str) -> str:
        """The pipeline's parent run, running again, or a new one named after the pipeline."""
        client, name = self._client, self.pipeline.replace("'", "")
        query = f"tags.stage = 'pipeline' and tags.pipeline = '{name}'"
        found = client.search_runs([experiment_id], filter_string=query, max_results=1)
        if found:
            client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
        tags = {**self.tags, "stage": "pipeline", "pipeline": name}
        return client.create_run(experiment_id, run_name=name, tags=tags).info.run_id

    def _send(self, kind: str, payload: Any) -> None:
        from mlflow.entities import Param, RunTag

        client, run_id = self._client, self.run_id
        if kind == "start":
            return
        if kind == "params":
            items = [Param(k, v) for k, v in payload.items()]
            for i in range(0, len(items), 100):
                try:
                    client.log_batch(run_id, params=items[i:i + 100])
                except Exception as e:  # a resumed run already has its params: not an error
                    if "already logged" not in str(e) and "Changing param values" not in str(e):
                        raise
        elif kind == "metrics":
            metrics, step, timestamp = payload
            model_id = self._checkpoint_models.get(step)  # a checkpoint's validation is linked to it
            batch = [self._metric(k, v, timestamp, step, model_id if k.startswith("val") else None)
                     for k, v in metrics.items()]
            client.log_batch(run_id, metrics=batch)
        elif kind == "checkpoint":
            self._send_checkpoint(*payload)
        elif kind == "teacher":
            self._send_teacher(payload)
        elif kind == "model":
            self._send_model(*payload)
        elif kind == "text":
            client.log_text(run_id, *payload)
        elif kind == "artifact":
            client.log_artifact(run_id, *payload)
        elif kind == "tags":
            client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in payload.items()])
        elif kind == "inputs":
            from mlflow.entities import Dataset, DatasetInput, InputTag

            client.log_inputs(run_id, [DatasetInput(Dataset(**{k: v for k, v in d.items() if k != "context"}),
                                                    [InputTag("mlflow.data.context", d["context"])]) for d in payload])
        elif kind == "end":
            client.set_terminated(run_id, status=payload)
            if self.parent_id:
                client.set_terminated(self.parent_id, status=payload)

    def _metric(self, key: str, value: float, timestamp: int, step: int, model_id: str | None):
        from mlflow.entities import Metric

        dataset = self.model_dataset if model_id else None
        return Metric(key, value, timestamp, step, model_id=model_id, dataset_name=dataset["name"] if dataset else None,
                      dataset_digest=dataset["digest"] if dataset else None)

    def _send_checkpoint(self, step: int, path: str, kept: list[str]) -> None:
        from mlflow.entities import LoggedModelOutput

        client = self._client
        # This run's kept checkpoints: a few, however long the run (a retried request finds what it made)
        query = f"source_run_id = '{self.run_id}' AND tags.checkpoint_state = 'kept'"
        models = client.search_logged_models([self.experiment_id], filter_string=query)
        found = next((m for m in models if m.tags.get("checkpoint") == path), None)
        if found is None:
            tags = {MODEL_IS_EXTERNAL: "true", "checkpoint": path, "checkpoint_state": "kept",
                    **{k: self.tags[k] for k in ("stage", "pipeline") if k in self.tags}}
            found = client.create_logged_model(self.experiment_id, name=Path(path).name, source_run_id=self.run_id,
                                               tags=tags, params={"step": str(step)}, model_type="checkpoint")
            client.finalize_logged_model(found.model_id, "READY")
            client.log_outputs(self.run_id, [LoggedModelOutput(found.model_id, step=step)])
        self._checkpoint_models[step] = found.model_id
        for model in models:
            if model.tags.get("checkpoint") not in kept:
                client.set_logged_model_tags(model.model_id, {"checkpoint_state": "pruned"})

    def _send_teacher(self, identity: dict) -> None:
        from mlflow.entities import LoggedModelInput, RunTag

        client, source = self._client, identity.get("mlflow_run_id")
        client.log_batch(self.run_id, tags=[RunTag(f"distill.teacher_{k}", str(v)) for k, v in identity.items() if v])
        if not source:
            return
        experiment = client.get_run(source).info.experiment_id
        models = client.search_logged_models([experiment], filter_string=f"source_run_id = '{source}'")
        step = Path(identity["path"]).name  # stepNNNNNNNN: one checkpoint of that run
        found = next((m for m in models if Path(m.tags.get("checkpoint", "")).name == step), None)
        if found is not None:
            client.log_inputs(self.run_id, models=[LoggedModelInput(found.model_id)])
            client.set_tag(self.run_id, "distill.teacher_model_id", found.model_id)

    def _send_model(self, path: str, metrics: dict[str, float], register: str | None) -> None:
        """Log, then register: a retry after a failed registration does not log the model again."""
        import mlflow
        from mlflow.entities import LoggedModelOutput

        client, now = self._client, int(time.time() * 1000)
        tags = {k: self.tags[k] for k in ("stage", "pipeline", "git_commit") if k in self.tags}
        if self._logged_model is None:
            model = client.create_logged_model(self.experiment_id, name=register or "evaluated", tags=tags,
                                               source_run_id=self.run_id, model_type="pyfunc")
            client.log_model_artifacts(model.model_id, path)
            client.finalize_logged_model(model.model_id, "READY")
            client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, step=0)])
            client.log_batch(self.run_id, metrics=[self._metric(k, v, now, 0, model.model_id)
                                                   for k, v in metrics.items()])
            self._logged_model = model.model_id
        if register:  # MLflow's own call: the version's source is models:/ID, and the model lists the version
            version = mlflow.register_model(f"models:/{self._logged_model}", register,
                                            tags={k: v for k, v in tags.items() if k != "stage"})
            self.registered = (register, version.version)
        self._logged_model = None
