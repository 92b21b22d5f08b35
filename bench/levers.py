"""Each speed lever on its own: the network step alone, one lever added at a time, in one process.

    python -m bench.levers --size full --out bench/results/levers_<device>.json

The pipelines of ``bench.compare`` include data loading; this isolates the model's own compute,
where the levers of ``custom.networks.options.speed_options`` and the configs act. Training: Swin UNETR,
DiceCE, 4 crops per step on random inputs (never zeros), median seconds per step after warm-up and
peak memory, starting from the model zoo's settings (fp16 autocast with a GradScaler, gradient
checkpointing, cudnn.benchmark off, Adam, MONAI's attention) and switching one thing per row.
Inference: sliding window over a random volume of ct_full's size at the BTCV spacing
(244 x 202 x 168; at 3 mm, 122 x 101 x 112, for the small size), the same lever rows plus ``sw_batch_size``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.common import SIZES, VOLUMES, flop_utilisation
from custom.networks.options import speed_options

#: feature_size, crop edge, inference volume (ct_full at 3 mm on the CPU, at the BTCV spacing on a GPU)
#: zoo settings, then one change per row (each row keeps the changes of the rows above unless it says so)
TRAIN_ROWS = [
    ("zoo: fp16, checkpointing, benchmark off, Adam, MONAI attention", {}),
    ("+ cudnn.benchmark", {"benchmark": True}),
    ("+ bf16 autocast", {"dtype": "bfloat16"}),
    ("+ SDPA window attention", {"sdpa": True}),
    ("+ fused AdamW", {"fused": True}),
    ("- gradient checkpointing", {"checkpoint": False}),
    ("+ channels-last 3D", {"channels_last": True}),
]
#: measured last (its compile time may outlast a short run): the bundles' defaults plus torch.compile
COMPILE_ROW = ("ours + torch.compile", {"compile": True})
INFER_ROWS = [
    ("zoo: fp16, benchmark off, MONAI attention, sw_batch_size 4", {}),
    ("+ cudnn.benchmark", {"benchmark": True}),
    ("+ bf16 autocast", {"dtype": "bfloat16"}),
    ("+ SDPA window attention", {"sdpa": True}),
    ("sw_batch_size 8", {"sw_batch_size": 8}),
    ("sw_batch_size 16", {"sw_batch_size": 16}),
    ("+ channels-last 3D", {"channels_last": True}),
]
BASE = {
    "benchmark": False,
    "dtype": "float16",
    "sdpa": False,
    "channels_last": False,
    "fused": False,
    "checkpoint": True,
    "compile": False,
    "sw_batch_size": 4,
}
#: the bundles' defaults on a GPU (channels-last and cudnn.benchmark did not pay; checkpointing stays for memory)
OURS = {**BASE, "dtype": "bfloat16", "sdpa": True, "fused": True}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def swin_unetr(
    feature_size: int,
    device: torch.device | str = "cpu",
    sdpa: bool = True,
    channels_last: bool = False,
    checkpoint: bool = False,
) -> torch.nn.Module:
    """The benchmarks' network: BTCV's Swin UNETR (1 -> 14 channels), seeded, with the speed options.

    Shared by ``levers.py``, ``infer_probe.py`` and ``cpu_runtimes.py`` so that every row measures
    the same weights.
    """
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(0)
    net = SwinUNETR(1, 14, feature_size=feature_size, use_checkpoint=checkpoint).to(device)
    return speed_options(net, sdpa_attention=sdpa, channels_last=channels_last)


def _network(feature_size: int, opts: dict, device: torch.device) -> torch.nn.Module:
    return swin_unetr(feature_size, device, opts["sdpa"], opts["channels_last"], opts["checkpoint"])


def time_train(opts: dict, feature_size: int, roi: int, steps: int, warmup: int, device: torch.device) -> dict:
    from monai.losses import DiceCELoss

    torch.backends.cudnn.benchmark = opts["benchmark"]
    net = _network(feature_size, opts, device)
    cuda = device.type == "cuda"
    params = list(net.parameters())
    if opts["fused"] and cuda:
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-5, fused=True)
    else:
        optimizer = torch.optim.Adam(params, lr=2e-4)
    model = torch.compile(net) if opts["compile"] else net
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    fmt = torch.channels_last_3d if opts["channels_last"] else torch.contiguous_format
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(4, 1, roi, roi, roi, device=device, generator=gen).to(memory_format=fmt)
    y = torch.randint(0, 14, (4, 1, roi, roi, roi), device=device, generator=gen)
    times = []
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    first = time.perf_counter()
    for i in range(warmup + steps):
        _sync()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=getattr(torch, opts["dtype"]), enabled=cuda):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        _sync()
        times.append(time.perf_counter() - start)
        if i == warmup - 1:
            warm_seconds = time.perf_counter() - first
    step = statistics.median(times[warmup:])
    out = {
        "seconds_per_step": round(step, 4),
        "crops_per_second": round(4 / step, 2),
        "warmup_seconds": round(warm_seconds, 1),
    }
    if not torch.isfinite(loss):
        out["loss_not_finite"] = True
    if cuda:
        out["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        mfu = flop_utilisation(4 / step, torch.cuda.get_device_name(0), feature_size, roi)
        if mfu is not None:
            out["model_flop_utilisation"] = mfu
    return out


@torch.no_grad()
def time_infer(opts: dict, feature_size: int, roi: int, shape: tuple, repeats: int, device: torch.device) -> dict:
    from monai.inferers import sliding_window_inference

    torch.backends.cudnn.benchmark = opts["benchmark"]
    net = _network(feature_size, {**opts, "checkpoint": False}, device).eval()
    gen = torch.Generator(device=device).manual_seed(1)
    volume = torch.rand(1, 1, *shape, device=device, generator=gen)
    cuda = device.type == "cuda"
    times = []
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats + 1):
        _sync()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=getattr(torch, opts["dtype"]), enabled=cuda):
            pred = sliding_window_inference(volume, [roi] * 3, opts["sw_batch_size"], net, overlap=0.5, mode="gaussian")
        pred.argmax(1)
        _sync()
        times.append(time.perf_counter() - start)
    out = {"seconds_per_volume": round(statistics.median(times[1:]), 3)}
    if cuda:
        out["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="inference volumes timed per row")
    parser.add_argument("--skip", default="", help="comma-separated row labels' leading words to skip, e.g. compile")
    parser.add_argument(
        "--ours_compile", action="store_true", help="only: the defaults, then the defaults + torch.compile"
    )
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    feature_size, roi, shape = SIZES[args.size]["feature_size"], SIZES[args.size]["roi_size"][0], VOLUMES[args.size]
    skip = [s for s in args.skip.split(",") if s]
    result = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "feature_size": feature_size,
        "roi": roi,
        "train": [],
        "infer": [],
    }

    def measure(kind: str, label: str, fn) -> bool:
        """Run one row, record and print it (a lever that fails is a finding, not the end of the sweep)."""
        try:
            row = fn()
        except Exception as e:  # noqa: BLE001
            row = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        result[kind].append({"row": label, **row})
        print(f"{kind:<5} | {label:<60} | {json.dumps(row)}", flush=True)
        _save(result, args.out)
        return "error" not in row

    def train(opts: dict):
        return lambda: time_train(opts, feature_size, roi, args.steps, args.warmup, device)

    if args.ours_compile:
        measure("train", "ours: bf16, SDPA, fused AdamW, checkpointing", train(OURS))
        measure("train", "ours + torch.compile", train({**OURS, "compile": True}))
        return 0

    def sweep(kind: str, rows: list, run) -> dict:
        """Rows in order, each adding its change to those above; a skipped or failed row's change is not kept."""
        opts = copy.deepcopy(BASE)
        for label, change in rows:
            if any(s in label for s in skip):
                continue
            if measure(kind, label, run({**opts, **change})):
                opts.update(change)
        return opts

    sweep("train", TRAIN_ROWS, train)
    sweep("infer", INFER_ROWS, lambda o: lambda: time_infer(o, feature_size, roi, shape, args.repeats, device))
    label, change = COMPILE_ROW
    if not any(s in label for s in skip):
        measure("train", label, train({**OURS, **change}))
    return 0


def _save(result: dict, out: str) -> None:
    if out:
        Path(out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
