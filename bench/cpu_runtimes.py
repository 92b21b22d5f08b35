"""CPU inference runtimes: eager PyTorch against TorchScript and ONNX Runtime, same weights.

    python -m bench.cpu_runtimes --out bench/results/cpu_runtimes_<date>.json

Sliding-window inference (gaussian, overlap 0.5, sw_batch_size 4) over a volume of ct_full's size at
3 mm (122 x 101 x 112), Swin UNETR at feature_size 12 with 64^3 windows (``--size small``) or f48 at
96^3 (``--size full``, slow here). Rows, each timed in turn, rounds alternating:

- eager with MONAI's window attention (the model zoo's network as it is);
- eager with SDPA window attention (the bundles' default, ``custom.networks.options.speed_options``);
- TorchScript: ``torch.jit.trace`` of the SDPA network, frozen and ``optimize_for_inference``;
- ONNX Runtime (CPU execution provider, all graph optimisations): the SDPA network exported by
  ``torch.onnx.export`` (TorchScript-based exporter, opset 17) through ``custom.networks.runtimes``, the
  bundles' ``onnx_runtime`` option.

Each row reports median seconds per volume, the ratio to the eager SDPA row, and the largest logit
difference and label agreement against eager fp32 with MONAI's attention (the exact function).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.common import SIZES, VOLUMES
from bench.levers import swin_unetr
from custom.networks.runtimes import OnnxRuntimePredictor

SHAPE = VOLUMES["small"]


def build_predictors(feature_size: int, roi: int) -> dict:
    """name -> callable taking a (B, 1, roi, roi, roi) float32 tensor and returning logits."""
    zoo, ours = (swin_unetr(feature_size, sdpa=sdpa).eval() for sdpa in (False, True))
    example = torch.rand(4, 1, roi, roi, roi)
    predictors = {"eager, MONAI attention": zoo, "eager, SDPA (default)": ours}
    with torch.no_grad():
        traced = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(ours, example)))
    predictors["TorchScript (trace, freeze, optimize_for_inference)"] = traced
    try:
        predictor = OnnxRuntimePredictor(ours, (roi,) * 3)  # the bundles' own path (``onnx_runtime``)
        start = time.perf_counter()
        predictor(example)  # exports and opens the session
        predictors["ONNX Runtime (CPU)"] = predictor
        print(f"ONNX export and session: {time.perf_counter() - start:.1f} s", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"ONNX Runtime row left out: {type(e).__name__}: {str(e)[:300]}", flush=True)
    return predictors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    from monai.inferers import sliding_window_inference

    feature_size, roi = SIZES[args.size]["feature_size"], SIZES[args.size]["roi_size"][0]
    volume = torch.rand(1, 1, *SHAPE, generator=torch.Generator().manual_seed(1))
    predictors = build_predictors(feature_size, roi)

    def infer(predictor) -> torch.Tensor:
        with torch.no_grad():
            return sliding_window_inference(volume, [roi] * 3, 4, predictor, overlap=0.5, mode="gaussian")

    exact = infer(predictors["eager, MONAI attention"])
    times: dict[str, list[float]] = {name: [] for name in predictors}
    outputs = {}
    for name, predictor in predictors.items():  # warm-up round, outputs kept
        outputs[name] = infer(predictor)
    for _ in range(args.repeats):
        for name, predictor in predictors.items():
            start = time.perf_counter()
            infer(predictor)
            times[name].append(time.perf_counter() - start)
    reference = statistics.median(times["eager, SDPA (default)"])
    result = {
        "command": "python -m bench.cpu_runtimes " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "feature_size": feature_size,
        "roi": roi,
        "volume": list(SHAPE),
        "rows": [],
    }
    labels = exact.argmax(1)
    for name in predictors:
        seconds = statistics.median(times[name])
        row = {
            "runtime": name,
            "seconds_per_volume": round(seconds, 2),
            "all_seconds": [round(t, 2) for t in times[name]],
            "speed_vs_eager_sdpa": round(reference / seconds, 2),
            "max_abs_logit_difference_vs_exact": float((outputs[name] - exact).abs().max()),
            "label_agreement_vs_exact": round(float((outputs[name].argmax(1) == labels).float().mean()), 6),
        }
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    try:
        import onnxruntime

        result["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
