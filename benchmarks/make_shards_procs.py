#!/usr/bin/env python
"""Sharding speed with 1 and N processes: web-sized photos (scikit-image's, at 1600x1200, JPEG
q=90, as an image folder) re-encoded with --max-side 512 into shards, the two settings
alternating over a few rounds (median). Checks that the outputs are byte-identical.

    pip install -e '.[bench]'
    python benchmarks/make_shards_procs.py [--procs 2] [--copies 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.data_throughput import photos_as_jpeg
from pipeline.data.sources import imagefolder_source
from pipeline.data.writer import write_shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", type=int, default=2, help="processes compared with 1 (default 2)")
    parser.add_argument("--copies", type=int, default=20, help="copies of the 7 photos per class folder (default 20)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    photos = photos_as_jpeg(1600, 1200)
    with tempfile.TemporaryDirectory(prefix="shards-procs-") as tmp:
        root = Path(tmp)
        for c in range(2):  # two class folders
            (root / "raw" / f"class{c}").mkdir(parents=True)
            for i in range(args.copies):
                for j, data in enumerate(photos):
                    (root / "raw" / f"class{c}" / f"img{i:03d}-{j}.jpg").write_bytes(data)
        source = imagefolder_source(root / "raw")
        times: dict[int, list[float]] = {1: [], args.procs: []}
        for _ in range(args.rounds):
            for procs in times:
                out = root / f"out{procs}"
                start = time.perf_counter()
                write_shards(source, out, val_fraction=0.1, max_count=64, max_side=512, progress=False, procs=procs)
                times[procs].append(time.perf_counter() - start)
        outputs = [{p.name: p.read_bytes() for p in sorted((root / f"out{procs}").iterdir())} for procs in times]
        identical = outputs[0] == outputs[1]
    count = len(source.items)
    median = {procs: statistics.median(t) for procs, t in times.items()}
    print(f"{count} photos at 1600x1200 -> --max-side 512, {os.cpu_count()} cores, {args.rounds} alternating rounds "
          f"(median)")
    print(f"{'procs':>5} {'seconds':>8} {'images/s':>9}")
    for procs, seconds in median.items():
        print(f"{procs:>5} {seconds:>8.2f} {count / seconds:>9.1f}")
    speedup = median[1] / median[args.procs]
    print(f"speedup with {args.procs} processes: {speedup:.2f}x (target >= 1.4x at 2); byte-identical: {identical}")
    print(json.dumps({"images": count, "cores": os.cpu_count(), "procs": args.procs,
                      "images_per_s_1": count / median[1], f"images_per_s_{args.procs}": count / median[args.procs],
                      "speedup": speedup, "identical": identical}))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
