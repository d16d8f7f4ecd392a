from pipeline.train.distributed import discover


def test_deepspeed_launcher_and_torchrun(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    env = discover(local_rank_arg=1)
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (3, 8, 1, "deepspeed/torchrun")
    assert not env.is_main


EXPORTED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def unset(monkeypatch, *keys: str) -> None:
    """Remove ``keys`` so that monkeypatch restores them as they were (absent, most often) after
    discover() exports them: no later test's subprocess inherits this test's rank and master."""
    for key in keys:
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)


def test_srun_exports_what_torch_needs(monkeypatch):
    unset(monkeypatch, *EXPORTED)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "5")
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu-node-[01-02]")
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol here: fall back to the list's first entry
    env = discover()
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (5, 16, 5, "srun")
    import os

    assert os.environ["RANK"] == "5" and os.environ["WORLD_SIZE"] == "16" and os.environ["MASTER_PORT"] == "29734"
    assert os.environ["MASTER_ADDR"]


def test_single_process(monkeypatch):
    import os
    import socket

    unset(monkeypatch, *EXPORTED, "SLURM_PROCID", "SLURM_NTASKS")
    with socket.socket() as other:  # another run on this host holds torch's default port
        try:
            other.bind(("127.0.0.1", 29500))
        except OSError:
            pass  # held already
        env = discover()
        assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")
        with socket.socket() as ours:  # a group of one takes a free port, not the fixed one
            ours.bind(("127.0.0.1", int(os.environ["MASTER_PORT"])))


def test_threads_fit_the_cores_a_rank_may_run_on(monkeypatch, caplog):
    import os

    import torch

    from pipeline.train.distributed import set_cpu_threads

    before = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5, 6, 7})
    for key in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(key, raising=False)
    try:
        assert set_cpu_threads(1, warn=True) == 3 and torch.get_num_threads() == 3  # 4 cores less 1 worker
        assert not caplog.records
        assert set_cpu_threads(6, warn=True) == 1
        assert "data.num_workers=6: this rank has 4 core(s)" in caplog.text
        assert "--cpus-per-task=7" in caplog.text and "data.num_workers=3" in caplog.text
        monkeypatch.setattr(os, "cpu_count", lambda: 4)  # not bound: a share of the node's cores
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert set_cpu_threads(1, warn=False) == 1  # 4 cores / 2 local ranks, less 1 worker
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's setting wins
        assert set_cpu_threads(1, warn=False) == 2
    finally:
        torch.set_num_threads(before)


def _placement(rank, host, local, master_ip="10.0.0.2"):
    return {"rank": rank, "local_rank": local, "host": host, "master": "n1:29500", "master_ip": master_ip,
            "cpus": [local], "threads": 1, "device": "cpu"}


def test_placements_refuse_duplicate_local_ranks_and_split_masters():
    import pytest

    from pipeline.train.distributed import check_placements, describe_placements

    good = [_placement(r, f"n{r // 2 + 1}", r % 2) for r in range(4)]
    check_placements(good)
    assert describe_placements(good).startswith("4 ranks on 2 host(s) (n1: 0-1, n2: 2-3), master n1:29500 (10.0.0.2)")
    global_as_local = [_placement(r, f"n{r // 2 + 1}", r // 2) for r in range(4)]  # LOCAL_RANK = node index
    with pytest.raises(RuntimeError, match="ranks 0 and 1 both run on n1 with LOCAL_RANK 0"):
        check_placements(global_as_local)
    split = good[:3] + [_placement(3, "n2", 1, master_ip="127.0.1.1")]  # 'localhost'-style MASTER_ADDR on one node
    with pytest.raises(RuntimeError, match="different addresses"):
        check_placements(split)


def test_placement_of_a_single_process():
    import torch

    from pipeline.train.distributed import DistEnv, gather_placements

    (only,) = gather_placements(DistEnv(0, 1, 0, "single"), torch.device("cpu"))
    assert only["rank"] == 0 and only["cpus"] and only["threads"] == torch.get_num_threads()
