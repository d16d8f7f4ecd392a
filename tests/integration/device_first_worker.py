"""One rank of launch/train.py with recording shims on the accelerator's ``set_device`` and on
torch.distributed's entry points (DeepSpeed and the Trainer run for real). Each rank writes the
calls it saw, in order, to ``EVENTS_DIR/rankN.json``: tests/integration/test_device_first.py.
MLflow cannot be imported here, as on a machine without it (DeepSpeed's optional import of it
fails quietly)."""

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

sys.modules["mlflow"] = None  # import mlflow raises ImportError

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402

COLLECTIVES = ["init_process_group", "new_group", "barrier", "broadcast", "broadcast_object_list", "all_reduce",
               "all_gather", "all_gather_object", "all_gather_into_tensor", "reduce_scatter_tensor", "gather_object",
               "scatter_object_list", "reduce", "monitored_barrier"]
events: list[list] = []


def record(name: str, real):
    def shim(*args, **kwargs):
        events.append([name, args[0] if name == "set_device" and args else None])
        return real(*args, **kwargs)

    return shim


accelerator = deepspeed.get_accelerator()
accelerator.set_device = record("set_device", accelerator.set_device)
for name in COLLECTIVES:
    setattr(dist, name, record(name, getattr(dist, name)))

from launch.train import main  # noqa: E402

if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    code = main(args)
    out = Path(os.environ["EVENTS_DIR"]) / f"rank{os.environ['RANK']}.json"
    out.write_text(json.dumps({"local_rank": int(os.environ["LOCAL_RANK"]), "events": events}))
    sys.exit(code)
