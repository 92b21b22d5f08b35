"""Measure the SSL bundle's full-size pre-training step on one GPU, through the bundle's own configs.

    python bench/ssl_bundle_gpu.py --sample_dir ../shared/data/ct_sample --out results.json

feature_size 48, 96^3 crops, batch 2 volumes x 2 crops (8 views through the model per step, as the
paper's per-GPU batch), AMP, gradient checkpointing on and off; the corpus is the real CT sample
(two copies of ``ct_full.nii.gz``, native 3 mm spacing) preprocessed by the bundle itself. Reports
the median seconds per step after warm-up, crops per second and peak GPU memory. Needs a CUDA GPU.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from btcv_bundle_gpu import REPO, bench_args, gpu_header, time_training  # noqa: E402

SSL = REPO / "swin_unetr_ssl"


def main() -> int:
    args = bench_args(__doc__, "ssl_bundle_gpu.json")
    results = gpu_header("feature_size 48, roi 96^3, batch 2 x 2 crops (8 views), AMP fp16, AdamW")
    if results is None:
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        for name in ("a", "b"):
            shutil.copy(Path(args.sample_dir) / "ct_full.nii.gz", data / f"ct_full_{name}.nii.gz")
        shutil.copy(Path(args.sample_dir) / "ct_slab.nii.gz", data / "ct_slab.nii.gz")
        datalist = data / "ssl.json"
        datalist.write_text(
            json.dumps({"training": ["ct_full_a.nii.gz", "ct_full_b.nii.gz"], "validation": ["ct_slab.nii.gz"]})
        )
        results["train"] = []
        for use_checkpoint in (True, False):
            work = Path(tmp) / f"run{int(use_checkpoint)}"
            overrides = {
                "dataset_dir": str(data),
                "datalist": [str(datalist)],
                "cache_dir": str(Path(tmp) / "cache"),
                "ckpt_dir": str(work / "models"),
                "output_dir": str(work / "outputs"),
                "use_checkpoint": use_checkpoint,
            }
            results["train"].append({"use_checkpoint": use_checkpoint, **time_training(SSL, overrides, args.steps)})
            print(json.dumps(results["train"][-1]), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
