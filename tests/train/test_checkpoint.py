import json

import pytest

from pipeline.train.checkpoint import (
    COMPLETE, Checkpointer, check_model, complete_checkpoints, resolve_resume, tag_for,
)


def fake_checkpoint(directory, step, complete=True, model=None):
    path = directory / tag_for(step)
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (path / COMPLETE).write_text(json.dumps({"step": step, "world_size": 2, "model": model or {"variant": "L/16"}}))
    return path


def test_resume_picks_the_newest_complete_checkpoint(tmp_path):
    assert resolve_resume("auto", tmp_path / "none") is None
    fake_checkpoint(tmp_path, 100)
    fake_checkpoint(tmp_path, 200)
    fake_checkpoint(tmp_path, 300, complete=False)  # a crash or a full disk mid-save
    assert resolve_resume("auto", tmp_path).name == "step00000200"
    assert resolve_resume("never", tmp_path) is None
    assert resolve_resume(str(tmp_path / "step00000100"), tmp_path / "other").name == "step00000100"
    assert resolve_resume(str(tmp_path), tmp_path / "other").name == "step00000200"
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_resume(str(tmp_path / "step00000300"), tmp_path)


def test_prune_keeps_the_last_k_and_old_incomplete_ones_go(tmp_path):
    for step in (1, 2, 3, 4):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 0, complete=False)
    fake_checkpoint(tmp_path, 5, complete=False)  # newer than the newest complete: may be in progress
    Checkpointer(tmp_path, keep=2, rank=0)._prune()
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step00000003", "step00000004"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step00000003", "step00000004", "step00000005"]


def test_checkpoint_of_another_model_names_the_difference(tmp_path):
    path = fake_checkpoint(tmp_path, 1, model={"variant": "L/16", "image_size": 224, "num_classes": 1000})
    check_model(path, {"variant": "L/16", "image_size": 224, "num_classes": 1000})
    with pytest.raises(ValueError, match=r"another model \(variant: checkpoint 'L/16', config 'H/14', num_classes"):
        check_model(path, {"variant": "H/14", "image_size": 224, "num_classes": 21843})
