"""A big CT through BTCV inference: today's pipeline against the planned one, peak RSS and time, one run.

    python -m bench.big_volume [--z 240] [--xy 512] [--overlap 0.25] [--out bench/results/big_volume_CPU_<date>.json]

The benchmark builds a body-shaped CT (``--xy`` x ``--xy`` x ``--z`` int16 voxels of 0.7 x 0.7 x 0.8 mm,
stored as NIfTI: air outside an elliptic body, fat rim, soft tissue with noise, a spine, lungs in the upper
third), saves untrained feature_size-12 weights, and runs the BTCV bundle's ``run inference`` on it twice, each
in a fresh process, on the same input and the same weights:

- ``today``: ``configs/inference.json`` as it was before the memory plan and the outputs (MONAI's own
  ``SlidingWindowInferer``, ``--statistics False --preview False --dicom_seg False --body_crop False``);
- ``planned``: ``configs/inference.json`` as it is (the planned sliding window, statistics, preview).
(The results of 2026-12-01 were measured with the outputs wired by an override file over the
inference.json of then, which is what inference.json now holds.)

Per run: wall time of the command, peak RSS of its process (``ru_maxrss``), and the files written; then the
two label maps compared voxel for voxel, and the plan's host estimate (as the planned run logged it, and as
:func:`custom.inference.memory_plan.plan_stitching` computes it here) next to the measured peak, with
their ratio (``plan_logged_vs_peak``: at least 1 when the plan covers the run). The plan
for a full 600-slice volume is given as arithmetic (``plan_600_estimate``), not measured, when ``--z`` is
smaller. With roi 96 and 2 CPU cores a window costs about 10 s at feature_size 12 (more when the machine
is shared); at the default overlap 0.5 a 512 x 512 x 600 volume (239 x 239 x 240 at the BTCV spacing) needs
64 windows per run, over 20 minutes for the pair, hence ``--z`` 240 (96 resampled slices: one layer of
windows) and ``--overlap`` 0.25 by default (9 windows per run), the same for both runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

from bench.child import add_child_option, peak_rss_mib, run_child, serve_child
from bench.common import REPO

BUNDLE = REPO / "swin_unetr_btcv"
SPACING = (0.7, 0.7, 0.8)


def body_ct(xy: int, z: int, seed: int = 0) -> np.ndarray:
    """An int16 ``(xy, xy, z)`` CT in HU, RAS: an elliptic body with fat, soft tissue, spine, lungs above."""
    rng = np.random.default_rng(seed)
    u = (np.arange(xy) - xy / 2) / (xy / 2)
    x, y = np.meshgrid(u, u, indexing="ij")
    body = (x / 0.85) ** 2 + (y / 0.62) ** 2 <= 1
    inner = (x / 0.78) ** 2 + (y / 0.55) ** 2 <= 1
    spine = (x**2 + (y + 0.35) ** 2) <= 0.1**2
    lungs = (((x - 0.38) / 0.3) ** 2 + (y / 0.4) ** 2 <= 1) | (((x + 0.38) / 0.3) ** 2 + (y / 0.4) ** 2 <= 1)
    plane = np.full((xy, xy), -1000, np.int16)
    plane[body] = -100
    plane[inner] = 40
    out = np.empty((xy, xy, z), np.int16)
    for k in range(z):
        s = plane.copy()
        if k > 2 * z // 3:
            s[lungs & inner] = -850
        s[spine] = 700
        noise = rng.normal(0, 15, (xy, xy)).astype(np.int16)
        out[..., k] = np.where(body, s + noise, s)
    return out


def child(spec: dict) -> dict:
    """One ``run inference`` in this process (run by :func:`bench.child.run_child`): wall time and peak RSS."""
    os.chdir(BUNDLE)
    from monai.bundle import run

    t = time.perf_counter()
    error = None
    try:
        run("inference", config_file=spec["configs"], **spec["overrides"])
    except Exception as e:  # the figures of a failed run are reported, with its error
        error = f"{type(e).__name__}: {e}"[:2000]
    wall = time.perf_counter() - t
    return {"wall_s": round(wall, 1), "peak_rss_mib": peak_rss_mib(), "error": error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--xy", type=int, default=512)
    parser.add_argument("--z", type=int, default=240)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--timeout", type=int, default=290, help="seconds per run")
    parser.add_argument("--out", default=None)
    add_child_option(parser)
    args = parser.parse_args()
    if args.child:
        serve_child(args.child, child)
        return

    import nibabel as nib
    import torch
    from monai.networks.nets import SwinUNETR

    from custom.inference.memory_plan import plan_stitching

    work = Path(tempfile.mkdtemp(prefix="big_volume_"))
    inp, ckpt = work / "in", work / "models"
    inp.mkdir()
    ckpt.mkdir()
    t = time.perf_counter()
    ct = body_ct(args.xy, args.z)
    nib.save(nib.Nifti1Image(ct, np.diag([*SPACING, 1.0])), inp / "big.nii.gz")
    build_s = time.perf_counter() - t
    torch.manual_seed(0)
    torch.save(SwinUNETR(in_channels=1, out_channels=14, feature_size=12).state_dict(), ckpt / "model.pt")

    before = work / "before.json"  # inference.json without the plan and the outputs: the pipeline before them
    before.write_text(
        json.dumps(
            {
                "inferer": {
                    "_target_": "SlidingWindowInferer",
                    "roi_size": "@roi_size",
                    "sw_batch_size": "@sw_batch_size",
                    "overlap": "@overlap",
                    "mode": "gaussian",
                },
                "statistics": False,
                "preview": False,
                "dicom_seg": False,
            }
        ),
        encoding="utf-8",
    )
    runs = {}
    for name, configs in (("today", ["configs/inference.json", str(before)]), ("planned", ["configs/inference.json"])):
        out = work / f"out_{name}"
        spec = {
            "configs": configs,
            "overrides": {
                "input_dir": str(inp),
                "output_dir": str(out),
                "ckpt_dir": str(ckpt),
                "feature_size": 12,
                "overlap": args.overlap,
            },
        }
        run = run_child("bench.big_volume", spec, timeout=args.timeout)
        log, result = run.log, run.result
        result["process_s"] = round(run.seconds, 1)
        result["files"] = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        result["plan_log"] = [line.split(" - ")[-1] for line in log.splitlines() if "stitching" in line][:2]
        result["log_tail"] = log[-1500:] if result.get("error") else ""
        runs[name] = result
        print(name, json.dumps(result), flush=True)

    shape = nib.load(inp / "big.nii.gz").shape
    resampled = [round(s * sp / p) for s, sp, p in zip(shape, SPACING, (1.5, 1.5, 2.0), strict=True)]
    plan = plan_stitching(resampled, 14, (96, 96, 96), 4, "cpu", original_voxels=int(np.prod(shape)), name="big")
    z600 = [resampled[0], resampled[1], round(600 * SPACING[2] / 2.0)]
    plan600 = plan_stitching(z600, 14, (96, 96, 96), 4, "cpu", original_voxels=args.xy * args.xy * 600, name="z600")
    segs = [work / f"out_{n}" / "big_seg.nii.gz" for n in ("today", "planned")]
    same = None
    if all(p.is_file() for p in segs):
        a, b = (np.asarray(nib.load(p).dataobj) for p in segs)
        same = bool(np.array_equal(a, b))
    result = {
        "input": {"shape": list(shape), "spacing_mm": list(SPACING), "dtype": "int16", "build_s": round(build_s, 1)},
        "resampled_shape": resampled,
        "overlap": args.overlap,
        "roi_size": [96, 96, 96],
        "sw_batch_size": 4,
        "feature_size": 12,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "runs": runs,
        "label_maps_identical": same,
        "plan_host_estimate_mib": round(plan.host_bytes / 2**20),
        "plan_600_estimate": {"resampled_shape": z600, "host_mib": round(plan600.host_bytes / 2**20)},
    }
    logged = [re.search(r"on the CPU \((\d+\.\d+) GiB", line) for line in runs["planned"].get("plan_log", [])]
    logged = [float(m.group(1)) for m in logged if m]
    if logged:
        result["plan_logged_host_gib"] = logged[0]
        if "peak_rss_mib" in runs["planned"]:
            result["plan_logged_vs_peak"] = round(logged[0] * 1024 / runs["planned"]["peak_rss_mib"], 3)
    if all("peak_rss_mib" in runs[n] for n in runs):
        result["peak_rss_ratio_planned_vs_today"] = round(
            runs["planned"]["peak_rss_mib"] / runs["today"]["peak_rss_mib"], 3
        )
        result["time_ratio_planned_vs_today"] = round(runs["planned"]["wall_s"] / runs["today"]["wall_s"], 3)
    preview = work / "out_planned" / "big_preview.png"
    if preview.is_file():  # kept to be looked at
        shutil.copy(preview, Path(tempfile.gettempdir()) / "big_volume_preview.png")
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=4))
    out = Path(args.out or REPO / "bench" / "results" / f"big_volume_CPU_{date.today().isoformat()}.json")
    out.write_text(json.dumps(result, indent=4) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
