"""model.compile on 2 CPU ranks: compiled and eager losses agree to bf16 tolerance over 5 optimizer
steps under ZeRO-1, ZeRO-2 and ZeRO-3 with activation checkpointing and stochastic depth on 12
blocks (benchmarks/train_step.py --parity drives the real Trainer on the same in-memory
batches), and so do losses with the gradient reduction overlapped in small buckets and without;
the compiled Trainer compiles the block code at most twice, and nothing runs eagerly
past dynamo's recompile limit; and the ranks leave no DeepSpeed shared-memory buffer behind in
/dev/shm."""

import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ROOT, deepspeed_cmd, launch_env

pytestmark = pytest.mark.integration
SHM = Path("/dev/shm")


def shm_buffers() -> set[str]:
    return {p.name for p in SHM.glob("deepspeed_allreduce_buffer_*")}


def test_compiled_and_eager_losses_agree_under_zero_1_2_3():
    before = shm_buffers()
    result = subprocess.run(deepspeed_cmd("benchmarks/train_step.py", 2, "--device", "cpu", "--parity"),
                            cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    figures = json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])
    assert figures["world_size"] == 2 and sorted(figures["losses"]) == ["zero1", "zero2", "zero3"]
    for stage, losses in figures["losses"].items():
        eager, compiled = losses["eager"], losses["compiled"]
        assert len(eager) == len(compiled) == 5
        assert max(eager) - min(eager) > 1e-3, f"{stage}: the loss did not move, the comparison would prove nothing"
        assert all(abs(a - b) <= 2**-6 * max(abs(a), 1.0) for a, b in zip(eager, compiled)), (stage, losses)
    for stage, counts in figures["compile_counts"].items():
        assert counts["block_graphs"] <= 2 and counts["block_fallbacks"] == 0 and counts["graphs"] >= 1, (stage, counts)
        if stage != "zero3":  # ZeRO-3's parameter hooks break the blocks into pieces, compiled one by one
            assert counts["graphs"] <= 2, (stage, counts)
    assert figures["compile_matches_eager"] is True
    for stage, losses in figures["comm"].items():  # the overlapped reduction changes no loss
        assert losses["max_rel_diff"] <= 1e-5 and max(losses["plain"]) - min(losses["plain"]) > 1e-3, (stage, losses)
    assert sorted(figures["comm"]) == ["zero1", "zero2", "zero3"] and figures["comm_matches"] is True
    assert shm_buffers() <= before, "a rank left its DeepSpeed all-reduce buffer in /dev/shm"
