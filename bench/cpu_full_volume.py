"""Seconds per BTCV-sized volume on this CPU at the full size (feature_size 48), against the CPU's own limit.

    python -m bench.cpu_full_volume [--rows eager_crop,onnx_crop,eager_no_crop,onnx_no_crop]
                                    [--feature_size 48] [--out bench/results/cpu_full_volume_f48_<date>.json]

Input: ``ct_full.nii.gz`` (``../shared/data/ct_sample``) preprocessed as the BTCV bundle does at
inference (``bench.body_crop_bench.preprocess``: RAS, 1.5 x 1.5 x 2.0 mm bilinear, -175..250 HU to
0..1): about 243 x 201 x 168 voxels. Inferer: the bundle's own, ``custom.segmentation.pipeline.
sliding_window`` with the inference config's defaults (ROI 96^3, overlap 0.5, ``sw_batch_size`` 4,
gaussian blending, memory-planned stitching), with ``body_crop`` on (``*_crop``) or off
(``*_no_crop``). Network: the BTCV Swin UNETR (1 -> 14 channels) with SDPA window attention, seeded
random weights (speed does not depend on training), FP32, run eagerly (``eager_*``) or through
ONNX Runtime's CPU provider (``onnx_*``: ``custom.networks.runtimes.OnnxRuntimePredictor``, the
bundles' ``onnx_runtime`` option; its export and session opening, plus one window, are timed
apart, before the volume).

Each row runs in a fresh process (peak RSS is its own), one after another, and records: seconds
for the volume (the inferer call, body detection included), windows run of the uncropped total,
seconds per window, each batch's seconds (so a run stopped early still gives a rate; the fastest
batch says what the row reaches when the shared machine is quiet), peak RSS, the body detection's
own seconds (crop rows, timed again after the run). A row whose process would run the host out of
memory (available below 1.5 GiB) is stopped and recorded as such. The result file is rewritten
after every row.

Also in the same run: the CPU's FP32 matrix-multiply throughput (``bench.body_crop_bench.
gemm_gflops``: ``torch.matmul`` of 2048^2, best of 10, and 4096^2, best of 3) with the load average,
at the start, inside each row's process before and after its volume, and at the end; the best of
them is the practical peak. The forward FLOP count of one 96^3 window comes from torch's flop
counter on the meta device. Each row: achieved GFLOP/s (FLOP per window x windows / seconds) as a
fraction of that peak, the same for its fastest batch, and the floor the peak sets on its seconds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.body_crop_bench import ROI, SAMPLE, WINDOW, gemm_gflops, network, preprocess, window_flops
from bench.child import add_child_option, peak_rss_gib, run_child, serve_child

ROWS = ("eager_crop", "onnx_crop", "onnx_no_crop", "eager_no_crop")
SW_BATCH_SIZE = 4
OVERLAP = 0.5
#: a row's process is stopped when the host's available memory falls below this (the machine is shared)
MIN_AVAILABLE_GIB = 1.5


def gemm_peak() -> dict:
    """FP32 matmul GFLOP/s at 2048^2 (best of 10) and 4096^2 (best of 3), and the best of the two."""
    cpu = torch.device("cpu")
    sizes = {"2048": gemm_gflops(cpu, 2048, 10), "4096": gemm_gflops(cpu, 4096, 3)}
    return {**sizes, "best_gflops": max(v["best_gflops"] for v in sizes.values()), "load_average": os.getloadavg()}


def ort_gemm_gflops(n: int = 4096, repeats: int = 5) -> dict:
    """FP32 MatMul of two n x n matrices in ONNX Runtime (its MLAS kernels), torch's threads: best and median GFLOP/s.

    torch's matmul goes through MKL, which on a non-Intel CPU may not take its fastest path; ONNX
    Runtime's MLAS picks its kernels from the CPU's features, so its rate is the second view of the peak.
    """
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n]) for name in "ab"]
    output = helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm", inputs, [output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {name: np.random.default_rng(0).random((n, n), dtype=np.float32) for name in "ab"}
    session.run(None, feeds)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        rates.append(2 * n**3 / (time.perf_counter() - start) / 1e9)
    return {"n": n, "best_gflops": round(max(rates), 1), "median_gflops": round(sorted(rates)[len(rates) // 2], 1)}


def gemm_views() -> dict:
    """torch's (MKL) and ONNX Runtime's (MLAS) FP32 GEMM rates now, with the load average."""
    return {"torch": gemm_peak(), "onnxruntime_4096": ort_gemm_gflops(), "load_average": os.getloadavg()}


class Timed(torch.nn.Module):
    """``predictor`` that counts the windows it is given and times each batch (printed as it goes)."""

    def __init__(self, predictor: torch.nn.Module, total: int):
        super().__init__()
        self.predictor = predictor
        self.total = total
        self.windows = 0
        self.batches: list[float] = []
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self.predictor(x)
        self.batches.append(round(time.perf_counter() - start, 2))
        self.windows += x.shape[0]
        self.sizes.append(x.shape[0])
        print(f"  {self.windows}/{self.total} windows, batch {self.batches[-1]} s", flush=True)
        return out


def run_row(row: str, image_path: str, feature_size: int) -> dict:
    """One row in its own process: the bundle's inferer over the image, timed; windows, memory."""
    from custom.inference.body_crop import count_windows
    from custom.networks.runtimes import OnnxRuntimePredictor
    from custom.segmentation.pipeline import sliding_window
    from custom.segmentation.task import task_for, with_values

    image = torch.load(image_path)
    task = with_values(task_for("BTCV"), pixdim=(1.5, 1.5, 2.0), roi_size=ROI, intensity_range=WINDOW)
    crop = row.endswith("_crop") and not row.endswith("_no_crop")
    inferer = sliding_window(task, SW_BATCH_SIZE, OVERLAP, body_crop=crop, device="cpu")
    net = network(feature_size, torch.device("cpu"), None)
    result: dict = {"threads": torch.get_num_threads(), "gemm_before": gemm_peak()}
    predictor: torch.nn.Module = net
    if row.startswith("onnx"):
        predictor = OnnxRuntimePredictor(net, ROI)
        start = time.perf_counter()
        with torch.inference_mode():
            predictor(torch.zeros(1, 1, *ROI))  # exports, opens the session, runs one window
        result["onnx_export_session_and_one_window_seconds"] = round(time.perf_counter() - start, 1)
        import onnxruntime

        result["onnxruntime"] = onnxruntime.__version__
    total = count_windows(tuple(image.shape[2:]), ROI, OVERLAP)
    timed = Timed(predictor, total)
    with torch.inference_mode():
        start = time.perf_counter()
        labels = inferer(image, timed).argmax(1)
        seconds = time.perf_counter() - start
    result.update(
        {
            "seconds_per_volume": round(seconds, 1),
            "windows_run": timed.windows,
            "windows_total": total,
            "seconds_per_window": round(seconds / max(timed.windows, 1), 2),
            "batch_seconds": timed.batches,
            "batch_windows": timed.sizes,
            "peak_rss_gib": peak_rss_gib(),
            "organ_voxels": int((labels != 0).sum()),
            "gemm_after": gemm_peak(),
        }
    )
    if crop:
        with torch.inference_mode():
            start = time.perf_counter()
            box = inferer.box(image)
            result["body_detection_seconds"] = round(time.perf_counter() - start, 2)
        result["body_box"] = [[s.start, s.stop] for s in box] if box else None
    return result


def row_or_error(spec: dict) -> dict:
    """In the row's own process (:func:`bench.child.run_child`): :func:`run_row`, or the error that stopped it."""
    try:
        return run_row(spec["row"], spec["image_path"], spec["feature_size"])
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {str(e)[:500]}"}


def run_in_process(row: str, image_path: str, feature_size: int) -> dict:
    """``run_row`` in a fresh process, stopped if the host runs short of memory (its peak RSS then recorded)."""
    spec = {"row": row, "image_path": image_path, "feature_size": feature_size}
    return run_child("bench.cpu_full_volume", spec, min_available_gib=MIN_AVAILABLE_GIB, echo=True).result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default=str(SAMPLE))
    parser.add_argument("--feature_size", type=int, default=48)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {ROWS}, run in this order")
    parser.add_argument("--out", default=None, help="write the results as JSON here (after every row)")
    parser.add_argument(
        "--gemm_only",
        action="store_true",
        help="measure the GEMM rates (torch and ONNX Runtime) only, add them to --out's file, recompute the fractions",
    )
    add_child_option(parser)
    args = parser.parse_args()
    if args.child:
        return serve_child(args.child, row_or_error)
    if args.gemm_only:
        result = json.loads(Path(args.out).read_text(encoding="utf-8"))
        result.setdefault("gemm_extra", []).append(
            {"command": "python -m bench.cpu_full_volume " + " ".join(sys.argv[1:]), **gemm_views()}
        )
        print(json.dumps(result["gemm_extra"][-1]), flush=True)
        summarise(result, result["flop_per_window_tflop"] * 1e12)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        return 0
    rows = args.rows.split(",")
    if not set(rows) <= set(ROWS):
        parser.error(f"--rows {rows}: expected any of {ROWS}")

    image = preprocess(Path(args.image))
    flops = window_flops(args.feature_size)
    result: dict = {
        "command": "python -m bench.cpu_full_volume " + " ".join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads; shared with other agents (load average per row)",
        "torch": torch.__version__,
        "image": Path(args.image).name,
        "shape": list(image.shape[2:]),
        "settings": {
            "feature_size": args.feature_size,
            "roi_size": list(ROI),
            "overlap": OVERLAP,
            "sw_batch_size": SW_BATCH_SIZE,
            "weights": "seeded random",
            "precision": "fp32",
            "attention": "SDPA",
        },
        "flop_per_window_tflop": round(flops / 1e12, 4),
        "gemm_fp32_before": gemm_views(),
        "rows": {},
    }
    print(f"{result['image']} {result['shape']}, {result['machine']}", flush=True)
    print(f"GEMM fp32 before: {result['gemm_fp32_before']}; {result['flop_per_window_tflop']} TFLOP/window", flush=True)

    def write() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    write()
    with tempfile.TemporaryDirectory() as tmp:
        image_path = f"{tmp}/image.pt"
        torch.save(image, image_path)
        for row in rows:
            print(f"{row}: start {datetime.datetime.now(datetime.timezone.utc):%H:%M:%S} UTC", flush=True)
            result["rows"][row] = run_in_process(row, image_path, args.feature_size)
            print(f"{row}: {json.dumps(result['rows'][row])}", flush=True)
            summarise(result, flops)
            write()
    result["gemm_fp32_after"] = gemm_views()
    summarise(result, flops)
    for row, r in result["rows"].items():
        if "error" in r:
            print(f"{row}: {r}", flush=True)
            continue
        print(
            f"{row}: {r['seconds_per_volume']} s/volume, {r['windows_run']}/{r['windows_total']} windows, "
            f"{r['achieved_gflops']} GFLOP/s = {r['fraction_of_gemm_peak']:.1%} of the run's best GEMM "
            f"{result['gemm_fp32_peak_gflops']} GFLOP/s (floor {r['floor_seconds_at_gemm_peak']} s); fastest batch "
            f"{r['fastest_batch_seconds_per_window']} s/window = {r['fastest_batch_fraction_of_gemm_peak']:.1%}; "
            f"peak RSS {r['peak_rss_gib']} GiB",
            flush=True,
        )
    write()
    return 0


def summarise(result: dict, flops: float) -> None:
    """Each row's GFLOP/s as a fraction of the best FP32 GEMM rate seen anywhere in the run, and the floor it sets."""
    gemms = [result["gemm_fp32_before"], result.get("gemm_fp32_after"), *result.get("gemm_extra", [])]
    gemms += [r.get(k) for r in result["rows"].values() for k in ("gemm_before", "gemm_after")]
    views = [g for g in gemms if g] + [g[k] for g in gemms if g for k in ("torch", "onnxruntime_4096") if k in g]
    peak = max(g["best_gflops"] for g in views if "best_gflops" in g)
    result["gemm_fp32_peak_gflops"] = peak
    result["floor_seconds_per_window_at_gemm_peak"] = round(flops / (peak * 1e9), 2)
    for r in result["rows"].values():
        if "error" in r:
            continue
        achieved = flops * r["windows_run"] / r["seconds_per_volume"] / 1e9
        r["achieved_gflops"] = round(achieved, 1)
        r["fraction_of_gemm_peak"] = round(achieved / peak, 3)
        r["floor_seconds_at_gemm_peak"] = round(flops * r["windows_run"] / (peak * 1e9), 1)
        fastest = min(t / n for t, n in zip(r["batch_seconds"], r["batch_windows"], strict=True))
        r["fastest_batch_seconds_per_window"] = round(fastest, 2)
        r["fastest_batch_fraction_of_gemm_peak"] = round(flops / fastest / 1e9 / peak, 3)


if __name__ == "__main__":
    sys.exit(main())
