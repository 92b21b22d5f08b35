"""The body crop at inference against the whole-image sliding window, in one run, on the real CT sample.

    python -m bench.body_crop_bench [--overlap 0.5] [--full] [--probe_f48] [--fov_mm 450] [--weights model.pt]
                                    [--rows no_crop,body_crop] [--out bench/results/body_crop_<device>_<date>.json]

Input: ``ct_full.nii.gz`` (``../shared/data/ct_sample``, 3 mm, chest to pelvis) resampled as the BTCV
bundle does (RAS, 1.5 x 1.5 x 2.0 mm bilinear, -175..250 HU to 0..1 clipped): a BTCV-sized volume of
about 243 x 201 x 168 voxels. ``--fov_mm`` pads it in-plane with air (0, the window's minimum) to a
wider field of view, a synthetic input labelled as such in the output.

Network: the BTCV Swin UNETR (1 -> 14 channels, SDPA attention as the bundles run it), seeded random
weights, feature_size 12 (``--full``: 48), or the weights in ``--weights`` (a ``model.pt`` the bundle
wrote); ROI 96^3, ``sw_batch_size`` 4, gaussian blending, ``--overlap`` (the bundles' 0.5 by default).

Rows (``--rows``), each in a fresh process (so peak RSS is its own): ``no_crop`` (MONAI's
``SlidingWindowInferer`` on the whole image), ``body_crop`` (``custom.inference.body_crop.
BodyCropInferer`` around the same inferer, the default ``tiling="aligned"``: the whole image's windows
that meet the body box) and ``body_crop_box`` (``tiling="box"``: the body box tiled afresh). Each row
reports windows run, seconds per volume (the inferer call, body detection included, after one
warm-up batch), peak RSS; each crop row the ratio to ``no_crop``, the label agreement inside the body
box (aligned: identical by construction) and inside the run box, and the voxels outside the run box
that the uncropped run labelled as an organ. With random weights the agreement says how often the
argmax of an untrained network moves, not what a trained one does: pass ``--weights`` for that.
Windows are also counted (not run) for the image padded with air to 400, 450 and 500 mm.

Also in the same run: the CPU's FP32 matrix-multiply throughput (``torch.matmul`` of 2048^2 matrices,
best of 5: the practical peak), the forward FLOP count of one 96^3 window at f12 and at f48 (torch's
flop counter on the meta device: no arithmetic), the achieved GFLOP/s as a fraction of the peak, and
an estimate (labelled) of an f48 run: windows x seconds per f48 window, the latter measured on one
window (no warm-up: an upper bound) when ``--probe_f48`` is given, and the floor set by the peak.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.child import add_child_option, peak_rss_gib, run_child, serve_child
from bench.common import SAMPLE_DIR

SAMPLE = SAMPLE_DIR / "ct_full.nii.gz"
PIXDIM = (1.5, 1.5, 2.0)
WINDOW = (-175.0, 250.0)
ROI = (96, 96, 96)
NUM_CLASSES = 14
#: the crop rows and their tiling (``BodyCropInferer(tiling=...)``)
TILINGS = {"body_crop": "aligned", "body_crop_box": "box"}
ROWS = ("no_crop", *TILINGS)


def preprocess(path: Path) -> torch.Tensor:
    """``1, 1, X, Y, Z``: the BTCV bundle's inference preprocessing of ``path``."""
    from monai.transforms import Compose, LoadImaged, Orientationd, ScaleIntensityRanged

    from custom.data.transforms import Spacingd

    transform = Compose(
        [
            LoadImaged("image", ensure_channel_first=True, image_only=True),
            Orientationd("image", axcodes="RAS"),
            Spacingd("image", pixdim=PIXDIM, mode="bilinear"),
            ScaleIntensityRanged("image", a_min=WINDOW[0], a_max=WINDOW[1], b_min=0.0, b_max=1.0, clip=True),
        ]
    )
    return transform({"image": str(path)})["image"].as_tensor().float()[None].contiguous()


def pad_fov(image: torch.Tensor, fov_mm: float | None) -> torch.Tensor:
    """``image`` padded in x and y with air (0, the window's minimum) to ``fov_mm`` wide (a synthetic input)."""
    if not fov_mm:
        return image
    extra = [max(round(fov_mm / PIXDIM[d]) - image.shape[2 + d], 0) for d in (0, 1)]
    pads = [0, 0, extra[1] // 2, extra[1] - extra[1] // 2, extra[0] // 2, extra[0] - extra[0] // 2]
    return torch.nn.functional.pad(image, pads, value=0.0).contiguous()


def network(feature_size: int, device: torch.device, weights: str | None) -> torch.nn.Module:
    """The BTCV Swin UNETR as the bundles run it (SDPA attention), seeded, or with ``weights`` loaded."""
    from monai.networks.nets import SwinUNETR

    from custom.networks.options import speed_options

    torch.manual_seed(0)
    net = SwinUNETR(1, NUM_CLASSES, feature_size=feature_size)
    if weights:
        state = torch.load(weights, map_location="cpu", weights_only=False)
        state = state.get("model", state) if isinstance(state, dict) else state
        net.load_state_dict(state)
    return speed_options(net.to(device), sdpa_attention=True).eval()


class Counting(torch.nn.Module):
    """``net`` that counts the windows it is given."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self.windows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.windows += x.shape[0]
        return self.net(x)


def run_row(row: str, image_path: str, labels_path: str, args: dict) -> dict:
    """One row in its own process: segment the image, save the label map, report windows, time, memory."""
    from monai.inferers import SlidingWindowInferer

    from custom.inference.body_crop import BodyCropInferer

    device = torch.device(args["device"])
    image = torch.load(image_path).to(device)
    net = Counting(network(args["feature_size"], device, args["weights"]))
    inferer = SlidingWindowInferer(ROI, sw_batch_size=args["sw_batch_size"], overlap=args["overlap"], mode="gaussian")
    if row in TILINGS:
        inferer = BodyCropInferer(inferer, mode="above", margin=args["margin"], outside="softmax", tiling=TILINGS[row])
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        net.net(torch.rand(args["sw_batch_size"], 1, *ROI, device=device))  # warm-up, not counted
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        start = time.perf_counter()
        logits = inferer(image, net)
        labels = logits.argmax(1).to(torch.uint8)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    torch.save(labels.cpu(), labels_path)
    result = {
        "windows": net.windows,
        "seconds": round(seconds, 2),
        "seconds_per_window": round(seconds / max(net.windows, 1), 3),
        "peak_rss_gib": peak_rss_gib(),
    }
    if device.type == "cuda":
        result["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if row in TILINGS:
        result["body_box"] = [[s.start, s.stop] for s in inferer.last_body_box] if inferer.last_body_box else None
        result["run_box"] = [[s.start, s.stop] for s in inferer.last_box] if inferer.last_box else None
        with torch.inference_mode():
            start = time.perf_counter()
            inferer.box(image)
            result["body_detection_seconds"] = round(time.perf_counter() - start, 3)
    return result


def probe_window(feature_size: int, batch: int, device: torch.device) -> float:
    """Seconds for one forward of ``batch`` 96^3 windows (after one warm-up on a GPU)."""
    net = network(feature_size, device, None)
    x = torch.rand(batch, 1, *ROI, device=device)
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        if device.type == "cuda":
            net(x)
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        net(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return time.perf_counter() - start


def gemm_gflops(device: torch.device, n: int = 2048, repeats: int = 5) -> dict:
    """FP32 ``torch.matmul`` of two n x n matrices: best and median GFLOP/s over ``repeats``."""
    a, b = torch.rand(n, n, device=device), torch.rand(n, n, device=device)
    torch.matmul(a, b)
    rates = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates.append(2 * n**3 / (time.perf_counter() - start) / 1e9)
    return {"n": n, "best_gflops": round(max(rates), 1), "median_gflops": round(statistics.median(rates), 1)}


def window_flops(feature_size: int) -> float:
    """Forward FLOPs of one 96^3 window (torch's flop counter on the meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = network(feature_size, torch.device("cpu"), None).to("meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(torch.empty(1, 1, *ROI, device="meta"))
    return float(counter.get_total_flops())


def crop_counts(image: torch.Tensor, overlap: float, margin: int, fov_mm: float | None) -> dict:
    """Windows without the crop and with each tiling for ``image`` padded in-plane to ``fov_mm`` (counted, not run)."""
    from monai.inferers import SlidingWindowInferer

    from custom.inference.body_crop import BodyCropInferer, count_windows, roi_box, window_box

    padded = pad_fov(image, fov_mm)
    spatial = tuple(padded.shape[2:])
    body = BodyCropInferer(SlidingWindowInferer(ROI, 1, overlap), margin=margin).box(padded)
    counts = {"fov_mm": fov_mm, "shape": list(spatial), "no_crop": count_windows(spatial, ROI, overlap)}
    for row, tiling in TILINGS.items():
        box = (
            (window_box(body, spatial, ROI, overlap) if tiling == "aligned" else roi_box(body, spatial, ROI))
            if body
            else None
        )
        counts[row] = (
            min(count_windows([s.stop - s.start for s in box], ROI, overlap), counts["no_crop"])
            if box
            else counts["no_crop"]
        )
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default=str(SAMPLE))
    parser.add_argument("--full", action="store_true", help="feature_size 48 (default 12)")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--sw_batch_size", type=int, default=4)
    parser.add_argument("--margin", type=int, default=4)
    parser.add_argument("--fov_mm", type=float, default=None, help="pad in-plane with air to this width (synthetic)")
    parser.add_argument("--weights", default=None, help="a model.pt of the BTCV bundle (feature size must match)")
    parser.add_argument("--probe_f48", action="store_true", help="time one batch of f48 windows (for the estimate)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, no_crop first; of {ROWS}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    add_child_option(parser)
    args = parser.parse_args()
    if args.child:
        serve_child(args.child, lambda s: run_row(s["row"], s["image_path"], s["labels_path"], s["args"]))
        return
    args.rows = args.rows.split(",")
    if args.rows[0] != "no_crop" or not set(args.rows) <= set(ROWS):
        parser.error(f"--rows {args.rows}: no_crop first, then any of {ROWS[1:]}")
    device = torch.device(args.device)
    feature_size = 48 if args.full else 12

    base = preprocess(Path(args.image))
    image = pad_fov(base, args.fov_mm)
    result: dict = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()}",
        "threads": torch.get_num_threads(),
        "image": Path(args.image).name
        + (f" padded in-plane with air to {args.fov_mm} mm (synthetic)" * bool(args.fov_mm)),
        "shape": list(image.shape[2:]),
        "settings": {
            "feature_size": feature_size,
            "roi_size": list(ROI),
            "overlap": args.overlap,
            "sw_batch_size": args.sw_batch_size,
            "margin": args.margin,
            "weights": args.weights or "seeded random",
        },
        "gemm_fp32": gemm_gflops(device),
    }
    print(f"{result['image']} {result['shape']}, {result['device']}, {result['threads']} threads", flush=True)
    print(f"GEMM fp32 peak: {result['gemm_fp32']['best_gflops']} GFLOP/s", flush=True)

    rows: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        image_path = f"{tmp}/image.pt"
        torch.save(image, image_path)
        run_args = {
            "device": args.device,
            "feature_size": feature_size,
            "weights": args.weights,
            "sw_batch_size": args.sw_batch_size,
            "overlap": args.overlap,
            "margin": args.margin,
        }
        labels = {}
        for row in args.rows:
            spec = {"row": row, "image_path": image_path, "labels_path": f"{tmp}/{row}.pt", "args": run_args}
            rows[row] = run_child("bench.body_crop_bench", spec, check=True, echo=True).result
            labels[row] = torch.load(f"{tmp}/{row}.pt")[0]
            print(f"{row}: {rows[row]}", flush=True)
    result["rows"] = rows

    no_crop = rows["no_crop"]
    for row in args.rows[1:]:
        same = labels["no_crop"] == labels[row]
        for name in ("body_box", "run_box"):
            box = rows[row].get(name)
            keep = torch.zeros(same.shape, dtype=torch.bool)
            keep[tuple(slice(a, b) for a, b in box) if box else ...] = True
            rows[row][f"agreement_inside_{name}"] = round(float(same[keep].float().mean()), 6)
            rows[row][f"voxels_inside_{name}"] = int(keep.sum())
        rows[row]["voxels_outside_run_box"] = int((~keep).sum())
        rows[row]["organ_voxels_outside_run_box_no_crop"] = int((labels["no_crop"][~keep] != 0).sum())
        rows[row]["ratio_seconds_no_crop_over_this"] = round(no_crop["seconds"] / rows[row]["seconds"], 3)
        rows[row]["ratio_windows_no_crop_over_this"] = round(no_crop["windows"] / rows[row]["windows"], 3)
        print(
            f"{row}: windows {no_crop['windows']} -> {rows[row]['windows']}, seconds/volume {no_crop['seconds']} -> "
            f"{rows[row]['seconds']} (ratio {rows[row]['ratio_seconds_no_crop_over_this']}x), peak RSS "
            f"{no_crop['peak_rss_gib']} -> {rows[row]['peak_rss_gib']} GiB, label agreement inside the body box "
            f"{rows[row]['agreement_inside_body_box']:.4%} (run box {rows[row]['agreement_inside_run_box']:.4%}), "
            f"organ voxels outside the run box (no crop): {rows[row]['organ_voxels_outside_run_box_no_crop']} of "
            f"{rows[row]['voxels_outside_run_box']}",
            flush=True,
        )

    flops = {fs: window_flops(fs) for fs in (feature_size, 48)}
    peak = result["gemm_fp32"]["best_gflops"]
    achieved = flops[feature_size] / 1e9 / rows["no_crop"]["seconds_per_window"]
    result["flops_per_window_tflop"] = {f"f{fs}": round(v / 1e12, 4) for fs, v in flops.items()}
    result["achieved_gflops_no_crop"] = round(achieved, 1)
    result["fraction_of_gemm_peak"] = round(achieved / peak, 4)
    fovs = [args.fov_mm] + [f for f in (400.0, 450.0, 500.0) if f != args.fov_mm]
    counted = [crop_counts(base, args.overlap, args.margin, fov) for fov in fovs]
    result["windows_counted"] = counted
    floor = flops[48] / 1e9 / peak
    estimate: dict = {
        "label": "estimate, not measured: windows x seconds per f48 window",
        "f48_floor_seconds_per_window_at_gemm_peak": round(floor, 2),
        "f48_floor_seconds": {row: round(floor * n, 1) for row, n in counted[0].items() if row in ROWS},
    }
    if args.probe_f48 and not args.full:
        per_window = probe_window(48, 1, device)
        estimate["f48_seconds_per_window_measured"] = round(per_window, 2)
        estimate["f48_gflops_measured"] = round(flops[48] / 1e9 / per_window, 1)
        estimate["f48_seconds"] = {row: round(per_window * n, 1) for row, n in counted[0].items() if row in ROWS}
    result["f48_estimate"] = estimate

    print(
        f"f{feature_size}: {result['flops_per_window_tflop'][f'f{feature_size}']} TFLOP/window, {achieved:.1f} "
        f"GFLOP/s = {result['fraction_of_gemm_peak']:.1%} of the GEMM peak {peak} GFLOP/s"
    )
    print(f"f48 ({result['flops_per_window_tflop']['f48']} TFLOP/window): {json.dumps(estimate)}")
    print(f"windows counted (this image, then padded with air to wider fields of view): {json.dumps(counted)}")
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
        print(f"written: {args.out}")
    else:
        print(text)


if __name__ == "__main__":
    main()
