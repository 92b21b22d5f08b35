"""Where Swin UNETR inference spends its time on a GPU, and what the remaining levers buy.

    python -m bench.infer_probe --out bench/results/infer_probe_<device>.json [--sections ...]

Sections (``--sections``, all by default; about 3.5 minutes on an H100, most of it compiling):

- ``profile``: one forward of ``sw_batch_size`` windows (f48, 96^3, bf16, SDPA) under the torch
  profiler: GPU time by kind of kernel, the top kernels, GPU busy time against wall time (is the
  forward launch-bound?);
- ``sdpa``: each distinct attention call of that forward, in several memory layouts, on each SDPA
  backend alone (cuDNN, memory-efficient, math): which kernels accept it, why not, and in what time;
- ``forward``: the forward alone, median seconds, defaults against fp16, cudnn.benchmark,
  channels-last with cudnn.benchmark and a CUDA graph (one capture, replayed per window batch);
- ``regional`` and ``compile``: ``torch.compile`` of the full-resolution blocks only and of the whole
  network, compile time reported apart, largest logit difference from the eager forward;
- ``sliding``: sliding-window inference over a volume of ct_full's size at the BTCV spacing for each
  candidate, with the argmax agreement against an fp32 run and against the defaults.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from bench.common import VOLUMES
from bench.levers import swin_unetr

SHAPE = VOLUMES["full"]


def _net(device, channels_last=False):
    return swin_unetr(48, device, sdpa=True, channels_last=channels_last).eval()


class GraphedForward(torch.nn.Module):
    """A CUDA graph of ``net`` at one input shape, replayed per call (smaller batches are padded)."""

    def __init__(self, net, example: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.net, self.dtype = net, dtype
        self.static_in = example.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(3):
                with torch.autocast("cuda", dtype=dtype, cache_enabled=False):
                    net(self.static_in)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            with torch.autocast("cuda", dtype=dtype, cache_enabled=False):
                self.static_out = net(self.static_in)

    def forward(self, x):
        n = x.shape[0]
        self.static_in[:n].copy_(x)
        self.graph.replay()
        return self.static_out[:n].clone()


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def kind_of(name: str) -> str:
    n = name.lower()
    for key, kind in (
        ("fmha", "attention"),
        ("flash", "attention"),
        ("attention", "attention"),
        ("conv", "convolution"),
        ("dgrad", "convolution"),
        ("wgrad", "convolution"),
        ("implicit", "convolution"),
        ("xmma", "convolution/gemm (xmma)"),
        ("gemm", "matmul"),
        ("cutlass", "matmul"),
        ("sm90", "matmul"),
        ("norm", "norm"),
        ("bn_", "norm"),
        ("welford", "norm"),
        ("elementwise", "elementwise"),
        ("vectorized", "elementwise"),
        ("reduce", "reduction"),
        ("copy", "copy/layout"),
        ("cat", "copy/layout"),
        ("index", "index/gather"),
        ("gather", "index/gather"),
        ("pad", "copy/layout"),
        ("roll", "copy/layout"),
    ):
        if key in n:
            return kind
    return "other"


def profile(net, x, dtype) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        for _ in range(3):
            net(x)
        torch.cuda.synchronize()
        t = time.perf_counter()
        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            for _ in range(3):
                net(x)
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / 3
    kinds = defaultdict(float)
    kernels = []
    for e in p.key_averages():
        cuda_us = getattr(e, "self_device_time_total", None)
        if cuda_us is None:
            cuda_us = getattr(e, "self_cuda_time_total", 0)
        if cuda_us and e.device_type == torch.autograd.DeviceType.CUDA:
            kinds[kind_of(e.key)] += cuda_us / 3e6
            kernels.append((cuda_us / 3e6, e.count // 3, e.key[:110]))
    kernels.sort(reverse=True)
    busy = sum(kinds.values())
    return {
        "wall_seconds_per_forward_profiled": round(wall, 4),
        "gpu_busy_seconds_per_forward": round(busy, 4),
        "by_kind_seconds": {k: round(v, 4) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"seconds": round(s, 4), "calls": c, "kernel": k} for s, c, k in kernels[:18]],
    }


SDPA_FORMS = ("as called", "q, k, v contiguous", "contiguous, bias expanded over the batch", "heads as batch")


def sdpa_forms(net, x, dtype, repeats) -> list[dict]:
    """Each distinct attention call of one forward, in each form, on each SDPA backend alone."""
    import warnings

    from torch.nn.attention import SDPBackend, sdpa_kernel

    calls, original = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, scale=None, **kw):
        calls.append((q, k, v, attn_mask, scale))
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale, **kw)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
            net(x)
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    rows, seen = [], set()
    for q, k, v, bias, scale in calls:
        key = (tuple(q.shape), tuple(q.stride()), None if bias is None else tuple(bias.shape))
        if key in seen:
            continue
        seen.add(key)
        forms = {"as called": (q, k, v, bias)}
        qc, kc, vc = (t.contiguous() for t in (q, k, v))
        forms["q, k, v contiguous"] = (qc, kc, vc, bias)
        if bias is not None:
            forms["contiguous, bias expanded over the batch"] = (qc, kc, vc, bias.expand(q.shape[0], -1, -1, -1))
            if bias.shape[0] == 1:
                forms["heads as batch"] = (
                    *(t.transpose(0, 1).contiguous() for t in (q, k, v)),
                    bias.transpose(0, 1),
                )
        row = {
            "q_shape": list(q.shape),
            "q_stride": list(q.stride()),
            "bias": None if bias is None else list(bias.shape),
        }
        for form, (fq, fk, fv, fb) in forms.items():
            for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
                label = f"{form} | {backend.name}"
                try:
                    with warnings.catch_warnings(record=True) as caught, sdpa_kernel([backend]), torch.no_grad():
                        warnings.simplefilter("always")

                        def run():
                            return original(fq, fk, fv, attn_mask=fb, scale=scale)

                        run()
                        row[label] = round(timed(run, repeats) * 1e3, 3)
                except Exception as e:  # noqa: BLE001
                    reason = " / ".join(dict.fromkeys(str(w.message).strip()[:200] for w in caught))
                    row[label] = f"unusable: {reason[:500] or str(e)[:120]}"
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def regional_compile(net):
    """torch.compile on the full-resolution blocks only (the decoder and encoder ends)."""
    for name in ("encoder1", "encoder2", "decoder1", "decoder2", "out"):
        setattr(net, name, torch.compile(getattr(net, name), dynamic=False))
    return net


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sw_batch_size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--sections",
        default="profile,forward,sdpa,regional,compile,sliding",
        help="comma-separated: profile, forward (eager levers), sdpa, regional, compile, sliding",
    )
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    device = torch.device("cuda")
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "forward": {}}

    def save():
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    bf16 = torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(args.sw_batch_size, 1, 96, 96, 96, device=device, generator=gen)
    net = _net(device)
    if "profile" in sections:
        result["profile"] = profile(net, x, bf16)
        print(json.dumps(result["profile"], indent=1), flush=True)
        save()
    if "sdpa" in sections:
        result["sdpa_forms_ms"] = sdpa_forms(net, x, bf16, args.repeats)
        save()

    def fwd(model, dtype=bf16, inp=x):
        def run():
            with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
                return model(inp)

        return run

    def record(label, seconds, extra=None):
        result["forward"][label] = {"seconds": round(seconds, 4), **(extra or {})}
        print(f"forward | {label:<45} | {seconds:.4f} s {extra or ''}", flush=True)
        save()

    with torch.no_grad(), torch.autocast("cuda", dtype=bf16):
        reference = net(x).float()
    record("defaults: bf16, SDPA", timed(fwd(net), args.repeats))
    candidates = {"defaults": net}
    if "forward" in sections:
        record("fp16", timed(fwd(net, torch.float16), args.repeats))
        torch.backends.cudnn.benchmark = True
        fwd(net)()
        record("cudnn.benchmark", timed(fwd(net), args.repeats))
        cl = _net(device, channels_last=True)
        xc = x.to(memory_format=torch.channels_last_3d)
        fwd(cl, inp=xc)()
        record("channels-last + cudnn.benchmark", timed(fwd(cl, inp=xc), args.repeats))
        del cl
        torch.backends.cudnn.benchmark = False
        try:
            graphed = GraphedForward(net, x, bf16)
            with torch.no_grad():
                diff = (graphed(x).float() - reference).abs().max().item()
            record("CUDA graph", timed(lambda: graphed(x), args.repeats), {"max_abs_diff": diff})
            candidates["CUDA graph"] = graphed
        except Exception as e:  # noqa: BLE001
            result["forward"]["CUDA graph"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print("CUDA graph failed:", e, flush=True)
    compiled_variants = []
    if "regional" in sections:
        compiled_variants.append(("torch.compile, full-resolution blocks only", lambda: regional_compile(_net(device))))
    if "compile" in sections:
        compiled_variants.append(("torch.compile", lambda: torch.compile(_net(device), dynamic=False)))
    for label, build in compiled_variants:
        try:
            compiled = build()
            t = time.perf_counter()
            fwd(compiled)()
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - t
            with torch.no_grad(), torch.autocast("cuda", dtype=bf16):
                diff = (compiled(x).float() - reference).abs().max().item()
            record(
                label,
                timed(fwd(compiled), args.repeats),
                {"compile_seconds": round(compile_s, 1), "max_abs_diff": diff},
            )
            candidates[label] = compiled
        except Exception as e:  # noqa: BLE001
            result["forward"][label] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(label, "failed:", e, flush=True)
    if "sliding" not in sections:
        return 0

    from monai.inferers import sliding_window_inference

    volume = torch.rand(1, 1, *SHAPE, device=device, generator=gen)
    result["sliding_window"] = {}
    with torch.no_grad():
        exact = sliding_window_inference(volume, [96] * 3, args.sw_batch_size, net, overlap=0.5, mode="gaussian")
        exact = exact.argmax(1)
    labels = {}
    for name, model in candidates.items():

        def sw(m=model):
            with torch.no_grad(), torch.autocast("cuda", dtype=bf16):
                return sliding_window_inference(volume, [96] * 3, args.sw_batch_size, m, overlap=0.5, mode="gaussian")

        labels[name] = sw().argmax(1)
        seconds = timed(sw, 3)
        row = {
            "seconds_per_volume": round(seconds, 3),
            "argmax_agreement_with_fp32": round((labels[name] == exact).float().mean().item(), 6),
        }
        if name != "defaults":
            row["argmax_agreement_with_defaults"] = round((labels[name] == labels["defaults"]).float().mean().item(), 6)
        result["sliding_window"][name] = row
        print(f"sliding window | {name:<20} | {row}", flush=True)
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
