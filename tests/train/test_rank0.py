"""Rank 0 decides, the others are told: which checkpoint to resume, and the weights of a
pretrained source. Two gloo processes; rank 1 is given a different (stale, or missing) view of
the filesystem, and must still end up with rank 0's answer."""

import json
import os
from pathlib import Path

import torch
import torch.multiprocessing as mp

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from pipeline.config import ModelConfig
from pipeline.model import vit_from_config
from pipeline.model.weights import export_safetensors
from pipeline.train.checkpoint import COMPLETE, tag_for
from pipeline.train.distributed import free_port, init_local_group

MODEL = {"variant": "mu/2", "image_size": 8, "num_classes": 10}


def _spawn(fn, *args) -> None:
    mp.spawn(fn, args=(free_port(), *args), nprocs=2, join=True)


def _weights_worker(rank, port, good, out_dir):
    from pipeline.model import build_model
    from pipeline.train.consolidate import pretrained

    init_local_group(rank, 2, port)
    torch.manual_seed(rank)  # fresh weights differ: only the broadcast can make them agree
    source = good if rank == 0 else "/nonexistent/rank1-never-reads.safetensors"
    model = build_model(ModelConfig(**MODEL), weights=pretrained(source, ModelConfig(**MODEL)))
    torch.save(model.state_dict(), Path(out_dir) / f"rank{rank}.pt")
    try:  # a failure on rank 0 reaches every rank, none waits for ever
        source = "/nonexistent/both.safetensors" if rank == 0 else good
        build_model(ModelConfig(**MODEL), weights=pretrained(source, ModelConfig(**MODEL)))
        result = "no error"
    except Exception as e:  # noqa: BLE001
        result = f"{type(e).__name__}: {e}"
    (Path(out_dir) / f"error{rank}.txt").write_text(result)
    # build_model imported DeepSpeed's ZeRO code (and torch._dynamo) after the group existed: the
    # group must still be freed
    _leave_group(rank, out_dir)


def _leave_group(rank, out_dir):
    """Destroy the group and record the gloo threads left: any would outlive the interpreter and
    can abort its exit (SIGABRT, 'terminate called without an active exception')."""
    import torch.distributed as dist

    dist.destroy_process_group()
    threads = [Path(t, "comm").read_text().strip() for t in Path("/proc/self/task").iterdir()]
    (Path(out_dir) / f"threads{rank}.txt").write_text(" ".join(t for t in threads if "gloo" in t))


def test_weights_are_read_on_rank_0_and_shared(tmp_path):
    torch.manual_seed(123)
    reference = vit_from_config(ModelConfig(**MODEL)).init_weights()
    with torch.no_grad():
        reference.head.weight.normal_()  # the initial head is zero: make every tensor informative
    good, _ = export_safetensors(reference.state_dict(), reference, tmp_path / "ref.safetensors")
    _spawn(_weights_worker, str(good), str(tmp_path))
    expected = reference.state_dict()
    for rank in (0, 1):
        loaded = torch.load(tmp_path / f"rank{rank}.pt")
        assert loaded.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=f"rank {rank}: {key}")
    for rank in (0, 1):
        error = (tmp_path / f"error{rank}.txt").read_text()
        assert "both.safetensors" in error, f"rank {rank}: {error}"
        assert (tmp_path / f"threads{rank}.txt").read_text() == "", f"rank {rank}: gloo threads left"


def _resume_worker(rank, port, views, out_dir):
    from pipeline.train.checkpoint import agree_on_resume

    init_local_group(rank, 2, port)
    chosen = agree_on_resume("auto", Path(views[rank]), {"variant": "mu/2"}, world_size=2)
    (Path(out_dir) / f"resume{rank}.txt").write_text(str(chosen))
    _leave_group(rank, out_dir)


def _checkpoint(directory: Path, step: int) -> Path:
    path = directory / tag_for(step)
    path.mkdir(parents=True)
    (path / COMPLETE).write_text(json.dumps({"step": step, "world_size": 2, "model": {"variant": "mu/2"}}))
    return path


def test_every_rank_resumes_the_checkpoint_rank_0_chose(tmp_path):
    fresh, stale = tmp_path / "fresh", tmp_path / "stale"
    _checkpoint(fresh, 4)
    newest = _checkpoint(fresh, 8)
    _checkpoint(stale, 4)  # what a rank with an old directory listing would see
    _spawn(_resume_worker, [str(fresh), str(stale)], str(tmp_path))
    assert [(tmp_path / f"resume{r}.txt").read_text() for r in (0, 1)] == [str(newest)] * 2
    assert [(tmp_path / f"threads{r}.txt").read_text() for r in (0, 1)] == ["", ""], "gloo threads left"
