"""Run by test_ema.py on 2 ranks through the deepspeed launcher: for ZeRO-1, 2 and 3 in turn,
train a few steps with train.ema_decay and keep, beside the trainer, a reference EMA of the whole
fp32 weights gathered from every rank after each step. Rank 0 writes what it found to OUT/STAGE.json.

    deepspeed --num_gpus 2 tests/integration/ema_worker.py SHARDS OUT
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.train.distributed import discover, init_process_group  # noqa: E402

STEPS, DECAY = 5, 0.8


def demo_config(shards: Path, out: Path, env, name: str, *overrides: str):
    """The demo pretraining config, small: batch 32 in micro-batches of 8, an EMA of DECAY."""
    from pipeline.config import load_config

    return load_config(ROOT / "configs/demo/pretrain.yaml", [
        f"run.output_dir={out}", f"run.name={name}", f"run.tracking_uri=sqlite:///{out}/mlflow.db",
        "run.system_metrics_interval=null", f"data.train_shards={shards}/train.json",
        f"data.eval_shards={shards}/val.json", "data.num_workers=0", "data.shuffle_buffer=50",
        "train.global_batch_size=32", "train.micro_batch_size=8", f"train.ema_decay={DECAY}", *overrides,
    ], world_size=env.world_size)


def check_stage(stage: int, shards: Path, out: Path, env) -> dict:
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param

    from pipeline.train.ema import decay_at, read_ema_state
    from pipeline.train.metrics import Meter
    from pipeline.train.trainer import Trainer

    config = demo_config(shards, out, env, f"zero{stage}", f"train.total_steps={STEPS}",
                         f"deepspeed.zero_stage={stage}", "train.eval_every=100",
                         "deepspeed.stage3_param_persistence_threshold=200")  # some ZeRO-3 parameters stay gathered
    trainer = Trainer(config, env)
    params = dict(trainer.engine.module.named_parameters())
    reference = {name: safe_get_full_fp32_param(p).clone() for name, p in params.items()}
    batches, meter = iter(trainer.loader), Meter(trainer.objective.sums)
    for step in range(1, STEPS + 1):
        trainer.train_step(batches, meter)
        for name, p in params.items():  # collective: the full fp32 weights on every rank
            reference[name].lerp_(safe_get_full_fp32_param(p), 1.0 - decay_at(step, DECAY, True))
    trainer.stops.settle()

    def module_weights() -> dict:
        with deepspeed.zero.GatheredParameters(list(params.values()), enabled=stage == 3):
            return {name: p.detach().clone() for name, p in params.items()}

    before = module_weights()
    with trainer.ema.swapped_in():
        swapped = module_weights()
    after = module_weights()
    record = trainer.validate(meter)
    ema_dir = out / f"ema{stage}"
    trainer.ema.save(ema_dir, STEPS)
    current = {name: safe_get_full_fp32_param(p).cpu() for name, p in params.items()}  # collective
    dist.barrier()
    result = {"stage": stage}
    if env.is_main:
        saved = {name: entry.contiguous() for name, entry in read_ema_state(ema_dir).items()}
        result["names_equal"] = sorted(saved) == sorted(reference)
        result["ema_max_diff"] = max((saved[n] - reference[n]).abs().max().item() for n in reference)
        result["ema_moved"] = max((reference[n] - current[n]).abs().max().item() for n in reference)
        result["swapped_max_diff"] = max(
            (swapped[n].float() - reference[n].to(swapped[n].dtype).float()).abs().max().item() for n in reference)
        result["restored_exactly"] = all(torch.equal(before[n], after[n]) for n in before)
        result["validation"] = record
    # A resumed EMA is the saved one: a fresh EMA loads it from the files of both ranks.
    fresh = type(trainer.ema)(trainer.engine, DECAY)
    fresh.load(ema_dir)
    result_ok = all(torch.equal(a, b) for a, b in zip(fresh.shadow, trainer.ema.shadow))
    flags = torch.tensor([float(result_ok)])
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    result["reload_exact"] = bool(flags.item())
    trainer.close()
    return result


def check_preemption_in_validation(shards: Path, out: Path, env) -> dict:
    """ZeRO-3: SIGUSR1 reaches rank 1 as the EMA validation at step 2 starts. Every rank leaves
    the validation at the same batch, the step is saved (it was no checkpoint step) and train()
    returns the requeue status."""
    import signal

    from pipeline.train import signals
    from pipeline.train.checkpoint import COMPLETE
    from pipeline.train.trainer import EXIT_PREEMPTED, Trainer

    config = demo_config(shards, out, env, "preempted", "train.total_steps=6", "train.eval_every=2",
                         "train.checkpoint_every=100", "deepspeed.zero_stage=3")
    trainer = Trainer(config, env)
    validate = trainer.objective.validate

    def validate_with_a_signal(engine, stream, normalize, prefix: str) -> dict:
        if prefix == "val_ema" and env.rank == 1:
            signal.raise_signal(signal.SIGUSR1)
        return validate(engine, stream, normalize, prefix)

    trainer.objective.validate = validate_with_a_signal
    try:
        code = trainer.train()
    finally:
        trainer.close("KILLED")
        signals._received = None
    checkpoint = out / "preempted/checkpoints/step00000002"
    return {"exit": code, "expected_exit": EXIT_PREEMPTED, "step": trainer.step,
            "saved": (checkpoint / COMPLETE).is_file() and (checkpoint / "ema").is_dir()}


def main() -> int:
    shards, out = Path(sys.argv[-2]), Path(sys.argv[-1])
    env = discover()
    init_process_group(env)
    import torch.distributed as dist

    try:
        for stage in (1, 2, 3):
            result = check_stage(stage, shards, out, env)
            if env.is_main:
                (out / f"zero{stage}.json").write_text(json.dumps(result))
        result = check_preemption_in_validation(shards, out, env)
        (out / f"preempted{env.rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
