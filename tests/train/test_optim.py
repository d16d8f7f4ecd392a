import pytest
import torch

from pipeline.config import load_config
from pipeline.model import create_vit
from pipeline.train.ds_config import build_deepspeed_config
from pipeline.train.optim import build_optimizer, layer_decay_scale, lr_at, param_groups, peak_lr


def test_no_weight_decay_on_norms_biases_pos_embed_cls_token():
    model = create_vit("mu/4", num_classes=3, image_size=8)
    config = load_config(None, ["optim.weight_decay=0.05"]).optim
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in param_groups(model, config) if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in param_groups(model, config) if g["weight_decay"] == 0 for p in g["params"]}
    assert {"pos_embed", "cls_token", "norm.weight", "blocks.0.attn.qkv.bias", "head.bias"} <= plain
    assert decayed == {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
                       "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "head.weight"}


def test_layer_decay_is_quantised_into_few_groups():
    model = create_vit("B/16", num_classes=3, image_size=32)  # 12 blocks -> 14 layer ids
    config = load_config(None, ["optim.layer_decay=0.75", "optim.layer_decay_buckets=4"]).optim
    groups = param_groups(model, config)
    scales = sorted({g["lr_scale"] for g in groups})
    assert len(scales) == 4 and len(groups) == 8  # 4 buckets x (decay, no decay)
    assert scales[-1] == 1.0
    head = next(g for g in groups if any(p is model.head.weight for p in g["params"]))
    embed = next(g for g in groups if any(p is model.pos_embed for p in g["params"]))
    assert head["lr_scale"] == 1.0 and embed["lr_scale"] == pytest.approx(0.75**10)
    assert layer_decay_scale(13, 14, 0.5, 14) == 1.0 and layer_decay_scale(0, 14, 0.5, 14) == 0.5**13  # unquantised


def test_frozen_parameters_are_left_out():
    model = create_vit("mu/4", num_classes=3, image_size=8)
    model.freeze_backbone()
    params = [p for g in param_groups(model, load_config(None).optim) for p in g["params"]]
    assert len(params) == 2


def test_schedule_warmup_then_cosine_or_linear():
    optim = load_config(None, ["optim.warmup_steps=10", "optim.min_lr=0.1", "optim.schedule=cosine"]).optim
    assert lr_at(0, optim, 100, 1.0) == pytest.approx(0.1)
    assert lr_at(9, optim, 100, 1.0) == pytest.approx(1.0)
    assert lr_at(55, optim, 100, 1.0) == pytest.approx(0.55)  # halfway through the cosine
    assert lr_at(100, optim, 100, 1.0) == pytest.approx(0.1)
    linear = optim.model_copy(update={"schedule": "linear"})
    assert lr_at(55, linear, 100, 1.0) == pytest.approx(0.55)
    assert lr_at(32, linear, 100, 1.0) == pytest.approx(0.1 + 0.9 * (1 - 22 / 90))


def test_lr_scaling_rule():
    optim = load_config(None, ["optim.lr=1e-3", "optim.lr_scaling=linear", "optim.lr_base_batch=256"]).optim
    assert peak_lr(optim, 1024) == pytest.approx(4e-3)
    assert peak_lr(optim.model_copy(update={"lr_scaling": "sqrt"}), 1024) == pytest.approx(2e-3)
    assert peak_lr(optim.model_copy(update={"lr_scaling": "none"}), 1024) == pytest.approx(1e-3)


def test_optimizers():
    model = create_vit("mu/4", num_classes=3, image_size=8)
    adamw = build_optimizer(model, load_config(None).optim, offload=False, device=torch.device("cpu"))
    assert isinstance(adamw, torch.optim.AdamW) and not adamw.defaults["fused"]
    sgd = build_optimizer(model, load_config(None, ["optim.name=sgd"]).optim, offload=False, device=torch.device("cpu"))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9


def test_deepspeed_config_from_typed_config():
    config = load_config("vit_h14", ["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=cpu",
                                     "optim.clip_grad=0.5"])
    ds = build_deepspeed_config(config, world_size=16)
    assert ds["train_batch_size"] == 4096 and ds["train_micro_batch_size_per_gpu"] == 128
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": True} and ds["gradient_clipping"] == 0.5
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["communication_data_type"] == "fp32"
    # 64 ranks: the per-rank batch (64) is below train.micro_batch_size (128), which is lowered.
    assert build_deepspeed_config(config, world_size=64)["train_micro_batch_size_per_gpu"] == 64
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu" and "offload_param" not in zero
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    fp32 = build_deepspeed_config(load_config("vit_l16", ["deepspeed.precision=fp32"]), world_size=64)
    assert fp32["bf16"] == {"enabled": False, "check_grad_overflow": True}
    assert "stage3_prefetch_bucket_size" not in fp32["zero_optimization"]
    stage0 = build_deepspeed_config(load_config("vit_l16", ["deepspeed.zero_stage=0"]), world_size=64)
    assert stage0["data_types"] == {"grad_accum_dtype": "bf16"}  # DeepSpeed accumulates in bf16 at stage 0
    with pytest.raises(Exception, match="grad_accum_dtype='fp32' needs deepspeed.zero_stage >= 1"):
        load_config("vit_l16", ["deepspeed.zero_stage=0", "deepspeed.grad_accum_dtype=fp32"])
    with pytest.raises(Exception, match="does not split over 3 ranks"):
        build_deepspeed_config(load_config("vit_l16"), world_size=3)
