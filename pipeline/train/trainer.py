"""The DeepSpeed trainer: one optimizer step at a time, checkpoints, preemption, metrics."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Iterator

import deepspeed
import torch
import torch.distributed as dist
from pydantic import ByteSize
from tqdm import tqdm

from pipeline.config import Config
from pipeline.data import BatchFinisher, Normalize, TrainBatch, TrainLoader, TrainStream, TrainTransform
from pipeline.data.shards import shards_for_streams
from pipeline.data.transforms import DeviceTrainTransform
from pipeline.flops import device_peak_tflops
from pipeline.model import VisionTransformer, build_model
from pipeline.tracking import Tracker, describe_shards, pipeline_id, stage_tags, start_system_metrics, tracking_uri
from pipeline.train import checkpoint as ckpt
from pipeline.train import signals
from pipeline.train.cadence import Cadence, StopAgreement
from pipeline.train.consolidate import pretrained
from pipeline.train.distill import check_same_teacher
from pipeline.train.distributed import DistEnv, describe_placements, gather_placements, rank_device
from pipeline.train.ema import ShardedEma, has_ema
from pipeline.train.evaluation import Preempted, eval_stream
from pipeline.train.knn import knn_top1
from pipeline.train.metrics import Meter, MetricsWriter, max_memory_gb
from pipeline.train.objectives import objective_of
from pipeline.train.optim import build_optimizer, lr_at, peak_lr
from pipeline.train.rng import rng_state, seed_everything, set_rng_state
from pipeline.train.run_plan import JobShape, RunPlan, resolve

log = logging.getLogger(__name__)
EXIT_PREEMPTED = signals.EXIT_PREEMPTED


class Trainer:
    """Builds the model, engine and data stream for ``config`` on the ranks of ``env``. A
    fine-tuning run (``run.stage: finetune``) starts from ``finetune.init_from``, unless it is
    resuming its own checkpoint.

    Construction, in order, with the collectives each step makes on every rank:

    0. placement: where every rank runs, written to ``ranks.json`` (an all-gather; refuses two
       ranks of one host with the same ``LOCAL_RANK``);
    1. plan: rank 0 picks the checkpoint to resume, the others are told (a broadcast); then the
       run plan (:mod:`pipeline.train.run_plan`, what ``--dry-run`` prints), written to
       ``plan.json``: data, a batch or a length that does not fit is refused before any model work;
    2. data: the training stream, and with ``train.eval_every`` the evaluation and k-NN streams
       (none);
    3. model and engine: the module the objective trains (:mod:`pipeline.train.objectives`), the
       same initial weights everywhere; ``finetune.init_from`` read on rank 0 and broadcast; ZeRO-3
       partitions as it builds; ``deepspeed.initialize`` (broadcasts, buckets); then the objective,
       with distillation its frozen teacher, built alike (its identity read on rank 0, a broadcast);
    4. state: the checkpoint loaded (every rank reads its partition), then the client state,
       and with ``train.ema_decay`` the EMA (each rank its own fragments; none);
    5. tracking: rank 0 starts or resumes the MLflow run, the others learn its id (a broadcast).

    With ``train.eval_every``, every rank holds the exact evaluation stream of ``data.eval_shards``
    and validates the model (and its EMA) as its objective measures it every that many steps and
    at the end, with ``knn.*`` the k-NN top-1 of its representation (:mod:`pipeline.train.knn`).
    """

    def __init__(self, config: Config, env: DistEnv):
        self.config, self.env, self.is_main = config, env, env.is_main
        self.tracker: Tracker | None = None  # close() may run after a failed construction
        self.system_metrics = None
        self.run_dir = config.run.run_dir
        self.checkpoints = ckpt.Checkpointer(self.run_dir / "checkpoints", config.train.keep_checkpoints, env.rank)
        self.step, self.lr = 0, 0.0
        signals.install()  # the launchers install it first thing; a library caller gets it here
        self.device = rank_device(env)
        self.placements = self.place()
        self.plan = self.resolve_plan()
        self.loader = self.build_loader()
        self.eval_stream = eval_stream(config, env, self.plan.eval_shards, objective_of(config).needs_labels) \
            if self.plan.eval_shards else None
        self.knn = [eval_stream(config, env, shards) for shards in self.plan.knn_shards] \
            if self.plan.knn_shards else None
        self.decoder = BatchFinisher(config.model.image_size, self.device)
        self.normalize = Normalize(config.data.mean, config.data.std, self.device)
        self.engine = self.build_engine()
        self.objective = objective_of(config)(config, self.plan, self.device, self.is_main)
        self.peak_lr = peak_lr(config.optim, config.train.global_batch_size)
        self.peak_tflops = config.train.device_peak_tflops or (
            device_peak_tflops(torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else None)
        self.stops = StopAgreement(self.device, config.train.max_bad_steps)
        run_id = self.resume()
        self.ema = self.build_ema()
        self.tracker, self.system_metrics = self.start_tracking(run_id)
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl", self.tracker, self.is_main)

    # -- construction -------------------------------------------------------------------------

    def place(self) -> list[dict]:
        """Every rank's placement, checked, logged and written to ``ranks.json``."""
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (the loss, any fp32 run) on tensor cores
            torch.backends.cudnn.allow_tf32 = True
        placements = gather_placements(self.env, self.device)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.config.save(self.run_dir / "config.yaml")
            log.info("%s", describe_placements(placements))
            (self.run_dir / "ranks.json").write_text(json.dumps(placements, indent=1))
        return placements

    def resolve_plan(self) -> RunPlan:
        """The run plan on this job: the resume target as rank 0 chose it for every rank, then
        everything else as the dry run works it out; rank 0 writes it to ``plan.json``."""
        c = self.config
        resume = ckpt.agree_on_resume(c.train.resume, self.checkpoints.directory, ckpt.model_signature(c),
                                      self.env.world_size, c.objective)
        plan = resolve(c, JobShape.of(self.placements, self.device), "train", resume=resume).check()
        if self.is_main:
            plan.write(self.run_dir)
            if len(plan.train_shards.urls) < plan.streams:
                log.info("data.train_shards: %s", shards_for_streams(len(plan.train_shards.urls), self.env.world_size,
                                                                      c.data.num_workers))
            if plan.micro_batch != c.train.micro_batch_size:
                log.info("train.micro_batch_size %d -> %d: the per-rank batch is %d at %d ranks",
                         c.train.micro_batch_size, plan.micro_batch, c.train.global_batch_size // self.env.world_size,
                         self.env.world_size)
        return plan

    def build_engine(self) -> deepspeed.DeepSpeedEngine:
        c, plan = self.config, self.plan
        seed_everything(c.run.seed)  # the same initial weights on every rank
        init_from = c.finetune.init_from if c.run.stage == "finetune" and plan.resume is None else None
        model = self.make_model(init_from, ema=c.finetune.use_ema)
        optimizer = build_optimizer(model, c.optim, offload=c.deepspeed.offload_optimizer != "none", device=self.device)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=plan.deepspeed)
        seed_everything(c.run.seed + 1000 * self.env.rank)  # dropout and mixing differ per rank
        return engine

    def resume(self) -> str | None:
        """Load the checkpoint and client state; the MLflow run id it names, if any."""
        if self.plan.resume is None:
            return None
        state = self.checkpoints.load(self.engine, self.plan.resume)
        self.load_state_dict(state)
        if self.is_main:
            log.info("resumed from %s at step %d", self.plan.resume, self.step)
        return state.get("mlflow_run_id")

    def build_ema(self) -> ShardedEma | None:
        """The EMA of the weights, resumed from the checkpoint's (the original of a universal one)."""
        c, resume = self.config.train, self.plan.resume
        if c.ema_decay is None:
            return None
        ema = ShardedEma(self.engine, c.ema_decay, c.ema_warmup)
        if resume is not None:
            source = resume.with_name(resume.name.removesuffix(ckpt.UNIVERSAL))
            if has_ema(source):
                ema.load(source)
            elif self.is_main:
                log.warning("train.ema_decay: checkpoint %s holds no EMA; the EMA starts from its weights", source)
        return ema

    def make_model(self, init_from: str | None, ema: bool = False) -> VisionTransformer:
        """The configured model on every rank (ZeRO-3: partitioned), with its training options."""
        config = self.config
        weights = pretrained(init_from, config.model, reset_head=config.finetune.reset_head, ema=ema) \
            if init_from else None
        model = build_model(config.model, device=self.device, ds_config=self.plan.deepspeed,
                            zero3=self.plan.zero3, weights=weights,
                            make=lambda: objective_of(config).build(config))
        model.separate_heads = model.distilled  # validation scores each head besides their average
        if config.finetune.freeze_backbone:
            model.freeze_backbone()
        if config.deepspeed.activation_checkpointing:
            model.set_grad_checkpointing(config.deepspeed.checkpoint_every_n_blocks)
        if config.model.compile:
            model.compile_blocks()
        return model

    def build_loader(self) -> TrainLoader:
        c, env, plan = self.config, self.env, self.plan
        if c.data.decode == "gpu":
            transform = DeviceTrainTransform(c.model.image_size, c.data.crop_scale, c.data.crop_ratio, c.data.hflip)
            if self.device.type != "cuda" and self.is_main:
                log.warning("data.decode=gpu on %s: JPEGs are decoded in the training process, on the CPU",
                            self.device)
        else:
            transform = TrainTransform(c.model.image_size, c.data.crop_scale, c.data.crop_ratio, c.data.hflip,
                                       c.data.randaugment)
        stream = TrainStream(plan.train_shards, transform, batch_size=plan.micro_batch, seed=c.run.seed, rank=env.rank,
                             world_size=env.world_size, num_workers=c.data.num_workers,
                             samples_per_epoch=plan.samples_per_epoch, shuffle_buffer=plan.shuffle_buffer,
                             num_classes=c.model.num_classes, labels=objective_of(c).needs_labels)
        if isinstance(c.data.shuffle_buffer, ByteSize) and self.is_main:
            log.info("data.shuffle_buffer %s bytes = %d samples per worker at %.1f kB a sample (the manifest's mean)",
                     f"{int(c.data.shuffle_buffer):,}", plan.shuffle_buffer, plan.train_shards.sample_bytes / 1e3)
        return TrainLoader(stream, pin_memory=self.device.type == "cuda")

    def start_tracking(self, run_id: str | None):
        """The run's tracker (rank 0's does the work), and this node's system-metrics monitor or None."""
        c = self.config
        uri = tracking_uri(c.run.tracking_uri)
        tracker = Tracker(uri=uri, experiment=c.run.experiment, run_name=c.run.name, tags=stage_tags(c, c.run.stage),
                          run_id=run_id, enabled=self.is_main, pipeline=pipeline_id(c))
        shared = [tracker.wait_started(timeout=20.0) if self.is_main else None]
        dist.broadcast_object_list(shared, src=0)  # every rank knows the run it belongs to
        tracker.run_id = shared[0] or tracker.run_id
        # One rank per node; other nodes than rank 0's only to a server (a sqlite file has one writer).
        system_metrics = None
        if self.env.local_rank == 0 and (self.is_main or not uri.startswith("sqlite:")):
            system_metrics = start_system_metrics(uri, tracker.run_id, c.run.system_metrics_interval,
                                                  resume=run_id is not None)
        if self.is_main:
            datasets = {context: describe_shards(spec, context) for spec, context in
                        ((c.data.train_shards, "training"), (c.data.eval_shards, "evaluation")) if spec}
            tracker.log_datasets(list(datasets.values()))
            tracker.model_dataset = datasets.get("evaluation")  # what checkpoints' val/* metrics measure
            tracker.log_params(c.flat())
            if self.objective.teacher_identity is not None:  # the teacher, and the run that trained it when ours
                tracker.log_teacher(self.objective.teacher_identity)
            tracker.log_text(c.to_yaml(), "config.yaml")
            tracker.log_text(json.dumps(self.plan.deepspeed, indent=2), "deepspeed.json")
            tracker.log_text(json.dumps(self.placements, indent=1), "ranks.json")
        return tracker, system_metrics

    # -- training -----------------------------------------------------------------------------

    def train_step(self, batches: Iterator[TrainBatch], meter: Meter) -> bool:
        """One optimizer step over the accumulation micro-batches, queued without a read from the
        device: the objective's loss and sums add up on the device (:class:`Meter`), and the
        ranks' agreement on a signal or a non-finite loss is read one step late
        (:class:`StopAgreement`). Returns whether to stop, as all ranks agreed."""
        c = self.config
        lr = lr_at(self.step, c.optim, self.plan.total_steps, self.peak_lr)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        nonfinite = torch.zeros((), device=self.device)
        for _ in range(self.engine.gradient_accumulation_steps()):
            with meter.timing_data():
                batch = next(batches)
            images, labels = self.decoder(batch)
            loss, sums = self.objective.step(self.engine, self.normalize(images), labels)
            # A non-finite loss gives non-finite gradients: DeepSpeed skips that optimizer step
            # (bf16.check_grad_overflow), on every rank, since the gradients are reduced.
            self.engine.backward(loss)
            self.engine.step()
            nonfinite += ~torch.isfinite(loss.detach())
            meter.add(len(images), sums)
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.step)
        self.lr = lr
        return self.stops.post(self.step, nonfinite)

    def checkpoint(self) -> bool:
        """Settle the step just taken, then save it; whether the ranks agreed to stop."""
        stop = self.stops.settle()
        self.save()
        return stop

    def train(self) -> int:
        """Train to ``total_steps`` (or ``stop_at_step``, or a signal). Returns the exit status:
        0, or :data:`EXIT_PREEMPTED` after a signal-triggered save."""
        cadence = Cadence.of(self.config.train, self.plan.total_steps)
        batches = iter(self.loader)
        meter = Meter(self.objective.sums)
        bar = tqdm(total=self.plan.total_steps, initial=self.step, disable=not self.is_main, desc=self.config.run.name,
                   unit="step", dynamic_ncols=True)
        postfix: dict[str, str] = {}
        status = 0
        try:
            while not cadence.should_end(self.step):
                stop = self.train_step(batches, meter)
                bar.update(1)
                if cadence.should_log(self.step):
                    record = self.log_window(meter)
                    postfix.update(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                   img_s=f"{record['images_per_s']:.0f}")
                    bar.set_postfix(postfix)
                saved = stop or cadence.should_checkpoint(self.step)
                if saved:
                    stop |= self.checkpoint()
                if not stop and cadence.should_validate(self.step):
                    try:
                        record = self.validate(meter)
                        key = "knn/top1" if self.knn else self.objective.headline
                        postfix[key.replace("/", "_")] = f"{record[key]:.4f}"
                        bar.set_postfix(postfix)
                    except Preempted as e:
                        log.warning("validation at step %d stopped: %s", self.step, e)
                        stop = True  # every rank left the validation at the same batch
                        if not saved:
                            self.checkpoint()
                if stop:
                    log.warning("saved step %d after %s; exiting with %d for a requeue", self.step,
                                signals.received() or "a signal on another rank", EXIT_PREEMPTED)
                    if self.is_main:
                        signals.mark_preempted(f"step {self.step}")
                    status = EXIT_PREEMPTED
                    break
        finally:
            bar.close()
        return status

    def validate(self, meter: Meter) -> dict:
        """What the objective measures over the evaluation stream (classification: top-1, top-5
        and loss), of the weights and of their EMA, as ``val/*`` and ``val_ema/*`` (a metrics
        line and MLflow, at this step). Every rank runs
        the stream's batches; the time it takes (``val/time_s``) is kept out of the training
        window's images/s, and the RNG is left as it was, so training goes on as without it.
        Compiled blocks run eagerly here: eval mode and no_grad would recompile them (eating into
        dynamo's recompile limit, after which training too runs eagerly), and under ZeRO-3 ranks
        could leave the compiled path at different calls, with different collectives (a hang
        seen in gpu-check's chain)."""
        start, rng = time.perf_counter(), rng_state()
        record: dict = {"step": self.step}
        self.engine.eval()
        try:
            with torch.compiler.set_stance("force_eager"):
                if self.eval_stream is not None:
                    record.update(self.objective.validate(self.engine, self.eval_stream, self.normalize, "val"))
                    if self.ema is not None:
                        with self.ema.swapped_in():
                            record.update(self.objective.validate(self.engine, self.eval_stream, self.normalize,
                                                                  "val_ema"))
                if self.knn:
                    k = self.config.knn
                    record["knn/top1"] = knn_top1(self.engine, *self.knn, self.normalize, self.plan.dtype, k=k.k,
                                                  temperature=k.temperature,
                                                  num_classes=len(self.plan.knn_shards[0].classes),
                                                  zero3=self.plan.zero3, show=self.is_main)
        finally:
            self.engine.train()
            set_rng_state(rng)
        record["val/time_s"] = time.perf_counter() - start
        meter.exclude(record["val/time_s"])
        self.metrics.write(record)
        picture = self.objective.picture() if self.is_main else None
        if picture is not None:  # e.g. MAE's reconstructions, beside the metrics of this step
            from PIL import Image

            path = self.run_dir / "pictures" / f"step{self.step:08d}.png"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(picture).save(path)
            self.tracker.log_artifact(path, "pictures")
        if self.is_main:
            log.info("step %d: %s", self.step, ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "step"))
        return record

    def log_window(self, meter: Meter) -> dict:
        """Reduce the window's figures over ranks, write one metrics line, reset the window."""
        elapsed, wait_frac = meter.window()
        host = torch.tensor([meter.count, self.loader.skipped + self.decoder.failed], dtype=torch.float64)
        sums = torch.cat([meter.totals(self.device), host.to(self.device)])
        dist.all_reduce(sums)
        *totals, images, skipped = sums.tolist()
        images_per_s = images / elapsed
        tflops = images_per_s / self.env.world_size * self.plan.flops_per_image / 1e12
        grad_norm = self.engine.get_global_grad_norm()
        record = {
            "step": self.step,
            **self.objective.record(dict(zip(meter.names, totals)), images, images_per_s / self.env.world_size),
            "lr": self.lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "images_per_s": images_per_s,
            "tflops_per_device": tflops,
            "mfu": tflops / self.peak_tflops if self.peak_tflops else None,
            "data_wait_frac": wait_frac,
            "max_memory_gb": max_memory_gb(self.device),
            "data/skipped": int(skipped),
            "epoch": self.loader.batches * self.loader.stream.batch_size * self.env.world_size
            / self.loader.stream.samples_per_epoch,
        }
        self.metrics.write(record)
        meter.reset()
        return record

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The client state saved with each checkpoint (collective: gathers every rank's part)."""
        ranks = [None] * self.env.world_size
        dist.all_gather_object(ranks, {"data": self.loader.state_dict(), "rng": rng_state()})
        return {
            "step": self.step,
            "bad_steps": self.stops.bad_steps,
            "world_size": self.env.world_size,
            "ranks": ranks,
            "mlflow_run_id": self.tracker.run_id,
            "teacher": self.objective.teacher_identity,
            "config": self.config.to_yaml(),
            # Lets DeepSpeed's ds_to_universal convert ZeRO-1/2 checkpoints too.
            "universal_checkpoint_info": {"universal_checkpoint_version": 0.2},
        }

    def load_state_dict(self, state: dict) -> None:
        check_same_teacher(state.get("teacher"), self.objective.teacher_identity, self.plan.resume)
        self.step, self.stops.bad_steps = int(state["step"]), int(state.get("bad_steps", 0))
        ranks = state["ranks"]
        if state["world_size"] == self.env.world_size:
            self.loader.load_state_dict(ranks[self.env.rank]["data"])
            set_rng_state(ranks[self.env.rank]["rng"])
        else:  # another world size: the stream restarts on a fresh epoch (the loader warns)
            self.loader.load_state_dict(ranks[0]["data"])
            seed_everything(self.config.run.seed + 1000 * self.env.rank + self.step)

    def save(self) -> Path:
        """Save a checkpoint (collective); rank 0 logs it as an MLflow LoggedModel, and marks the
        ones pruned, through the tracker's queue."""
        path = self.checkpoints.save(self.engine, self.step, self.state_dict(), ckpt.model_signature(self.config),
                                     extra=self.ema.save if self.ema is not None else None, run_id=self.tracker.run_id,
                                     objective=self.config.objective)
        if self.is_main:
            self.tracker.log_checkpoint(self.step, path, ckpt.complete_checkpoints(self.checkpoints.directory))
        return path

    def close(self, status: str = "FINISHED") -> None:
        if self.system_metrics is not None:
            self.system_metrics.finish()
        if self.tracker is not None:
            self.tracker.close(status)
