#!/usr/bin/env python
"""Export a checkpoint's weights as a safetensors file that timm's VisionTransformer loads.

    python launch/export.py --checkpoint runs/vit_h14-ft448 --out vit_h14_448.safetensors

--checkpoint is a run directory (newest checkpoint), a checkpoints folder or one stepNNNNNNNN
checkpoint, of any ZeRO stage and world size; --ema takes its EMA weights (train.ema_decay).
Writes OUT and OUT.json (the timm arguments):

    model = timm.models.vision_transformer.VisionTransformer(**json.load(open("OUT.json")))
    model.load_state_dict(safetensors.torch.load_file("OUT"), strict=True)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run, checkpoints or stepNNNNNNNN directory")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--ema", action="store_true", help="export the EMA of the weights (the run set "
                                                           "train.ema_decay)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from pipeline.cli import user_errors
    from pipeline.train.consolidate import export_checkpoint

    with user_errors(args.debug):
        out, config_path, params = export_checkpoint(args.checkpoint, args.out, ema=args.ema)
    print(f"wrote {out} ({params:,} parameters) and {config_path}: {json.loads(config_path.read_text())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
