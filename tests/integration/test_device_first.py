"""Each rank makes its device current before any collective (2 CPU ranks, real DeepSpeed and
Trainer; recording shims on the accelerator's set_device and torch.distributed's entry points).
The same run trains with run.tracking_uri=none where MLflow cannot be imported."""

import json
import subprocess

import pytest

from tests.helpers import ROOT, deepspeed_cmd, launch_env, train_args

pytestmark = pytest.mark.integration


def test_device_is_set_before_the_first_collective_and_tracking_off_needs_no_mlflow(digits_shards, tmp_path):
    events = tmp_path / "events"
    events.mkdir()
    cmd = deepspeed_cmd("tests/integration/device_first_worker.py", 2,
                        *train_args(digits_shards, tmp_path, "device-first", "train.total_steps=1",
                                    "train.eval_every=null", "train.ema_decay=null", "run.tracking_uri=none"))
    result = subprocess.run(cmd, cwd=ROOT, env=launch_env(EVENTS_DIR=str(events)), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    for rank in (0, 1):
        seen = json.loads((events / f"rank{rank}.json").read_text())
        names = [name for name, _ in seen["events"]]
        assert "all_gather_object" in names and "init_process_group" in names, names  # the shims saw the run
        first_set = names.index("set_device")
        first_collective = min(i for i, name in enumerate(names) if name != "set_device")
        assert first_set < first_collective, f"rank {rank}: {names[:first_collective + 1]} before set_device"
        assert seen["events"][first_set][1] == seen["local_rank"]
