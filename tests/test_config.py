from pathlib import Path

import pytest
import yaml
from pydantic import ByteSize

from pipeline.config import CONFIG_DIR, Config, ConfigError, load_config

SHIPPED = sorted(CONFIG_DIR.rglob("*.yaml"))


def test_configs_are_shipped():
    names = {p.relative_to(CONFIG_DIR).as_posix() for p in SHIPPED}
    assert {"vit_l16.yaml", "vit_h14.yaml", "demo/pretrain.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(CONFIG_DIR).as_posix())
def test_every_shipped_config_validates(path):
    config = load_config(path)
    assert isinstance(config, Config)
    assert config.model.image_size % config.model.patch_size == 0


def test_bare_name_lookup_and_inheritance():
    h14 = load_config("vit_h14.yaml")
    assert h14.model.variant == "H/14"
    assert h14.optim.lr == pytest.approx(3e-4)  # set by vit_h14.yaml
    assert h14.train.global_batch_size == 4096  # inherited from vit_l16.yaml
    assert h14.deepspeed.zero_stage == 1 and h14.data.num_workers == 12  # set by vit_h14.yaml; inherited
    assert load_config("demo/pretrain").model.variant == "pico/2"  # .yaml may be left off


def test_dotted_overrides_are_yaml_scalars():
    c = load_config("vit_l16", ["optim.lr=3e-4", "deepspeed.zero_stage=3", "train.stop_at_step=7",
                                "run.tracking_uri=http://127.0.0.1:5000", "data.mean=[0.1, 0.2, 0.3]"])
    assert c.optim.lr == pytest.approx(3e-4) and isinstance(c.optim.lr, float)
    assert c.deepspeed.zero_stage == 3
    assert c.train.stop_at_step == 7
    assert c.run.tracking_uri == "http://127.0.0.1:5000"
    assert c.data.mean == (0.1, 0.2, 0.3)


def test_override_order_file_beats_parent_and_cli_beats_file(write_yaml):
    write_yaml("base.yaml", "optim: {lr: 0.1, weight_decay: 0.2}\nrun: {name: base}\n")
    child = write_yaml("sub/child.yaml", "inherit: ../base.yaml\noptim: {lr: 0.01}\n")
    c = load_config(child, ["run.name=cli"])
    assert (c.optim.lr, c.optim.weight_decay, c.run.name) == (0.01, 0.2, "cli")


def test_unknown_key_names_file_key_and_suggestion(write_yaml):
    path = write_yaml("bad.yaml", "optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and "'optim.lrr'" in str(e.value) and "'optim.lr'" in str(e.value)


def test_unknown_key_in_parent_names_the_parent_file(write_yaml):
    parent = write_yaml("parent.yaml", "train:\n  micro_batch: 4\n")
    child = write_yaml("child.yaml", "inherit: parent.yaml\n")
    with pytest.raises(ConfigError) as e:
        load_config(child)
    assert str(parent) in str(e.value) and "train.micro_batch_size" in str(e.value)


def test_unknown_override_names_the_command_line():
    with pytest.raises(ConfigError, match=r"command line.*'deepspeed.zero_stag'.*'deepspeed.zero_stage'"):
        load_config("vit_l16", ["deepspeed.zero_stag=3"])


def test_unknown_section_suggests_the_section(write_yaml):
    with pytest.raises(ConfigError, match=r"'optimizer'.*did you mean 'optim'"):
        load_config(write_yaml("s.yaml", "optimizer: {lr: 1}\n"))


def test_wrong_type_names_key_file_and_value(write_yaml):
    path = write_yaml("t.yaml", "train:\n  micro_batch_size: lots\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert str(path) in message and "train.micro_batch_size" in message and "'lots'" in message


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"deepspeed.zero_stage"):
        load_config("vit_l16", ["deepspeed.zero_stage=4"])
    with pytest.raises(ConfigError, match=r"run.stage.*'pretrain' or 'finetune'"):
        load_config("vit_l16", ["run.stage=train"])


def test_image_size_must_divide_by_patch():
    with pytest.raises(ConfigError, match=r"model.image_size=225 is not divisible by the patch size 16"):
        load_config("vit_l16", ["model.image_size=225"])


def test_unknown_variant_lists_sizes():
    with pytest.raises(ConfigError, match=r"unknown size 'X'.*Ti, S"):
        load_config("vit_l16", ["model.variant=X/16"])


def test_finetune_stage_needs_init_from():
    with pytest.raises(ConfigError, match=r"finetune.init_from"):
        load_config("vit_l16", ["run.stage=finetune"])
    assert load_config("vit_l16", ["run.stage=finetune", "finetune.init_from=ckpt/"]).run.stage == "finetune"


def test_skipping_non_finite_steps_needs_bf16():
    with pytest.raises(ConfigError, match=r"train.max_bad_steps needs deepspeed.precision=bf16"):
        load_config("demo/pretrain", ["train.max_bad_steps=2", "deepspeed.precision=fp32"])
    assert load_config("demo/pretrain", ["train.max_bad_steps=2"]).train.max_bad_steps == 2


def test_validation_needs_eval_shards_and_the_ema_a_zero_stage():
    with pytest.raises(ConfigError, match=r"train.eval_every validates on data.eval_shards"):
        load_config("demo/pretrain", ["data.eval_shards=null"])
    assert load_config("demo/pretrain", ["data.eval_shards=null", "train.eval_every=null"]).train.eval_every is None
    with pytest.raises(ConfigError, match=r"train.ema_decay .* deepspeed.zero_stage to 1, 2 or 3"):
        load_config("demo/pretrain", ["deepspeed.zero_stage=0"])
    with pytest.raises(ConfigError, match=r"NVMe offload"):
        load_config("demo/finetune", ["deepspeed.offload_param=nvme", "deepspeed.nvme_path=/tmp"])
    with pytest.raises(ConfigError, match=r"ema_decay"):
        load_config("demo/pretrain", ["train.ema_decay=1.0"])


def test_batch_split_over_ranks_and_the_micro_batch_as_a_bound():
    with pytest.raises(ConfigError, match=r"does not split over 3 ranks.*train.global_batch_size=4095"):
        load_config("vit_l16", world_size=3)
    config = load_config("vit_l16", ["train.micro_batch_size=64"], world_size=16)
    assert config.micro_batch(16) == 64 and config.grad_accumulation_steps(16) == 4
    # A per-rank batch below the micro-batch, or not a multiple of it: the largest divisor below.
    assert config.micro_batch(128) == 32 and config.grad_accumulation_steps(128) == 1
    config = load_config("vit_l16", ["train.global_batch_size=480", "train.micro_batch_size=64"])
    assert config.micro_batch(8) == 60 and config.grad_accumulation_steps(8) == 1


def test_only_one_training_length():
    with pytest.raises(ConfigError, match=r"one of train.total_steps"):
        load_config("vit_l16", ["train.total_steps=10"])  # epochs is already set
    assert load_config("vit_l16", ["train.total_steps=10", "train.epochs=null"]).train.total_steps == 10


def test_override_syntax_and_missing_files(write_yaml, tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("vit_l16", ["optim.lr"])
    with pytest.raises(ConfigError, match="no_such_config"):
        load_config("no_such_config")
    with pytest.raises(ConfigError, match="inherit: 'gone.yaml' not found"):
        load_config(write_yaml("c.yaml", "inherit: gone.yaml\n"))
    with pytest.raises(ConfigError, match="inherit cycle"):
        write_yaml("a.yaml", "inherit: b.yaml\n")
        load_config(write_yaml("b.yaml", "inherit: a.yaml\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write_yaml("y.yaml", "run: [\n"))


def test_resolved_config_round_trips(tmp_path):
    config = load_config("vit_h14", ["optim.lr=5e-4"])
    path = config.save(tmp_path / "run" / "config.yaml")
    assert load_config(path) == config
    assert yaml.safe_load(path.read_text())["optim"]["lr"] == pytest.approx(5e-4)
    assert config.flat()["model.variant"] == "H/14"


def test_every_field_has_a_description():
    from pydantic import BaseModel

    def walk(schema: type[BaseModel], prefix: str):
        for name, field in schema.model_fields.items():
            assert field.description, f"{prefix}{name} has no description"
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                walk(field.annotation, f"{prefix}{name}.")

    walk(Config, "")


def test_contract_keys_exist():
    flat = Config().flat()
    for key in ["run.name", "run.stage", "run.output_dir", "run.seed", "run.experiment", "run.tracking_uri",
                "model.variant", "model.image_size", "model.num_classes", "data.train_shards", "data.eval_shards",
                "train.global_batch_size", "train.micro_batch_size", "train.total_steps", "train.stop_at_step",
                "train.log_every", "train.checkpoint_every", "optim.lr", "deepspeed.zero_stage",
                "deepspeed.activation_checkpointing", "finetune.init_from", "train.eval_every", "train.ema_decay"]:
        assert key in flat, key
    assert Path(CONFIG_DIR).is_dir()


def test_training_length_from_steps_samples_or_epochs():
    assert load_config("vit_l16").total_steps() == 90 * 14197122 // 4096  # epochs x data.samples_per_epoch
    assert load_config("vit_l16", ["train.epochs=null", "train.total_samples=4096000"]).total_steps() == 1000
    assert load_config("vit_l16", ["train.epochs=null", "train.total_steps=7"]).total_steps() == 7
    no_count = load_config("vit_l16", ["data.samples_per_epoch=null"])
    assert no_count.total_steps() is None and no_count.total_steps(samples_per_epoch=4096) == 90


def test_shuffle_buffer_is_samples_or_a_size_with_a_unit(tmp_path):
    assert load_config("vit_h14", ["data.shuffle_buffer=5000"]).data.shuffle_buffer == 5000
    size = load_config("vit_h14", ["data.shuffle_buffer=512MiB"]).data.shuffle_buffer
    assert size == 512 * 2**20 and isinstance(size, ByteSize)
    assert not isinstance(load_config("vit_h14").data.shuffle_buffer, ByteSize)
    saved = load_config("vit_h14", ["data.shuffle_buffer=512MiB"]).save(tmp_path / "config.yaml")
    reloaded = load_config(saved).data.shuffle_buffer
    assert reloaded == size and isinstance(reloaded, ByteSize)
    with pytest.raises(ConfigError, match=r"data.shuffle_buffer.*'lots'"):
        load_config("vit_h14", ["data.shuffle_buffer=lots"])
