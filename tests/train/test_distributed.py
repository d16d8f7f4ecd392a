from pipeline.train.distributed import discover


def test_deepspeed_launcher_and_torchrun(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    env = discover(local_rank_arg=1)
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (3, 8, 1, "deepspeed/torchrun")
    assert not env.is_main


def test_srun_exports_what_torch_needs(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
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
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    env = discover()
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")
