"""Where the host memory of BTCV ``run inference`` goes, step by step: peak RSS per transform, window, output.

    python -m bench.inference_memory --z 120 240 [--xy 512] [--roi 96] [--sw_batch_size 4] [--feature_size 12]
        [--onnx_runtime] [--overlap 0.25] [--resample_dtype float64] [--out bench/results/inference_memory_CPU_<date>.json]

For each ``--z`` the benchmark builds the body-shaped int16 CT of :mod:`bench.big_volume` (``--xy`` x ``--xy``
x ``z`` voxels of 0.7 x 0.7 x 0.8 mm), saves untrained weights, and runs the BTCV bundle's
``configs/inference.json`` as it is (``monai.bundle.run``) in a fresh process. In that process every
transform MONAI's ``Compose`` applies (preprocessing, ``Invertd`` and the inverses it runs, ``SaveImaged``),
the planned sliding window, and each per-case output handler is a step: at its start and end the
process's peak RSS is read (``VmHWM`` of ``/proc/self/status``) and reset (``echo 5 > /proc/self/clear_refs``),
so each step's peak is exact, not sampled. A nested step (the inverse of ``Spacingd`` inside ``Invertd``)
is its own step; the rest of its parent is the parent's. Per step: peak RSS, RSS at its end, and its peak
above the RSS at its start; then, over the sizes, those peaks fitted as ``a + b x original voxels`` (bytes
per original voxel: what :mod:`custom.inference.memory_plan` takes as its measured constants). RSS
figures do not depend on the machine's load; the wall times in the file do (another benchmark may share
the cores). ``--resample_dtype float32`` measures the pipeline with its ``Spacingd`` computing in float32
instead of MONAI's default float64 (patched in the measured process only; the bundle is not changed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

from bench.child import add_child_option, run_child, serve_child
from bench.common import REPO

BUNDLE = REPO / "swin_unetr_btcv"
MIB = 2**20


def _status(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


class Steps:
    """Peak RSS per step: :meth:`mark` closes the running step (its ``VmHWM``) and resets the peak."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.stack: list[str] = []
        self.start_rss = _status("VmRSS")
        self.t = time.perf_counter()
        self._reset()

    @staticmethod
    def _reset() -> None:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")

    def mark(self) -> None:
        peak, rss, now = _status("VmHWM"), _status("VmRSS"), time.perf_counter()
        self.steps.append(
            {
                "step": " / ".join(self.stack) or "outside the steps (imports, config, model, engine)",
                "peak_mib": round(peak / MIB),
                "above_start_mib": round((peak - self.start_rss) / MIB),
                "end_mib": round(rss / MIB),
                "s": round(now - self.t, 2),
            }
        )
        self._reset()
        self.start_rss, self.t = _status("VmRSS"), time.perf_counter()

    def wrap(self, name: str, fn, *args, **kwargs):
        self.mark()
        self.stack.append(name)
        try:
            return fn(*args, **kwargs)
        finally:
            self.mark()
            self.stack.pop()


def _name(t) -> str:
    f = getattr(t, "__func__", None)
    owner = getattr(t, "__self__", None)
    if f is not None and owner is not None:
        return f"{type(owner).__name__}.{f.__name__}"
    return type(t).__name__


def child(spec: dict) -> dict:
    """One ``run inference`` with every step measured (run by :func:`bench.child.run_child`): the steps."""
    os.chdir(BUNDLE)
    steps = Steps()
    import monai.transforms.compose as compose
    from monai.bundle import run

    from custom.inference import memory_plan
    from custom.inference.dicom_seg import CaseDicomSeg
    from custom.inference.preview import CasePreview
    from custom.inference.statistics import CaseStatistics

    if spec.get("resample_dtype", "float64") != "float64":  # the pipeline's Spacingd at another dtype
        import torch

        from custom.segmentation import pipeline

        dtype = getattr(torch, spec["resample_dtype"])

        class Spacingd(pipeline.Spacingd):
            def __init__(self, *args, **kwargs):
                kwargs.setdefault("dtype", dtype)
                super().__init__(*args, **kwargs)

        pipeline.Spacingd = Spacingd
    apply = compose.apply_transform

    def measured_apply(transform, data, *args, **kwargs):
        return steps.wrap(_name(transform), apply, transform, data, *args, **kwargs)

    compose.apply_transform = measured_apply
    plans = []
    window_call = memory_plan.PlannedSlidingWindowInferer.__call__

    def measured_window(self, *args, **kwargs):
        try:
            return steps.wrap("sliding window (stitching, network)", window_call, self, *args, **kwargs)
        finally:
            if self.last_plan is not None:
                plans.append({"host_mib": round(self.last_plan.host_bytes / MIB), "message": self.last_plan.message})

    memory_plan.PlannedSlidingWindowInferer.__call__ = measured_window
    for cls in (CaseStatistics, CasePreview, CaseDicomSeg):
        original = cls.write_case

        def write_case(self, *args, _original=original, _name=cls.__name__, **kwargs):
            return steps.wrap(f"{_name}.write_case", _original, self, *args, **kwargs)

        cls.write_case = write_case
    t = time.perf_counter()
    error = None
    try:
        run("inference", config_file=spec["configs"], **spec["overrides"])
    except Exception as e:  # the figures of a failed run are reported, with its error
        error = f"{type(e).__name__}: {e}"[:2000]
    wall = time.perf_counter() - t
    steps.mark()
    result = {  # the peak of the process: the largest step peak (the resets clear ru_maxrss too)
        "wall_s": round(wall, 1),
        "peak_rss_mib": max(s["peak_mib"] for s in steps.steps),
        "plans": plans,
        "steps": steps.steps,
        "error": error,
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--xy", type=int, default=512)
    parser.add_argument("--z", type=int, nargs="+", default=[120, 240])
    parser.add_argument("--roi", type=int, default=96)
    parser.add_argument("--sw_batch_size", type=int, default=4)
    parser.add_argument("--feature_size", type=int, default=12)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--resample_dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument(
        "--onnx_runtime", action="store_true", help="the windows through ONNX Runtime (the bundle's option)"
    )
    parser.add_argument("--timeout", type=int, default=600, help="seconds per run")
    parser.add_argument("--out", default=None)
    add_child_option(parser)
    args = parser.parse_args()
    if args.child:
        serve_child(args.child, child)
        return

    import nibabel as nib
    import torch
    from monai.networks.nets import SwinUNETR

    from bench.big_volume import SPACING, body_ct

    work = Path(tempfile.mkdtemp(prefix="inference_memory_"))
    ckpt = work / "models"
    ckpt.mkdir()
    torch.manual_seed(0)
    torch.save(
        SwinUNETR(in_channels=1, out_channels=14, feature_size=args.feature_size).state_dict(), ckpt / "model.pt"
    )
    runs = []
    for z in args.z:
        inp = work / f"in_{z}"
        inp.mkdir()
        nib.save(nib.Nifti1Image(body_ct(args.xy, z), np.diag([*SPACING, 1.0])), inp / "big.nii.gz")
        out = work / f"out_{z}"
        spec = {
            "configs": ["configs/inference.json"],
            "overrides": {
                "input_dir": str(inp),
                "output_dir": str(out),
                "ckpt_dir": str(ckpt),
                "feature_size": args.feature_size,
                "roi_size": [args.roi] * 3,
                "sw_batch_size": args.sw_batch_size,
                "overlap": args.overlap,
                "onnx_runtime": bool(args.onnx_runtime),
            },
            "resample_dtype": args.resample_dtype,
        }
        run = run_child("bench.inference_memory", spec, timeout=args.timeout)
        result = run.result
        if result.get("error") or run.returncode:
            result["log_tail"] = run.log[-2000:]
        result["original_shape"] = [args.xy, args.xy, z]
        result["original_voxels"] = args.xy * args.xy * z
        result["files"] = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        shutil.rmtree(inp, ignore_errors=True)
        runs.append(result)
        top = sorted(result.get("steps", []), key=lambda s: -s["peak_mib"])[:6]
        print(z, result["peak_rss_mib"] if "peak_rss_mib" in result else result, flush=True)
        for s in top:
            print("   ", s, flush=True)
    fits = {}
    if len(runs) >= 2 and all("steps" in r for r in runs):  # per step name: its largest peak, over the sizes
        names = [s["step"] for s in runs[0]["steps"]]
        n = np.array([r["original_voxels"] for r in runs], float)
        for name in dict.fromkeys(names):
            peaks = [max((s["peak_mib"] for s in r["steps"] if s["step"] == name), default=None) for r in runs]
            if None in peaks:
                continue
            b, a = np.polyfit(n, np.array(peaks, float) * MIB, 1)
            fits[name] = {"base_mib": round(a / MIB), "bytes_per_original_voxel": round(b, 1)}
        b, a = np.polyfit(n, np.array([r["peak_rss_mib"] for r in runs], float) * MIB, 1)
        fits["process peak"] = {"base_mib": round(a / MIB), "bytes_per_original_voxel": round(b, 1)}
    shutil.rmtree(work, ignore_errors=True)
    result = {
        "command": "python -m bench.inference_memory " + " ".join(sys.argv[1:]),
        "spacing_mm": list(SPACING),
        "xy": args.xy,
        "roi_size": [args.roi] * 3,
        "sw_batch_size": args.sw_batch_size,
        "feature_size": args.feature_size,
        "onnx_runtime": bool(args.onnx_runtime),
        "overlap": args.overlap,
        "resample_dtype": args.resample_dtype,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "runs": runs,
        "fits": fits,
    }
    out = Path(args.out or REPO / "bench" / "results" / f"inference_memory_CPU_{date.today().isoformat()}.json")
    out.write_text(json.dumps(result, indent=4) + "\n", encoding="utf-8")
    print(json.dumps(fits, indent=4))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
