"""SSL view generation: batched on the device (``custom.networks.ssl.SSLViews``) against a per-sample loop.

    python -m bench.ssl_views_bench [--device cuda] [--batch 8] [--size 96] [--repeats 20] [--out file.json]

The baseline (``bench/research_views.py``) is written in the style of the paper's research code (our own code, same recipe):
for each sample, a Python loop draws a rotation and rotates it, then draws boxes one at a time with
Python's random module until their summed volume reaches U(0, 0.3) of the crop, filling each with
min-max normalised Gaussian noise created on the device, then does the same for boxes swapped in from
another sample; each box's size is read back to the host. Both produce two views of every crop.
Prints the median seconds per batch of each, the ratio, and writes a JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.research_views import loop_views
from custom.networks.ssl import SSLViews


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_it(fn, x: torch.Tensor, repeats: int) -> list[float]:
    fn(x)  # warm-up
    times = []
    for _ in range(repeats):
        _sync(x.device)
        start = time.perf_counter()
        fn(x)
        _sync(x.device)
        times.append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8, help="crops per batch (the paper: 2 volumes x 2 crops x GPUs)")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    device = torch.device(args.device)
    random.seed(0)
    torch.manual_seed(0)
    x = torch.rand(args.batch, 1, args.size, args.size, args.size, device=device)
    batched = SSLViews(seed=0)
    t_batched = time_it(batched, x, args.repeats)
    t_loop = time_it(loop_views, x, args.repeats)
    result = {
        "device": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
        ),
        "torch": torch.__version__,
        "batch": args.batch,
        "crop": [args.size] * 3,
        "repeats": args.repeats,
        "batched_s_median": round(statistics.median(t_batched), 5),
        "loop_s_median": round(statistics.median(t_loop), 5),
        "speedup": round(statistics.median(t_loop) / statistics.median(t_batched), 2),
    }
    print(f"| views of {args.batch} crops of {args.size}^3 on {result['device']} | median s/batch |")
    print("|---|---|")
    print(f"| per-sample loop (research-code style) | {result['loop_s_median']} |")
    print(f"| batched on the device (SSLViews) | {result['batched_s_median']} |")
    print(f"| ratio loop / batched | {result['speedup']} |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
