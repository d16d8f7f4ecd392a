"""A full disk during a checkpoint save loses nothing: on a small tmpfs (mounted here as root,
removed at teardown) a run saves at step 2, fills the disk at step 4, and stops with one error
line naming the checkpoint and the free space; step 2's checkpoint is intact and loads, step 4's
has no completion marker and is never picked for a resume."""

import os
import shutil
import subprocess

import pytest

from pipeline.train.checkpoint import COMPLETE, resolve_resume
from pipeline.train.consolidate import consolidated_state_dict

from tests.helpers import ROOT, deepspeed_cmd, launch_env, train_args

pytestmark = pytest.mark.integration


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("the full-disk test mounts a tmpfs: it needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(digits_shards, tmp_path, small_disk):
    args = ["train.checkpoint_every=2", "train.total_steps=6", "train.keep_checkpoints=5", "train.eval_every=null",
            "run.tracking_uri=none", "deepspeed.zero_stage=2", "train.ema_decay=null"]
    probe = tmp_path / "probe"  # one checkpoint's size, measured
    subprocess.run(deepspeed_cmd("launch/train.py", 1, *train_args(digits_shards, probe, "run", *args,
                                                                       "train.total_steps=2")),
                   cwd=ROOT, env=launch_env(), check=True, capture_output=True, timeout=300)
    size = sum(f.stat().st_size for f in (probe / "run/checkpoints/step00000002").rglob("*") if f.is_file())
    # Room for the run's own files and one checkpoint and a half: step 2 fits, step 4 does not.
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.5) + 2**20}", "tmpfs", str(small_disk)],
                   check=True)
    result = subprocess.run(deepspeed_cmd("launch/train.py", 1, *train_args(digits_shards, small_disk, "run", *args)),
                            cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=300)
    text = result.stdout + result.stderr
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and len(errors) == 1, text[-4000:]
    assert "step00000004" in errors[0] and "MiB free" in errors[0] and "step00000002 is intact" in errors[0], errors
    assert "Traceback" not in text
    checkpoints = small_disk / "run/checkpoints"
    assert (checkpoints / "step00000002" / COMPLETE).is_file()
    assert not (checkpoints / "step00000004" / COMPLETE).exists()
    assert resolve_resume("auto", checkpoints) == checkpoints / "step00000002"
    state = consolidated_state_dict(checkpoints / "step00000002")
    assert state["pos_embed"].isfinite().all()
    shutil.rmtree(probe)
