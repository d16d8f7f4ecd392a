#!/usr/bin/env python
"""Host memory while loading pretrained weights: peak resident memory of each rank, over its
level before the load, as a share of one full fp32 copy of the weights. 2 gloo ranks on the CPU,
a ViT whose weights are rank 0's to read (a safetensors file, or a ZeRO checkpoint's fp32
partitions), built as the trainer builds it (``pipeline.model.build_model``).

    python benchmarks/load_memory.py                     # B/16 from safetensors
    python benchmarks/load_memory.py --variant L/16

Prints a table, then one JSON line. Target: no rank above 1.0 copy (plus one tensor) while loading.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from pipeline.train.distributed import free_port  # noqa: E402


def status(field: str) -> int:
    """A /proc/self/status figure in bytes: VmHWM (peak resident set, mapped file pages
    included), RssAnon (anonymous memory now: what the process holds, not the page cache)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


class AnonymousPeak(threading.Thread):
    """Samples RssAnon every millisecond; Linux keeps no peak of it."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = status("RssAnon"), True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, status("RssAnon"))
            time.sleep(0.001)


def worker(rank: int, port: int, variant: str, source: str, out: str) -> None:
    import torch.distributed as dist

    from pipeline.config import ModelConfig
    from pipeline.model import build_model
    from pipeline.train.consolidate import pretrained
    from pipeline.train.distributed import init_local_group

    init_local_group(rank, 2, port, timeout_s=1800)
    torch.set_num_threads(1)
    config = ModelConfig(variant=variant, image_size=224, num_classes=1000)
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the resident set now
    resident, anonymous, sampler = status("VmHWM"), status("RssAnon"), AnonymousPeak()
    sampler.start()
    model = build_model(config, weights=pretrained(source, config))
    sampler.running = False
    sampler.join()
    fp32 = sum(p.numel() for p in model.parameters()) * 4
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "fp32_bytes": fp32, "resident_peak_bytes": status("VmHWM") - resident,
        "anonymous_peak_bytes": max(sampler.peak, status("RssAnon")) - anonymous}))
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="B/16")
    args = parser.parse_args()

    from pipeline.config import ModelConfig
    from pipeline.model import vit_from_config
    from pipeline.model.weights import export_safetensors

    with tempfile.TemporaryDirectory() as tmp:
        model = vit_from_config(ModelConfig(variant=args.variant, image_size=224, num_classes=1000)).init_weights()
        source, _ = export_safetensors(model.state_dict(), model, Path(tmp) / "weights.safetensors")
        del model
        mp.spawn(worker, args=(free_port(), args.variant, str(source), tmp), nprocs=2, join=True)
        rows = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in (0, 1)]
    print(f"{'rank':>4}  {'anonymous peak':>14}  {'copies':>6}  {'resident peak (with mapped file)':>32}  "
          f"{'copies':>6}")
    for r in rows:
        r["anonymous_copies"] = r["anonymous_peak_bytes"] / r["fp32_bytes"]
        r["resident_copies"] = r["resident_peak_bytes"] / r["fp32_bytes"]
        print(f"{r['rank']:>4}  {r['anonymous_peak_bytes'] / 1e6:>11.0f} MB  {r['anonymous_copies']:>6.2f}  "
              f"{r['resident_peak_bytes'] / 1e6:>29.0f} MB  {r['resident_copies']:>6.2f}")
    print(json.dumps({"variant": args.variant, "source": "safetensors", "fp32_bytes": rows[0]["fp32_bytes"],
                      **{f"rank{r['rank']}_{kind}_copies": round(r[f"{kind}_copies"], 3)
                         for r in rows for kind in ("anonymous", "resident")}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
