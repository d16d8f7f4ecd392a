"""The EMA of the weights under ZeRO-1, 2 and 3 on 2 CPU ranks (tests/integration/ema_worker.py):
each rank averages only its fragment of the fp32 weights, and the result must equal an EMA of the
whole fp32 weights gathered from both ranks after every step; evaluating it in place must leave
the training weights exactly as they were."""

import json

import pytest

from tests.helpers import run_deepspeed

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def results(digits_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("ema")
    run_deepspeed("tests/integration/ema_worker.py", 2, str(digits_shards), str(out))
    found = {stage: json.loads((out / f"zero{stage}.json").read_text()) for stage in (1, 2, 3)}
    found["preempted"] = [json.loads((out / f"preempted{rank}.json").read_text()) for rank in (0, 1)]
    return found


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_sharded_ema_equals_the_ema_of_gathered_weights(results, stage):
    found = results[stage]
    assert found["names_equal"]
    assert found["ema_moved"] > 1e-4  # the EMA lags the weights: the comparison below can fail
    assert found["ema_max_diff"] == 0.0  # the same fp32 arithmetic, fragment by fragment
    assert found["reload_exact"]  # saved by both ranks, loaded back as it was


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_ema_is_evaluated_in_place_and_the_weights_come_back(results, stage):
    found = results[stage]
    assert found["swapped_max_diff"] == 0.0  # inside the block the module holds bf16(EMA)
    assert found["restored_exactly"]  # after it, bit for bit the training weights
    record = found["validation"]
    for prefix in ("val", "val_ema"):
        assert 0.0 <= record[f"{prefix}/top1"] <= record[f"{prefix}/top5"] <= 1.0
        assert record[f"{prefix}/loss"] > 0
    assert record["val/loss"] != record["val_ema/loss"]  # two sets of weights were evaluated


def test_a_signal_during_validation_saves_the_step_and_asks_for_a_requeue(results):
    for rank, found in enumerate(results["preempted"]):
        assert found["exit"] == found["expected_exit"] and found["step"] == 2, (rank, found)
        assert found["saved"], rank  # step 2 was no checkpoint step: saved because of the signal
