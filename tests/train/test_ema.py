"""The EMA's decay schedule, and whole EMA tensors assembled from the ranks' checkpoint files
(the multi-rank behaviour is tests/integration/test_ema.py)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from pipeline.train.consolidate import consolidated_state_dict
from pipeline.train.ema import decay_at, ema_file, has_ema, read_ema_state


def test_decay_warms_up_as_timm_model_ema_v3():
    assert decay_at(1, 0.9999, True) == 0.0  # the first update copies the weights
    for step in (2, 10, 1000, 10**6):  # timm: 1 - (1 + t / gamma) ** -power, t = step - 1, gamma 1, power 2/3
        assert decay_at(step, 0.9999, True) == pytest.approx(min(0.9999, 1 - step ** (-2 / 3)))
    assert decay_at(10**7, 0.9999, True) == 0.9999  # capped at the decay
    assert decay_at(2, 0.9, False) == 0.9


def write_rank(checkpoint, rank, pieces: dict[str, tuple[int, list[int], torch.Tensor]]):
    path = ema_file(checkpoint, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    layout = {name: [start, shape] for name, (start, shape, _) in pieces.items()}
    save_file({name: values for name, (_, _, values) in pieces.items()}, str(path),
              metadata={"layout": json.dumps(layout), "step": "1", "decay": "0.9", "world_size": "2"})


def test_whole_tensors_are_assembled_from_each_ranks_fragments(tmp_path):
    weight = torch.arange(12, dtype=torch.float32).view(3, 4)
    write_rank(tmp_path, 0, {"w": (0, [3, 4], weight.flatten()[:7].clone())})
    write_rank(tmp_path, 1, {"w": (7, [3, 4], weight.flatten()[7:].clone()), "b": (0, [2], torch.ones(2))})
    assert has_ema(tmp_path)
    state = read_ema_state(tmp_path)
    assert state["w"].shape == (3, 4)
    torch.testing.assert_close(state["w"].contiguous(), weight, rtol=0, atol=0)
    torch.testing.assert_close(state["b"].contiguous(), torch.ones(2), rtol=0, atol=0)


def test_a_gap_in_the_fragments_is_an_error(tmp_path):
    write_rank(tmp_path, 0, {"w": (0, [4], torch.zeros(2))})
    with pytest.raises(ValueError, match=r"covers 2 of its 4 values"):
        read_ema_state(tmp_path)["w"].contiguous()


def test_asking_for_an_ema_that_is_not_there_says_why(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"holds no EMA weights .* train.ema_decay"):
        read_ema_state(tmp_path)
    with pytest.raises(ValueError, match=r"is a weights file, which holds one set of weights: EMA weights come from a "
                                         r"training checkpoint"):
        consolidated_state_dict(tmp_path / "model.safetensors", ema=True)
