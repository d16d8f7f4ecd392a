#!/usr/bin/env python
"""Write WebDataset shards from digits, an image folder or a CSV list; check existing shards, or index them.

    python launch/make_shards.py --source images:/data/crawl --out /data/crawl-shards --val-fraction 0   # no labels
    python launch/make_shards.py --source digits --out data/digits
    python launch/make_shards.py --source synthetic:4000x256 --out data/synthetic   # GPU checks, benchmarks
    python launch/make_shards.py --source imagefolder:/data/raw/train --out /data/shards --max-side 512 --procs 32
    python launch/make_shards.py --check data/digits --world-size 16 --workers 8 --num-classes 10
    python launch/make_shards.py --index /data/img2dataset-out     # manifests for shards made elsewhere
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.data.preflight import preflight
from pipeline.data.shards import shard_advice
from pipeline.data.sources import open_source
from pipeline.data.writer import DEFAULT_MAX_COUNT, index_shards, write_shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--source", help="digits | synthetic:N[xSIDE] (generated JPEGs) | imagefolder:PATH | "
                                       "images:PATH (every image under PATH, unlabelled) | "
                                       "list:FILE.csv (path,label rows, or path rows: unlabelled)")
    what.add_argument("--check", metavar="DIR", help="read every shard in DIR and report (preflight)")
    what.add_argument("--index", metavar="DIR", help="write DIR/{split}.json for shards made elsewhere, from tar "
                                                     "headers")
    parser.add_argument("--split", help="--index: the split of every shard in DIR (default: the name up to its first "
                                        "'-')")
    parser.add_argument("--out", help="output folder: DIR/{split}-NNNNNN.tar and DIR/{split}.json")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share held out as the val split (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default 0)")
    parser.add_argument("--max-count", type=int, default=DEFAULT_MAX_COUNT,
                        help=f"samples per shard at most (default {DEFAULT_MAX_COUNT})")
    parser.add_argument("--max-bytes", type=float, default=1e9, help="bytes per shard at most (default 1e9)")
    parser.add_argument("--unlabelled", action="store_true",
                        help="write no labels (.cls): shards for an objective that needs none (objective=mae)")
    parser.add_argument("--train-fraction", type=float, default=1.0,
                        help="keep this share of the train split (seeded), e.g. 0.1 for a fine-tune on 10%% of the "
                        "labels; the val split stays whole (default 1)")
    parser.add_argument("--max-side", type=int, help="re-encode images whose longer side exceeds this (JPEG q=90)")
    parser.add_argument("--world-size", type=int, default=1, help="ranks that will read the shards: the shard count "
                        "that suits them is printed")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank (data.num_workers)")
    parser.add_argument("--num-classes", type=int, help="--check: report labels outside [0, K) (model.num_classes)")
    parser.add_argument("--procs", type=int, default=1, help="processes that decode, re-encode or check images "
                        "(default 1); the output is the same for any number")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    if args.check:
        ok, report = preflight(args.check, args.world_size, args.workers, progress=not args.quiet,
                               num_classes=args.num_classes, procs=args.procs)
        print(report)
        return 0 if ok else 1
    if args.index:
        try:
            manifests = index_shards(args.index, args.split, progress=not args.quiet)
        except (OSError, ValueError) as e:
            print(f"make_shards.py --index: {e}", file=sys.stderr)
            return 1
        for split, manifest in manifests.items():
            print(f"{split}: {manifest['num_samples']} samples, {manifest['num_classes']} classes in "
                  f"{len(manifest['shards'])} shards -> {Path(args.index) / (split + '.json')}")
        return 0
    if not args.out:
        parser.error("--source needs --out")
    manifests = write_shards(
        open_source(args.source), args.out, val_fraction=args.val_fraction, seed=args.seed,
        max_count=args.max_count, max_bytes=args.max_bytes, max_side=args.max_side, progress=not args.quiet,
        procs=args.procs, unlabelled=args.unlabelled, train_fraction=args.train_fraction,
    )
    for split, manifest in manifests.items():
        skipped = f", {len(manifest['skipped'])} unreadable inputs skipped" if manifest["skipped"] else ""
        print(f"{split}: {manifest['num_samples']} samples in {len(manifest['shards'])} shards -> "
              f"{Path(args.out) / (split + '.json')}{skipped}")
        print("  " + shard_advice(manifest["num_samples"], len(manifest["shards"]), args.world_size, args.workers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
