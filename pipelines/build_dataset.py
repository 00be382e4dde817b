"""Build the training dataset: captioned images / video frames → subject phrases, boxes, masks, reference crops,
frame pairs and frozen-encoder caches, as Parquet shards (see docs/dataset.md).

    python pipelines/build_dataset.py                                   # tiny preset, embedded sample data
    python pipelines/build_dataset.py --config configs/sdxl.yaml --input records.jsonl --output data/ds
    RAY_ADDRESS=auto python pipelines/build_dataset.py ...              # on a running Ray cluster

Rerunning with the same output resumes (finished shards are kept); --overwrite rebuilds from scratch.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from mpalign.cli import check_writable, run_cli
from mpalign.config import add_config_args, config_from_args


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--input", default=None, help="JSONL / Parquet records or a folder of images with .txt "
                        "captions (default: data.input, else the embedded sample data)")
    parser.add_argument("--output", default=None, help="dataset folder (default: data.path)")
    parser.add_argument("--overwrite", action="store_true", help="delete what the output holds and rebuild")
    parser.add_argument("--max-shards", type=int, default=None, help="build at most this many unfinished shards")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from mpalign.data.build import build_dataset

    cfg = config_from_args(args)
    check_writable(args.output or cfg.data.path, "--output", folder=True, remote_ok=True)
    build_dataset(cfg, input=args.input, output=args.output, overwrite=args.overwrite, max_shards=args.max_shards)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
