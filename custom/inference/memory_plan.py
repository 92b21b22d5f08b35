"""Memory planned before the sliding window runs: stitch on the device, on the CPU, or refuse with the numbers.

``sliding_window_inference`` stitches the windows' outputs into one buffer of ``classes x voxels``
(the input padded to ``roi_size``, at the input's dtype) plus a count map, on ``device`` (default: the
input's device). For a large CT on a small GPU that buffer alone can exceed the device; on the host,
a volume too large ends in the OOM killer after minutes of windows. MONAI's ``SlidingWindowInferer``
has ``cpu_thresh`` (a voxel count fixed in advance) and ``SlidingWindowInfererAdapt`` (retries on the
CPU after an out-of-memory error, once the device is full); neither knows the memory there is, nor
refuses before starting. Hence :func:`plan_stitching` per case, from the resampled input's shape:

- device need: the window batch (``sw_batch_size x roi`` voxels, input and output channels, plus the
  importance map) and, when stitching there, the stitched output, the count map, the padded input and
  the ``argmax`` of the post-processing (one float channel);
- host need (CPU network): the process's peak, which is the largest of its steps, each measured step by
  step on the real pipeline (``python -m bench.inference_memory``, peak RSS per transform, window and
  output; ``N`` original voxels, ``V`` padded resampled voxels):

  - loading: ``N x`` :data:`LOAD_BYTES_PER_ORIGINAL_VOXEL` (int16 read, float32 copy);
  - resampling to ``pixdim``: ``N x`` :data:`RESAMPLE_BYTES_PER_ORIGINAL_VOXEL` (``Spacingd`` computes in
    MONAI's default float64: the image as loaded plus its float64 copy; in float32, as the input's trace
    tells: :data:`FLOAT32_RESAMPLE_BYTES_PER_ORIGINAL_VOXEL`);
  - the network: the stitching, the window batch and the forward's activations per window voxel of at
    least two windows, read from the network (:func:`network_activation_bytes`): SDPA attention
    :data:`SDPA_ACTIVATION_BYTES_PER_VOXEL`, growing with the feature size (about 3x at 48), MONAI's own
    attention more, ONNX Runtime's arena :data:`ONNX_ACTIVATION_BYTES_PER_VOXEL` (kept to the end);
  - the inversion onto the input's grid: what the network left held (the probabilities and the input at
    ``V``, and :data:`HEAP_RESIDUE_FRACTION` of the window batch and activations: freed buffers the
    allocator keeps) plus ``N x`` :data:`INVERT_BYTES_PER_ORIGINAL_VOXEL` (``Invertd``'s inverse
    ``Spacingd`` resamples in float64 over the whole original grid; in float32
    :data:`FLOAT32_INVERT_BYTES_PER_ORIGINAL_VOXEL`): on a big CT this step is the peak;
  - the outputs (statistics, preview): the same held memory plus ``N x``
    :data:`OUTPUT_BYTES_PER_ORIGINAL_VOXEL` and :data:`OUTPUT_SLAB_BYTES`;

  plus the process (``runtime_gib`` and the network's parameters), and :data:`ESTIMATE_MARGIN` of it all.
  With the network on a GPU, the host holds the image as loaded and the label map (``N x 8`` bytes, not
  measured on a GPU) or, when the stitching comes to the CPU, the inversion's step as above;
- budgets from :mod:`custom.data.cache_plan` (``device_budget_bytes``: free CUDA memory less
  ``device_reserve_gib`` for the model and its activations; ``host_budget_bytes``: ``MemAvailable``
  less a margin; both overridable by ``SWIN_CACHE_DEVICE_MIB``/``SWIN_CACHE_HOST_MIB``);
- decision: on the device when everything fits there; else on the CPU when the host holds the
  stitching (logged: a warning naming the sizes); else :class:`MemoryPlanError` with the numbers,
  before any window runs. On a CPU device, the device is the host: fit or refuse.

:class:`PlannedSlidingWindowInferer` is MONAI's ``SlidingWindowInferer`` calling the plan per case and
passing its choice as the ``device`` argument; the refusal is that case's failure (``CaseEvaluator``
records it and goes on with the others).

The plan runs where the sliding window starts, after the case was loaded and resampled: it refuses a
case whose inversion, outputs or network would exceed the host before any window runs (the inversion
comes minutes later), but it cannot refuse one whose loading or resampling alone exceeds the host, which
fails (``MemoryError`` or the OOM killer) in the preprocessing, seconds after its start, before the plan.
With the stitching on a GPU the post-processing (``Invertd``) runs there too; its device memory (the
56 B an original voxel measured on the CPU would be 8.2 GiB for a 512 x 512 x 600 CT) is not planned,
only the window batch and the stitching are, beside ``device_reserve_gib``: not measured on a GPU.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from monai.inferers import SlidingWindowInferer

from custom.data import cache_plan
from custom.networks.options import SDPAWindowAttention
from custom.networks.runtimes import OnnxRuntimePredictor

__all__ = [
    "ACTIVATION_BYTES_PER_VOXEL",
    "SDPA_ACTIVATION_BYTES_PER_VOXEL",
    "SDPA_ACTIVATION_BYTES_PER_FEATURE",
    "ONNX_ACTIVATION_BYTES_PER_VOXEL",
    "network_activation_bytes",
    "LOAD_BYTES_PER_ORIGINAL_VOXEL",
    "RESAMPLE_BYTES_PER_ORIGINAL_VOXEL",
    "INVERT_BYTES_PER_ORIGINAL_VOXEL",
    "FLOAT32_RESAMPLE_BYTES_PER_ORIGINAL_VOXEL",
    "FLOAT32_INVERT_BYTES_PER_ORIGINAL_VOXEL",
    "OUTPUT_BYTES_PER_ORIGINAL_VOXEL",
    "OUTPUT_SLAB_BYTES",
    "HEAP_RESIDUE_FRACTION",
    "ESTIMATE_MARGIN",
    "host_steps",
    "MemoryPlanError",
    "StitchPlan",
    "plan_stitching",
    "PlannedSlidingWindowInferer",
]

logger = logging.getLogger(__name__)

GIB = 2**30
MIB = 2**20
#: host memory of a Swin UNETR forward per window voxel on the CPU with MONAI's own ``WindowAttention``
#: (``sdpa_attention`` false; fp32, torch 2.13, MONAI 1.6.1), measured: feature_size 12, one 96^3 window
#: 1183 MiB above the process, two 2172 MiB (989 MiB more); feature_size 24, one window 1245 MiB: about
#: 1.2 kB a voxel whatever the feature size (the attention's buffers dominate)
ACTIVATION_BYTES_PER_VOXEL = 1200
#: the same with :class:`custom.networks.options.SDPAWindowAttention` (the bundles' default), measured in
#: ``run inference`` (bench/results/inference_memory_CPU_2026-12-01.json and _sw1/_sw2, feature_size 12,
#: 96^3): the sliding window's peak above its start less the stitching and the window batch is 760 MiB
#: for one window, 776 MiB for two, 1621 MiB for four: 460-480 B a voxel from two windows on, one window
#: costing as two (hence the plan counts at least two)
SDPA_ACTIVATION_BYTES_PER_VOXEL = 500
#: ... and its growth with the feature size: four 96^3 windows took 2381 MiB at feature_size 24 (705 B a
#: voxel) and 4687 MiB at 48 (1389 B), the sliding window's peak above its start less the stitching and
#: the window batch (``python -m bench.inference_memory --xy 256 --z 120 --overlap 0.25 --feature_size 24``,
#: ``48``; bench/results/inference_memory_CPU_2026-12-01_f24.json, _f48.json): the plan counts
#: ``max(SDPA_ACTIVATION_BYTES_PER_VOXEL, SDPA_ACTIVATION_BYTES_PER_FEATURE x feature_size)``, 720 and 1440 B
SDPA_ACTIVATION_BYTES_PER_FEATURE = 30
#: windows through ONNX Runtime (``onnx_runtime``, :class:`custom.networks.runtimes.OnnxRuntimePredictor`):
#: the process grew 11714 MiB above the sliding window's start at feature_size 12 and 12126 MiB at 48 for 9
#: windows of 96^3 (batches of 4, 4 and 1), 6357 MiB at 48 for one batch of 4, and kept it to the end of the
#: run (bench/results/inference_memory_CPU_2026-12-01_onnx_f12.json, _onnx_f48.json, _onnx_f48_one_batch.json);
#: the 60-window volume of bench/results/cpu_full_volume_f48_2026-12-01.json peaked at 12.9 GiB: about
#: 3.4 kB per voxel of the window batch whatever the feature size once several batches ran, all of it held
#: (residue 1.0), hence 3.7 kB
ONNX_ACTIVATION_BYTES_PER_VOXEL = 3700
#: ``LoadImaged`` of an int16 NIfTI CT, peak above the step's start per original voxel: 120, 240, 480 MiB
#: for 15.7 M, 31.5 M, 62.9 M voxels (8.0 B: the int16 data, its float32 copy, the gzip stream);
#: bench/results/inference_memory_CPU_2026-12-01.json
LOAD_BYTES_PER_ORIGINAL_VOXEL = 8
#: ``Orientationd`` and ``Spacingd`` (bilinear, MONAI's default float64 computation) to ``pixdim``: the
#: float32 image as loaded (4 B) held, plus 13.3, 13.1, 13.0 B above it (same runs): 17.3 B, rounded up
RESAMPLE_BYTES_PER_ORIGINAL_VOXEL = 18
#: ``Invertd``'s inverse ``Spacingd`` (nearest, float64) onto the original grid, peak above the step's start:
#: 840, 1680, 3402 MiB for 15.7 M, 31.5 M, 62.9 M voxels (56.0, 56.0, 56.7 B), the process's peak in each
#: (same runs); 7.9 M voxels: 420 MiB (56.0 B)
INVERT_BYTES_PER_ORIGINAL_VOXEL = 57
#: the same two steps with ``Spacingd(dtype=torch.float32)``: resampling 4 B held plus 2.5 B above it,
#: inversion 840 and 1680 MiB for 31.5 M and 62.9 M voxels (28.0 B)
#: (bench/results/inference_memory_CPU_2026-12-01_float32.json, ``--resample_dtype float32``)
FLOAT32_RESAMPLE_BYTES_PER_ORIGINAL_VOXEL = 7
FLOAT32_INVERT_BYTES_PER_ORIGINAL_VOXEL = 29
#: the statistics and preview handlers over the inverted label map and the input read again: peaks 842, 903,
#: 1279 MiB above the process before the network for 15.7 M, 31.5 M, 62.9 M voxels (9.3 B a voxel more, the
#: rest what the network left held and the slab temporaries)
OUTPUT_BYTES_PER_ORIGINAL_VOXEL = 10
#: the outputs' slab temporaries (int64/float64 over at most ``SLAB_VOXELS``, :mod:`.case_outputs`)
OUTPUT_SLAB_BYTES = 2 * 8 * (1 << 24)
#: host memory the sliding window leaves resident beyond the probabilities and the input it returns (freed
#: window outputs and activation buffers the allocator keeps), as a fraction of the window batch and the
#: activations: RSS after the window less RSS before it less ``(classes + 1) x V x 4`` was 54 and 68 MiB
#: (64^3, one window), 174 and 190 MiB (96^3, one and two), 242 to 325 MiB (96^3, four): 0.14 to 0.26 of the
#: activations as counted here (bench/results/inference_memory_CPU_2026-12-01*.json)
HEAP_RESIDUE_FRACTION = 0.25
#: kept on top of the modelled peak for run-to-run variance: the terms alone came 1 % to 9 % above the
#: measured peaks of the runs above and of the 512 x 512 x 600 CT (9.77 GiB measured, 10.1 GiB modelled:
#: bench/results/big_volume_CPU_z600_2026-12-01.json), so with the margin the estimate is 1.11 to 1.20 x
ESTIMATE_MARGIN = 0.1


class MemoryPlanError(MemoryError):
    """Neither the device nor the host can hold a case's sliding-window output; the message has the numbers."""


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


@dataclass(frozen=True)
class StitchPlan:
    """Where a case's sliding-window output is stitched and why (the byte counts of :func:`plan_stitching`)."""

    device: torch.device
    stitch_bytes: int
    window_bytes: int
    host_bytes: int
    device_budget: int | None
    host_budget: int
    message: str

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"


def host_steps(
    voxels: int,
    num_classes: int,
    original_voxels: int,
    stitch_bytes: int,
    window_bytes: int,
    activation_bytes: int | None,
    in_channels: int = 1,
    bytes_per_value: int = 4,
    resample_dtype: str = "float64",
    heap_residue: float = HEAP_RESIDUE_FRACTION,
) -> dict[str, int]:
    """Host bytes of each step of one case above the process itself (the module docstring's terms).

    Args:
        voxels: the padded resampled voxels ``V``.
        num_classes, in_channels, bytes_per_value: as :func:`plan_stitching`.
        original_voxels: the input's voxels as loaded ``N``.
        stitch_bytes, window_bytes: the stitching buffers and the window batch.
        activation_bytes: the network forward's activations on the host; None: the network runs elsewhere
            (no network step).
        resample_dtype: what ``Spacingd`` computes in (its trace's ``extra_info["dtype"]``): ``"float32"``
            takes the float32 figures, anything else MONAI's default float64's.
        heap_residue: the fraction of the window batch and activations still held after the network
            (:data:`HEAP_RESIDUE_FRACTION`; 1.0 for ONNX Runtime, whose arena keeps everything).

    Returns:
        step name -> bytes: ``loading``, ``resampling``, ``network`` (when ``activation_bytes`` is given),
        ``inversion``, ``outputs``.

    >>> host_steps(10**6, 14, 10**7, 0, 0, None)["inversion"] // 10**6  # 57 B x 10 M + 15 x 4 B x 1 M held
    630
    """
    residue = int(heap_residue * (window_bytes + (activation_bytes or 0)))
    held = voxels * bytes_per_value * (num_classes + in_channels) + residue
    single = resample_dtype == "float32"
    resample = FLOAT32_RESAMPLE_BYTES_PER_ORIGINAL_VOXEL if single else RESAMPLE_BYTES_PER_ORIGINAL_VOXEL
    invert = FLOAT32_INVERT_BYTES_PER_ORIGINAL_VOXEL if single else INVERT_BYTES_PER_ORIGINAL_VOXEL
    steps = {
        "loading": original_voxels * LOAD_BYTES_PER_ORIGINAL_VOXEL,
        "resampling": original_voxels * resample,
    }
    if activation_bytes is not None:
        steps["network"] = stitch_bytes + window_bytes + activation_bytes
    steps["inversion"] = held + original_voxels * invert
    steps["outputs"] = held + original_voxels * OUTPUT_BYTES_PER_ORIGINAL_VOXEL + OUTPUT_SLAB_BYTES
    return steps


def plan_stitching(
    spatial_shape: Sequence[int],
    num_classes: int,
    roi_size: Sequence[int],
    sw_batch_size: int,
    device: str | torch.device,
    in_channels: int = 1,
    bytes_per_value: int = 4,
    original_voxels: int | None = None,
    device_reserve_gib: float = 8.0,
    host_margin: float = 0.1,
    name: str = "case",
    activation_bytes_per_voxel: int = SDPA_ACTIVATION_BYTES_PER_VOXEL,
    runtime_gib: float = 0.5,
    parameter_bytes: int = 0,
    estimate_margin: float = ESTIMATE_MARGIN,
    resample_dtype: str = "float64",
    heap_residue: float = HEAP_RESIDUE_FRACTION,
) -> StitchPlan:
    """Decide where to stitch one case (see the module docstring). Pure arithmetic plus the two budgets.

    Args:
        spatial_shape: the network input's spatial shape (after resampling), ``(X, Y, Z)``.
        num_classes: output channels.
        roi_size: the sliding window's ROI; the input is padded to at least this.
        sw_batch_size: windows per network call.
        device: where the network runs (``@device``).
        in_channels: input channels.
        bytes_per_value: bytes of the input's dtype (the stitching buffers take it: 4 for float32).
        original_voxels: voxels of the input as loaded (the grid the label map is inverted onto); None:
            as resampled (the loading, inversion and output steps are then underestimated for a fine grid).
        device_reserve_gib: device memory kept for the model and its activations.
        host_margin: fraction of the available host RAM kept free.
        name: the case, for the messages.
        activation_bytes_per_voxel: host memory of the network's forward per window voxel, when the network
            runs on the CPU (:data:`SDPA_ACTIVATION_BYTES_PER_VOXEL`, or :data:`ACTIVATION_BYTES_PER_VOXEL` for
            MONAI's own attention); counted for at least two windows. On a GPU ``device_reserve_gib`` covers it.
        runtime_gib: host memory of the process itself (Python, torch, MONAI, a feature_size-12 model):
            430-530 MiB measured before the network's step.
        parameter_bytes: the network's parameters, added to ``runtime_gib`` (a feature_size-48 model: 250 MB).
        estimate_margin: fraction added to the modelled host peak (:data:`ESTIMATE_MARGIN`).
        resample_dtype: what the resampling to ``pixdim`` and its inversion compute in (:func:`host_steps`).
        heap_residue: what the network step leaves held, as :func:`host_steps` (:func:`network_activation_bytes`).

    Raises:
        MemoryPlanError: the stitching fits neither on the device nor in host RAM (sizes and budgets named).
        ValueError: an empty shape or a non-positive size.

    >>> plan_stitching((64, 64, 64), 2, (64, 64, 64), 1, "cpu").device  # under 1 GiB: any host holds it
    device(type='cpu')
    """
    shape = [max(int(s), int(r)) for s, r in zip(spatial_shape, roi_size, strict=True)]
    if not shape or min(shape) <= 0 or num_classes <= 0 or sw_batch_size <= 0:
        raise ValueError(f"{name}: cannot plan a shape {tuple(spatial_shape)} with {num_classes} classes")
    voxels = math.prod(shape)
    roi = math.prod(int(r) for r in roi_size)
    b = int(bytes_per_value)
    n = int(original_voxels) if original_voxels is not None else voxels
    # output buffer + count map + padded input copy + the argmax of the post-processing
    stitch = voxels * b * (num_classes + 1 + in_channels + 1)
    window = sw_batch_size * roi * b * (in_channels + num_classes) + roi * b
    activations = max(sw_batch_size, 2) * roi * int(activation_bytes_per_voxel)  # host only
    runtime = int(runtime_gib * GIB) + int(parameter_bytes)
    grow = 1.0 + float(estimate_margin)
    dev = torch.device(device)
    size = f"{num_classes} x {'x'.join(str(s) for s in shape)}"
    what = f"{name}: stitching {size} needs {_gib(stitch)} (windows {_gib(window)})"
    host_budget = cache_plan.host_budget_bytes(host_margin)
    not_started = "Not started: free memory, crop the image to the body (body_crop), or use a coarser pixdim"
    if dev.type == "cuda":
        originals = int((runtime + n * 4 * 2) * grow)  # the image as loaded and the label map (not measured)
        device_budget = cache_plan.device_budget_bytes(dev, device_reserve_gib)
        if stitch + window <= device_budget:
            message = f"{what}: on {dev} ({_gib(device_budget)} free after a {device_reserve_gib:g} GiB reserve)"
            return StitchPlan(dev, stitch, window, originals, device_budget, host_budget, message)
        steps = host_steps(voxels, num_classes, n, stitch, window, None, in_channels, b, resample_dtype)
        step = max(steps, key=steps.__getitem__)
        need = int((runtime + max(stitch, steps[step])) * grow)
        if need <= host_budget:
            message = (
                f"{what}: more than {dev} holds ({_gib(device_budget)} free after a {device_reserve_gib:g} GiB "
                f"reserve): stitching on the CPU ({_gib(need)} of {_gib(host_budget)} host RAM at its peak, "
                f"the {step}); the windows still run on the device"
            )
            return StitchPlan(torch.device("cpu"), stitch, window, need, device_budget, host_budget, message)
        raise MemoryPlanError(
            f"{what}, more than {dev} holds ({_gib(device_budget)} free after a {device_reserve_gib:g} GiB reserve) "
            f"and, with the image and its label map on the host ({_gib(need)} at the {step}), more than the host "
            f"has ({_gib(host_budget)} available after a {host_margin:.0%} margin). {not_started}"
        )
    steps = host_steps(
        voxels, num_classes, n, stitch, window, activations, in_channels, b, resample_dtype, heap_residue
    )
    step = max(steps, key=steps.__getitem__)
    need = int((runtime + steps[step]) * grow)
    peak = (
        f"{_gib(need)} at its peak, the {step} (network {_gib(steps['network'])} with the activations "
        f"{_gib(activations)}; inversion onto the {n / 1e6:.1f} M voxels of the input {_gib(steps['inversion'])}; "
        f"process {_gib(runtime)}; {estimate_margin:.0%} margin)"
    )
    if need <= host_budget:
        message = f"{what}: on the CPU ({peak}, of {_gib(host_budget)} available)"
        return StitchPlan(dev, stitch, window + activations, need, None, host_budget, message)
    raise MemoryPlanError(
        f"{what}; the host needs {peak}, more than it has ({_gib(host_budget)} available after a "
        f"{host_margin:.0%} margin). {not_started}"
    )


def network_activation_bytes(network: Any) -> tuple[int, float]:
    """Host bytes per window voxel of ``network``'s forward on the CPU, and the fraction left held after it.

    ONNX Runtime (an :class:`custom.networks.runtimes.OnnxRuntimePredictor` in ``network``):
    :data:`ONNX_ACTIVATION_BYTES_PER_VOXEL`, all of it held. Swin UNETR with every window attention an
    :class:`custom.networks.options.SDPAWindowAttention`: the SDPA figure at its feature size (the smallest
    attention's ``dim``), :data:`HEAP_RESIDUE_FRACTION` held. Otherwise (MONAI's own attention, or a network
    this cannot read): :data:`ACTIVATION_BYTES_PER_VOXEL` (measured at feature sizes 12 and 24) or, where the
    SDPA figure at that size is larger, that figure plus MONAI's measured excess over SDPA at 12 (700 B; not
    measured at 48).
    """
    from monai.networks.nets.swin_unetr import WindowAttention

    modules = list(network.modules()) if isinstance(network, torch.nn.Module) else []
    if any(isinstance(m, OnnxRuntimePredictor) for m in modules):
        return ONNX_ACTIVATION_BYTES_PER_VOXEL, 1.0
    attention = [m for m in modules if isinstance(m, WindowAttention)]
    dims = [int(getattr(m, "dim", 0)) for m in attention]
    feature_size = min(dims) if dims and min(dims) > 0 else 12
    sdpa = max(SDPA_ACTIVATION_BYTES_PER_VOXEL, SDPA_ACTIVATION_BYTES_PER_FEATURE * feature_size)
    if attention and all(isinstance(m, SDPAWindowAttention) for m in attention):
        return sdpa, HEAP_RESIDUE_FRACTION
    excess = ACTIVATION_BYTES_PER_VOXEL - SDPA_ACTIVATION_BYTES_PER_VOXEL
    return max(ACTIVATION_BYTES_PER_VOXEL, sdpa + excess), HEAP_RESIDUE_FRACTION


def _resample_dtype(inputs: Any) -> str:
    """The dtype the input's last resampling computed in, from its MONAI trace (``"float64"`` when unknown)."""
    ops = getattr(inputs, "applied_operations", None) or []
    ops = ops[0] if ops and isinstance(ops[0], list) else ops  # a batch: one list per item
    for op in reversed(ops):
        info = op.get("extra_info") if isinstance(op, dict) else None
        if isinstance(info, dict) and "dtype" in info and op.get("class") == "SpatialResample":
            return str(info["dtype"])
    return "float64"


def _parameter_bytes(network: Any) -> int:
    if not isinstance(network, torch.nn.Module):
        return 0
    return sum(p.numel() * p.element_size() for p in network.parameters())


class PlannedSlidingWindowInferer(SlidingWindowInferer):
    """``SlidingWindowInferer`` that plans each case's stitching first (:func:`plan_stitching`) and follows the plan.

    Same arguments as MONAI's, plus:

    Args:
        num_classes: the network's output channels.
        in_channels: its input channels.
        network_device: where the network runs (``@device``); the windows go there (``sw_device``).
        device_reserve_gib, host_margin: as :func:`plan_stitching`.

    A ``device`` given to MONAI's constructor is not taken: the plan chooses it. The decision is logged
    once per case (a warning when the output goes to the CPU); a refusal raises :class:`MemoryPlanError`.
    """

    def __init__(
        self,
        roi_size: Sequence[int] | int,
        num_classes: int,
        network_device: str | torch.device = "cpu",
        in_channels: int = 1,
        device_reserve_gib: float = 8.0,
        host_margin: float = 0.1,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("device", None)
        super().__init__(roi_size=roi_size, sw_device=kwargs.pop("sw_device", network_device), **kwargs)
        self.num_classes, self.in_channels = int(num_classes), int(in_channels)
        self.network_device = torch.device(network_device)
        self.device_reserve_gib, self.host_margin = device_reserve_gib, host_margin
        self.last_plan: StitchPlan | None = None

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        roi = self.roi_size if isinstance(self.roi_size, Sequence) else [self.roi_size] * (inputs.ndim - 2)
        meta = getattr(inputs, "meta", {}) or {}
        source = meta.get("filename_or_obj", "case")
        source = source[0] if isinstance(source, (list, tuple)) and source else source
        original = meta.get("spatial_shape")
        original_voxels = None
        if original is not None:
            original = torch.as_tensor(original).reshape(-1, inputs.ndim - 2)[0]
            original_voxels = int(torch.prod(original).item())
        activation_bytes, heap_residue = network_activation_bytes(network)
        plan = plan_stitching(
            tuple(inputs.shape[2:]),
            self.num_classes,
            roi,
            int(self.sw_batch_size) * int(inputs.shape[0]),
            self.network_device,
            in_channels=self.in_channels,
            bytes_per_value=inputs.element_size(),
            original_voxels=original_voxels,
            device_reserve_gib=self.device_reserve_gib,
            host_margin=self.host_margin,
            name=str(source),
            activation_bytes_per_voxel=activation_bytes,
            parameter_bytes=_parameter_bytes(network),
            resample_dtype=_resample_dtype(inputs),
            heap_residue=heap_residue,
        )
        self.last_plan = plan
        (logger.warning if plan.on_cpu and self.network_device.type != "cpu" else logger.info)(plan.message)
        kwargs["device"] = plan.device
        return super().__call__(inputs, network, *args, **kwargs)
