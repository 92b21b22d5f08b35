"""SSL corpus preprocessing throughput: volumes/s of ``preprocess_corpus`` for 1, 2, ... worker processes.

    python -m bench.corpus_bench --copies 8 --workers 1 2 --pixdim 1.5 1.5 2.0 --out bench/results/corpus.json

The corpus is ``--copies`` links to the project's real CT sample (``shared/data/ct_sample/ct_full.nii.gz``,
122 x 101 x 112 voxels of 3 mm), each under its own name, so each is decoded, resampled to ``--pixdim``
(default 1.5 x 1.5 x 2.0 mm: 244 x 202 x 168 voxels, about the size of a body CT at that spacing),
windowed, cropped and stored like any other volume. Each worker count preprocesses into a fresh
``out_dir`` (nothing to resume), timed from the call to its return (worker start-up included). The
load average before and after is recorded: on a shared machine the figures are measured under load.
Projection for ``--project`` volumes (5,050: the paper's corpus): that many divided by volumes/s; a
CT at full resolution (512 x 512 x 300, about 50x the sample's voxels) takes longer to decode, so the
projection for real CTs is a lower bound on the time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from bench.common import SAMPLE_DIR

SAMPLE = SAMPLE_DIR / "ct_full.nii.gz"


def run(copies: int, workers: list[int], pixdim: list[float] | None, project: int, sample: Path) -> dict:
    """Time ``preprocess_corpus`` over ``copies`` links to ``sample`` for each worker count."""
    from custom.data.ssl_preprocess import preprocess_corpus

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        for i in range(copies):
            os.symlink(sample.resolve(), root / "images" / f"ct{i:03d}.nii.gz")
        datalist = root / "datalist.json"
        datalist.write_text(
            json.dumps({"training": [f"images/ct{i:03d}.nii.gz" for i in range(copies)]}), encoding="utf-8"
        )
        for n in workers:
            load_before = os.getloadavg()[0]
            start = time.perf_counter()
            index_file = preprocess_corpus(datalist, root, root / f"out_{n}", pixdim=pixdim, workers=n)
            seconds = time.perf_counter() - start
            index = json.loads(index_file.read_text(encoding="utf-8"))
            rate = copies / seconds
            results.append(
                {
                    "workers": n,
                    "volumes": len(index["volumes"]),
                    "seconds": round(seconds, 2),
                    "volumes_per_s": round(rate, 3),
                    "stored_shape": index["volumes"][0]["shape"],
                    "projected_hours": round(project / rate / 3600, 2),
                    "load_average_before": round(load_before, 2),
                    "load_average_after": round(os.getloadavg()[0], 2),
                }
            )
            print(json.dumps(results[-1]), flush=True)
    return {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
        "sample": str(sample.name),
        "copies": copies,
        "pixdim": pixdim,
        "projected_volumes": project,
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=8, help="volumes in the corpus (links to the sample)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    parser.add_argument("--pixdim", type=float, nargs=3, default=[1.5, 1.5, 2.0], help="target spacing (mm)")
    parser.add_argument("--native", action="store_true", help="keep the native spacing (the SSL default)")
    parser.add_argument("--project", type=int, default=5050, help="corpus size to project the time for")
    parser.add_argument("--sample", type=Path, default=SAMPLE, help="the CT to copy")
    parser.add_argument("--out", type=Path, help="write the figures here (JSON)")
    args = parser.parse_args()
    result = run(args.copies, args.workers, None if args.native else args.pixdim, args.project, args.sample)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
