"""Build the SSL bundle's preprocessed corpus from the command line.

    python -m custom.tools.ssl_corpus --datalist a.json b.json --dataset_dir /data --out_dir /data/ssl_corpus --workers 8
    python -m custom.tools.ssl_corpus ... --shard 3/16     # one of 16 array jobs or nodes; then, once:
    python -m custom.tools.ssl_corpus --out_dir /data/ssl_corpus --merge

What the corpus is: :mod:`custom.data.ssl_preprocess`; how training reads it: :mod:`custom.data.ssl_dataset`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from custom.data.ssl_dataset import DTYPES
from custom.data.ssl_preprocess import merge_corpus, preprocess_corpus


def main(argv: list[str] | None = None) -> int:
    """``python -m custom.tools.ssl_corpus``: :func:`preprocess_corpus` (also ``--workers``, ``--shard``) or ``--merge``."""
    parser = argparse.ArgumentParser(prog="python -m custom.tools.ssl_corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("--datalist", nargs="+", help="decathlon-style datalist JSON file(s)")
    parser.add_argument("--dataset_dir", help="folder that the datalists' relative paths start from")
    parser.add_argument("--out_dir", required=True, help="corpus folder (index.json, volumes/)")
    parser.add_argument("--pixdim", nargs=3, type=float, default=None, help="resample to this spacing (mm)")
    parser.add_argument("--intensity_range", nargs=2, type=float, default=[-1000.0, 1000.0], help="HU window")
    parser.add_argument("--roi_size", nargs=3, type=int, default=[96, 96, 96], help="pad every volume to this")
    parser.add_argument("--dtype", choices=list(DTYPES), default="uint8", help="stored dtype")
    parser.add_argument("--sections", nargs="+", default=["training", "validation"], help="datalist sections")
    parser.add_argument("--overwrite", action="store_true", help="rebuild a corpus made with other settings")
    parser.add_argument("--workers", type=int, default=1, help="processes on this machine (default 1)")
    parser.add_argument("--shard", help="i/n: store every n-th image from the i-th, into parts/ (then --merge)")
    parser.add_argument("--merge", action="store_true", help="write index.json from the shards' part indexes")
    args = parser.parse_args(argv)
    if not args.merge and (not args.datalist or not args.dataset_dir):
        parser.error("--datalist and --dataset_dir are required (except with --merge)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.merge:
            index_file = merge_corpus(args.out_dir)
        else:
            index_file = preprocess_corpus(
                args.datalist,
                args.dataset_dir,
                args.out_dir,
                pixdim=args.pixdim,
                intensity_range=args.intensity_range,
                roi_size=args.roi_size,
                dtype=args.dtype,
                sections=args.sections,
                overwrite=args.overwrite,
                workers=args.workers,
                shard=args.shard,
            )
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    volumes = json.loads(index_file.read_text(encoding="utf-8"))["volumes"]
    counts: dict[str, int] = {}
    for v in volumes:
        counts[v["section"]] = counts.get(v["section"], 0) + 1
    print(f"wrote {index_file}: {len(volumes)} volume(s) {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
