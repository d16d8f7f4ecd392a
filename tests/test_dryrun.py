"""The dry run: every shipped config passes at 1, 4 and 16 nodes x 8 H100 against manifests of
ImageNet size; a broken config lists every problem, each naming its key."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import CONFIG_DIR, load_config
from pipeline.data.writer import DEFAULT_MAX_COUNT
from pipeline.dryrun import dry_run, filesystem_type

from tests.helpers import ROOT

# Train / val images and classes of the datasets the shipped configs name (by folder).
DATASETS = {
    "imagenet21k": {"train": 14_197_122, "val": 102_400, "classes": 21_843},  # val: a held-out split (no official one)
    "imagenet1k": {"train": 1_281_167, "val": 50_000, "classes": 1_000},
}
REAL_CONFIGS = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))  # configs/demo/ is the CPU demo


def write_manifest(folder: Path, split: str, samples: int, classes: int) -> Path:
    """A manifest as make_shards.py writes it at its default shard size, with empty shard files
    (the dry run checks that they exist, never opens them)."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for index, start in enumerate(range(0, samples, DEFAULT_MAX_COUNT)):
        name = f"{split}-{index:06d}.tar"
        (folder / name).touch()
        shards.append({"url": name, "num_samples": min(DEFAULT_MAX_COUNT, samples - start), "num_bytes": 0})
    path = folder / f"{split}.json"
    path.write_text(json.dumps({"split": split, "num_samples": samples, "num_classes": classes,
                                "classes": [f"n{i:08d}" for i in range(classes)], "shards": shards}))
    return path


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> Path:
    """tmp/data/imagenet21k/train.json etc., mirroring the configs' /data/... paths."""
    root = tmp_path_factory.mktemp("imagenet")
    for name, sizes in DATASETS.items():
        for split in ("train", "val"):
            if sizes[split]:
                write_manifest(root / "data" / name, split, sizes[split], sizes["classes"])
    assert len(json.loads((root / "data/imagenet21k/train.json").read_text())["shards"]) == 1420
    assert len(json.loads((root / "data/imagenet1k/train.json").read_text())["shards"]) == 129
    return root


def moved_data(name: str, root: Path) -> list[str]:
    config = load_config(name)
    return [f"{section}.{key}={root}{getattr(getattr(config, section), key)}"
            for section in ("data", "knn") for key in ("train_shards", "eval_shards")
            if getattr(getattr(config, section), key)]


@pytest.mark.parametrize("nodes", [1, 4, 16])
@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_every_shipped_config_passes_the_dry_run_at_cluster_scale(name, nodes, imagenet):
    config = load_config(name)
    stage = "evaluate" if config.eval.checkpoint else "train"
    links = [config.distill.teacher, config.finetune.init_from if config.run.stage == "finetune" else None,
             config.eval.checkpoint]
    earlier = [other for other in REAL_CONFIGS for link in links  # the stages it starts from, as pipeline.sh says
               if link and load_config(other).run.run_dir == Path(link)]
    teacher = [other for other in earlier if load_config(other).run.run_dir == Path(config.distill.teacher or "")]
    ok, report, plan = dry_run(name, moved_data(name, imagenet), stage=stage, nodes=nodes, gpus_per_node=8,
                               after=earlier)
    assert ok, report
    if config.distill.type != "none":  # the teacher sized from its own (not yet run) stage's config
        assert teacher and "written by the earlier stage" in report and "teacher weights" in report
        assert plan.teacher.model.variant == load_config(teacher[0]).model.variant
    assert "dry run OK" in report and f"{nodes} node(s) x 8 H100 = {nodes * 8} GPUs" in report
    assert "written by the earlier stage" in report or "fresh weights" in report


def test_a_broken_config_lists_every_problem_with_its_key(imagenet, tmp_path):
    overrides = moved_data("vit_h14_ft448.yaml", imagenet) + [
        "train.global_batch_size=500",  # does not split over 32 ranks
        "model.num_classes=100",  # the manifest lists 1,000
        f"finetune.init_from={tmp_path}/nowhere",  # neither present nor an earlier stage's run
    ]
    (imagenet / "data/imagenet1k/train-000007.tar").rename(tmp_path / "moved.tar")
    try:
        ok, report, _ = dry_run("vit_h14_ft448.yaml", overrides, stage="train", nodes=4, gpus_per_node=8)
    finally:
        (tmp_path / "moved.tar").rename(imagenet / "data/imagenet1k/train-000007.tar")
    assert not ok
    assert "5 problem(s)" in report, report  # the classes twice: train and val (validation) manifests
    assert "train.global_batch_size=500 does not split over 32 ranks" in report
    assert "train.global_batch_size=480" in report
    assert "missing shard" in report and "train-000007.tar" in report
    assert report.count("set model.num_classes=1000") == 2 and "val.json lists 1000 classes" in report
    assert f"finetune.init_from={tmp_path}/nowhere does not exist" in report


def test_memory_that_does_not_fit_names_the_planner_recommendation(imagenet):
    overrides = moved_data("vit_h14.yaml", imagenet) + ["train.micro_batch_size=512", "train.global_batch_size=16384"]
    ok, report, _ = dry_run("vit_h14.yaml", overrides, stage="train", nodes=4, gpus_per_node=8)
    assert not ok and "does not fit" in report and "launch/plan.py recommends deepspeed.zero_stage=1" in report
    assert "train.micro_batch_size=128" in report


def test_micro_batch_is_lowered_where_the_per_rank_batch_is_smaller(imagenet):
    ok, report, _ = dry_run("vit_h14.yaml", moved_data("vit_h14.yaml", imagenet), stage="train", nodes=16,
                            gpus_per_node=8)
    assert ok and "global 4096 = micro 32 x 128 ranks x accumulation 1" in report and "lowered" in report


def test_launchers_dry_run_from_the_command_line_without_a_gpu_or_process_group(imagenet):
    cmd = [sys.executable, str(ROOT / "launch/evaluate.py"), "--config", "vit_l16_eval.yaml", "--dry-run",
           "--nodes", "2", "--gpus-per-node", "4", *moved_data("vit_l16_eval.yaml", imagenet)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 node(s) x 4 H100 = 8 GPUs" in result.stdout and "5 shards" in result.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--config", "vit_l16.yaml", "--dry-run",
                          "data.train_shards=/nonexistent/train.json"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert bad.returncode == 1 and "data.train_shards=/nonexistent/train.json" in bad.stdout


def test_sqlite_on_a_network_filesystem_is_a_warning(tmp_path):
    assert filesystem_type(tmp_path / "not-yet" / "mlflow.db") == filesystem_type(tmp_path)
    assert filesystem_type(Path("/proc/self")) == "proc"


def test_host_ram_uses_the_manifests_sample_size(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train-000000.tar").touch()
    (data / "train.json").write_text(json.dumps({"split": "train", "num_samples": 1000, "num_classes": 10,
                                                 "shards": [{"url": "train-000000.tar", "num_samples": 1000,
                                                             "num_bytes": 50_000_000}]}))
    common = ["model.num_classes=10", "data.num_workers=4", "data.shuffle_buffer=1000", "train.eval_every=null"]
    ok, report, _ = dry_run("vit_l16.yaml", [f"data.train_shards={data}/train.json", *common], stage="train", nodes=1,
                         gpus_per_node=8)
    assert ok, report
    assert "host RAM" in report and "8 ranks x 4 workers x 1,000 samples x 50 kB" in report  # 50 MB / 1,000 samples
    bare = [f"data.train_shards={data}/train-000000.tar", "data.samples_per_epoch=1000", *common[:2],
            "data.shuffle_buffer=3GB", "data.num_workers=64"]
    ok, report, _ = dry_run("vit_l16.yaml", bare, stage="train", nodes=1, gpus_per_node=8)
    assert not ok and "data.shuffle_buffer is a size (3,000,000,000 bytes)" in report and "--index" in report
    assert "over half of the 2,048 GB of a node" in report  # 8 x 64 x 3 GB of buffers


@pytest.mark.parametrize("chain", [["vit_l16.yaml", "vit_l16_ft384.yaml", "vit_l16_eval.yaml"],
                                   ["vit_h14.yaml", "vit_h14_ft448.yaml", "vit_h14_eval.yaml"]])
def test_stage_links_follow_a_moved_output_dir(chain, imagenet, tmp_path):
    """run.output_dir moved for all three stages: each link ({output_dir}/NAME) names the earlier
    stage's run in the new place, and the 4 x 8 dry run passes."""
    scratch = tmp_path / "scratch"
    for index, name in enumerate(chain):
        stage = "evaluate" if load_config(name).eval.checkpoint else "train"
        ok, report, _ = dry_run(name, moved_data(name, imagenet) + [f"run.output_dir={scratch}"], stage=stage, nodes=4,
                             gpus_per_node=8, after=chain[:index])
        assert ok, report
        if index:
            assert "written by the earlier stage" in report and str(scratch) in report, report


def test_the_wall_time_and_workers_are_checked_against_the_slurm_script(imagenet):
    """The planner's wall time is printed against slurm/pretrain.sh's --time (a warning when the job
    will have to requeue itself to finish), and workers + the rank against its --cpus-per-task."""
    from pipeline.dryrun import SLURM_DIR, sbatch_options, slurm_seconds

    options = sbatch_options(SLURM_DIR / "pretrain.sh")
    assert options["time"] == "72:00:00" and options["cpus-per-task"] == "14"
    assert [slurm_seconds(t) for t in ("90", "30:00", "72:00:00", "1-12", "2-00:30", "1-00:00:10")] == \
        [5400, 1800, 259200, 129600, 174600, 86410]
    data = moved_data("vit_h14.yaml", imagenet)
    ok, report, _ = dry_run("vit_h14.yaml", data, stage="train", nodes=4, gpus_per_node=8)
    assert ok and "wall time   33.9 h predicted" in report and "--time=72:00:00 (72.0 h) of slurm/pretrain.sh" in report
    assert "requeues itself" not in report and "--cpus-per-task" not in report
    ok, report, _ = dry_run("vit_h14.yaml", data + ["data.num_workers=14"], stage="train", nodes=1, gpus_per_node=8)
    assert ok, report
    assert "the planner predicts 100.9 h, over slurm/pretrain.sh's --time=72:00:00" in report
    assert "data.num_workers=14 workers + the rank need 15 CPUs, over slurm/pretrain.sh's --cpus-per-task=14" in report
    ok, report, _ = dry_run("vit_h14_eval.yaml", moved_data("vit_h14_eval.yaml", imagenet) + ["data.num_workers=20"],
                            stage="evaluate", nodes=1, gpus_per_node=8, after=["vit_h14_ft448.yaml"])
    assert ok and "over slurm/evaluate.sh's --cpus-per-task=14" in report, report


def test_a_knn_set_whose_classes_disagree_or_lack_labels_is_a_plan_problem(imagenet, tmp_path):
    data = moved_data("vit_l16_mae.yaml", imagenet)
    bank = f"knn.train_shards={imagenet}/data/imagenet1k/train.json"
    ok, report, _ = dry_run("vit_l16_mae.yaml", data + [bank, f"knn.eval_shards={imagenet}/data/imagenet21k/val.json"],
                            stage="train", nodes=4, gpus_per_node=8)
    assert not ok and "knn.eval_shards=" in report and "lists 21843 classes" in report and "the same" in report
    unlabelled = write_manifest(tmp_path / "crawl", "val", 1000, 0)
    manifest = json.loads(unlabelled.read_text())
    unlabelled.write_text(json.dumps({**manifest, "labelled": False}))
    ok, report, _ = dry_run("vit_l16_mae.yaml", data + [bank, f"knn.eval_shards={unlabelled}"], stage="train",
                            nodes=4, gpus_per_node=8)
    assert not ok and f"knn.eval_shards={unlabelled}: its shards carry no labels" in report
    # the MAE itself trains on them
    ok, report, _ = dry_run("vit_l16_mae.yaml", data + [f"data.train_shards={unlabelled}"], stage="train", nodes=4,
                            gpus_per_node=8)
    assert ok, report
