import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from pipeline.config import CONFIG_DIR, load_config
from pipeline.flops import (
    VitShape, activation_bytes_per_image, gradient_bytes_sent_per_gpu, largest_layer_params, max_micro_batch,
    model_state_bytes, param_count,
)
from pipeline.plan import Assumptions, format_plan, plan, recommend
from pipeline.train.run_plan import JobShape, earlier_runs, resolve

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("variant, classes", [("L/16", 1000), ("H/14", 21843), ("g/14", 1000)])
@pytest.mark.parametrize("nodes, gpus_per_node", [(1, 8), (8, 8), (2, 4)])
def test_model_states_match_deepspeeds_estimators(variant, classes, nodes, gpus_per_node):
    shape = VitShape.from_variant(variant, 224, classes)
    params, gpus = param_count(shape), nodes * gpus_per_node
    zero2 = estimate_zero2_model_states_mem_needs(params, gpus_per_node, nodes, cpu_offload=False)[1]  # (cpu, gpu)
    zero3 = estimate_zero3_model_states_mem_needs(params, largest_layer_params(shape), gpus_per_node, nodes,
                                                  cpu_offload=False, cpu_offload_params=False, zero_init=True)[1]
    assert model_state_bytes(shape, 2, gpus) == zero2
    assert model_state_bytes(shape, 3, gpus) == zero3
    # Each stage partitions more: never more memory than the stage before.
    per_stage = [model_state_bytes(shape, s, gpus) for s in range(4)]
    assert per_stage == sorted(per_stage, reverse=True)
    assert per_stage[0] == 20 * params


def test_activation_model():
    shape = VitShape.from_variant("H/14", 224)
    full = activation_bytes_per_image(shape, checkpointing=False)
    ckpt = activation_bytes_per_image(shape, checkpointing=True)
    no_flash = activation_bytes_per_image(shape, checkpointing=False, flash=False)
    assert ckpt < full / 8 and no_flash > full
    s, h = shape.num_tokens, shape.width
    assert full - activation_bytes_per_image(VitShape(h, 31, 5120, 16, 14, 224), checkpointing=False) == 34 * s * h
    assert no_flash - full == shape.depth * 5 * shape.heads * s * s
    big = VitShape.from_variant("H/14", 448)  # 1025 tokens instead of 257: about 4x the activations
    assert activation_bytes_per_image(big, checkpointing=False) == pytest.approx(4 * full, rel=0.01)


def test_max_micro_batch_and_recommendation():
    shape = VitShape.from_variant("H/14", 448, 1000)
    no_ckpt = max_micro_batch(shape, 3, 32, 40e9, checkpointing=False, reserved_bytes=6e9)
    ckpt = max_micro_batch(shape, 3, 32, 40e9, checkpointing=True, reserved_bytes=6e9)
    assert 0 < no_ckpt < ckpt
    assert max_micro_batch(shape, 0, 1, 10e9, checkpointing=True) == 0  # 20 bytes/param of 632M does not fit
    memory = {(s, c): {"max_micro_batch": m} for (s, c), m in
              {(0, False): 0, (1, False): 4, (2, False): 10, (3, False): 12,
               (0, True): 0, (1, True): 40, (2, True): 80, (3, True): 90}.items()}
    assert recommend(memory, 64) == (1, True, 32)  # no stage reaches 16 without checkpointing
    assert recommend(memory, 8) == (2, False, 8)
    memory[(0, False)]["max_micro_batch"] = 64  # stage 0 fits, but ZeRO-1 moves the same bytes and holds less
    memory[(1, False)]["max_micro_batch"] = 32
    assert recommend(memory, 64) == (1, False, 32)


def test_gradient_traffic():
    shape = VitShape.from_variant("L/16", 224)
    assert gradient_bytes_sent_per_gpu(shape, 2, 1) == 0
    two = gradient_bytes_sent_per_gpu(shape, 2, 2)
    assert two == pytest.approx(2 * param_count(shape))
    assert gradient_bytes_sent_per_gpu(shape, 3, 2) == pytest.approx(1.5 * two)


def sized(config, nodes: int, gpus_per_node: int, assume: Assumptions) -> dict:
    """The planner's figures for ``config``'s run plan on ``nodes`` x ``gpus_per_node`` GPUs."""
    return plan(resolve(config, JobShape(nodes, gpus_per_node), check_files=False), assume)


def test_plan_step_time_follows_flops():
    config = load_config("vit_l16", ["model.num_classes=1000"])
    result = sized(config, 4, 8, Assumptions(hfu=0.5, comm_overlap=1.0))
    flops = config.train.global_batch_size * result["train_gflops_per_image"] * 1e9
    recompute = 4 / 3 if result["recommended"]["activation_checkpointing"] else 1.0
    exposed = result["communication_s_per_step"] * (1 - result["communication_hidden_share"])
    assert result["step_time_s"] == pytest.approx(flops * recompute / (32 * 989.4e12 * 0.5) + exposed)
    assert result["wall_clock_hours"] == pytest.approx(result["total_steps"] * result["step_time_s"] / 3600)
    assert 0.9 < result["scaling_efficiency"]["1"] <= 1.0  # NVLink: little of the exposed all-reduce shows


def run_plan(*args):
    result = subprocess.run([sys.executable, str(ROOT / "launch/plan.py"), *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    *table, line = result.stdout.strip().splitlines()
    return "\n".join(table), json.loads(line)


def test_plan_command_prints_the_reference_figures():
    table, figures = run_plan("--config", "vit_h14.yaml", "model.num_classes=1000", "model.pre_logits=null",
                              "--nodes", "8", "--gpus-per-node", "8")
    assert figures["params"] == 632_045_800 and "632,045,800" in table
    assert figures["train_gflops_per_image"] == pytest.approx(1003.8, abs=0.1)
    for row in ("zero0", "zero2+ckpt", "zero3", "recommended", "step time", "decode cores per GPU",
                "gradient traffic", "scaling efficiency", "hfu=0.45"):
        assert row in table
    # The pretraining config as shipped carries a 1280-wide pre-logits layer; the backbone is the same.
    table, shipped = run_plan("--config", "vit_h14.yaml", "model.num_classes=1000", "--nodes", "8",
                              "--gpus-per-node", "8")
    assert shipped["params"] == 632_045_800 + 1280 * 1280 + 1280
    assert shipped["backbone_params"] == figures["backbone_params"] == 630_764_800 and "630,764,800" in table


def test_plan_assumptions_can_be_overridden():
    _, figures = run_plan("--config", "vit_l16.yaml", "--nodes", "2", "--gpus-per-node", "8", "--gpu", "a100",
                          "--set", "hfu=0.3", "--set", "inter_node_gbps=200")
    assert figures["assumptions"]["hfu"] == 0.3 and figures["assumptions"]["gpu"] == "a100"
    bad = subprocess.run([sys.executable, str(ROOT / "launch/plan.py"), "--config", "vit_l16.yaml", "--set", "mfu=1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown assumption 'mfu'" in bad.stderr


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIG_DIR.glob("*.yaml")
                                        if load_config(p.name).eval.checkpoint is None))
def test_shipped_configs_follow_the_planner_for_their_stated_cluster(name):
    """A real training config sets the ZeRO stage, micro-batch and checkpointing that
    launch/plan.py recommends on the cluster its SLURM script requests."""
    config = load_config(name)
    script = (ROOT / "slurm" / f"{config.run.stage}.sh").read_text()
    nodes = int(re.search(r"^#SBATCH --nodes=(\d+)", script, re.M).group(1))
    gpus = int(re.search(r"^#SBATCH --gpus-per-node=(\d+)", script, re.M).group(1))
    # a distillation's teacher, sized from the config of the stage that trains it
    earlier = earlier_runs([p.name for p in CONFIG_DIR.glob("*.yaml")])
    run_plan = resolve(config, JobShape(nodes, gpus), check_files=False, earlier=earlier)
    assert (run_plan.teacher is not None) == (config.distill.type != "none"), run_plan.problems
    recommended = plan(run_plan, Assumptions())["recommended"]
    assert (config.deepspeed.zero_stage, config.deepspeed.activation_checkpointing, config.train.micro_batch_size) == (
        recommended["zero_stage"], recommended["activation_checkpointing"], recommended["micro_batch_size"]), name


def test_host_ram_of_the_data_path_per_node():
    config = load_config("vit_h14.yaml")  # 12 workers a rank, 10,000 samples a buffer
    memory = sized(config, 4, 8, Assumptions(sample_kb=100.0))["host_ram_data_per_node"]
    assert memory["shuffle_gb"] == pytest.approx(8 * 12 * 10_000 * 100e3 / 1e9)
    micro = config.micro_batch(32)
    assert memory["batches_gb"] == pytest.approx(8 * (2 * 12 + 2) * micro * 3 * 224 * 224 / 1e9)
    assert memory["workers_gb"] == pytest.approx(8 * 12 * 0.25)
    assert memory["total_gb"] == pytest.approx(memory["shuffle_gb"] + memory["batches_gb"] + memory["workers_gb"])
    by_size = sized(load_config("vit_h14.yaml", ["data.shuffle_buffer=256MB"]), 4, 8, Assumptions(sample_kb=100.0))
    # the size, whatever a sample
    assert by_size["host_ram_data_per_node"]["shuffle_gb"] == pytest.approx(8 * 12 * 0.256)
    assert by_size["host_ram_data_per_node"]["buffer_samples"] == 2560
    assert "host RAM, data path" in format_plan(by_size) and "2,560 samples x 100 kB" in format_plan(by_size)


def test_hidden_communication_follows_what_deepspeed_runs():
    """ZeRO-2/3 with overlap_comm reduce in buckets during the backward pass; ZeRO-1 in bf16 with
    fp32 accumulation (DeepSpeed's BF16 optimizer) all-reduces after it; so does anything with
    overlap_comm off."""
    from pipeline.plan import hidden_comm_share

    config, assume = load_config("vit_l16"), Assumptions(comm_overlap=0.5)
    assert [hidden_comm_share(config, stage, assume) for stage in range(4)] == [0.0, 0.0, 0.5, 0.5]
    bf16_accumulation = load_config("vit_l16", ["deepspeed.grad_accum_dtype=bf16", "deepspeed.zero_stage=1"])
    assert hidden_comm_share(bf16_accumulation, 1, assume) == 0.5
    off = load_config("vit_l16", ["deepspeed.overlap_comm=false"])
    assert hidden_comm_share(off, 2, assume) == 0.0
    zero1 = sized(load_config("vit_l16", ["model.num_classes=1000"]), 4, 8, assume)
    if zero1["recommended"]["zero_stage"] == 1:
        assert zero1["communication_hidden_share"] == 0.0
