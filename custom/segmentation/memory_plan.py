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
- host need: the input as loaded and the label map inverted onto its grid (both ``original voxels x 4``
  bytes; unknown original size: the resampled one) and, when stitching on the CPU, what stitching
  takes (as above); when the network itself runs on the CPU, also its forward's activations
  (:data:`ACTIVATION_BYTES_PER_VOXEL` per window voxel, measured) and the process (``runtime_gib``):
  on this CPU the activations of 4 windows of 96^3 (about 4 GiB) dominate the peak, not the stitching;
- budgets from :mod:`custom.data.cache_plan` (``device_budget_bytes``: free CUDA memory less
  ``device_reserve_gib`` for the model and its activations; ``host_budget_bytes``: ``MemAvailable``
  less a margin; both overridable by ``SWIN_CACHE_DEVICE_MIB``/``SWIN_CACHE_HOST_MIB``);
- decision: on the device when everything fits there; else on the CPU when the host holds the
  stitching (logged: a warning naming the sizes); else :class:`MemoryPlanError` with the numbers,
  before any window runs. On a CPU device, the device is the host: fit or refuse.

:class:`PlannedSlidingWindowInferer` is MONAI's ``SlidingWindowInferer`` calling the plan per case and
passing its choice as the ``device`` argument; the refusal is that case's failure (``CaseEvaluator``
records it and goes on with the others).
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

__all__ = [
    "ACTIVATION_BYTES_PER_VOXEL",
    "MemoryPlanError",
    "StitchPlan",
    "plan_stitching",
    "PlannedSlidingWindowInferer",
]

logger = logging.getLogger(__name__)

GIB = 2**30
#: host memory of a Swin UNETR forward per window voxel on the CPU (fp32, torch 2.13, MONAI 1.6.1), measured:
#: feature_size 12, one 96^3 window 1183 MiB above the process, two 2172 MiB (989 MiB more); feature_size 24,
#: one window 1245 MiB: about 1.2 kB a voxel whatever the feature size (the attention's buffers dominate)
ACTIVATION_BYTES_PER_VOXEL = 1200


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
    activation_bytes_per_voxel: int = ACTIVATION_BYTES_PER_VOXEL,
    runtime_gib: float = 0.5,
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
        original_voxels: voxels of the input as loaded (the inverted label map's grid); None: as resampled.
        device_reserve_gib: device memory kept for the model and its activations.
        host_margin: fraction of the available host RAM kept free.
        name: the case, for the messages.
        activation_bytes_per_voxel: host memory of the network's forward per window voxel, when the network
            runs on the CPU (:data:`ACTIVATION_BYTES_PER_VOXEL`); on a GPU ``device_reserve_gib`` covers it.
        runtime_gib: host memory of the process itself (Python, torch, MONAI, the model) on a CPU device.

    Raises:
        MemoryPlanError: the stitching fits neither on the device nor in host RAM (sizes and budgets named).
        ValueError: an empty shape or a non-positive size.

    >>> plan_stitching((64, 64, 64), 2, (64, 64, 64), 1, "cpu").device  # 9 MiB: any host holds it
    device(type='cpu')
    """
    shape = [max(int(s), int(r)) for s, r in zip(spatial_shape, roi_size, strict=True)]
    if not shape or min(shape) <= 0 or num_classes <= 0 or sw_batch_size <= 0:
        raise ValueError(f"{name}: cannot plan a shape {tuple(spatial_shape)} with {num_classes} classes")
    voxels = math.prod(shape)
    roi = math.prod(int(r) for r in roi_size)
    b = int(bytes_per_value)
    # output buffer + count map + padded input copy + the argmax of the post-processing
    stitch = voxels * b * (num_classes + 1 + in_channels + 1)
    window = sw_batch_size * roi * b * (in_channels + num_classes) + roi * b
    activations = sw_batch_size * roi * int(activation_bytes_per_voxel)  # host only: a device keeps its reserve
    originals = (original_voxels if original_voxels is not None else voxels) * 4 * 2
    dev = torch.device(device)
    size = f"{num_classes} x {'x'.join(str(s) for s in shape)}"
    what = f"{name}: stitching {size} needs {_gib(stitch)} (windows {_gib(window)})"
    host_budget = cache_plan.host_budget_bytes(host_margin)
    if dev.type == "cuda":
        device_budget = cache_plan.device_budget_bytes(dev, device_reserve_gib)
        if stitch + window <= device_budget:
            message = f"{what}: on {dev} ({_gib(device_budget)} free after a {device_reserve_gib:g} GiB reserve)"
            return StitchPlan(dev, stitch, window, originals, device_budget, host_budget, message)
        if stitch + originals <= host_budget:
            message = (
                f"{what}: more than {dev} holds ({_gib(device_budget)} free after a {device_reserve_gib:g} GiB "
                f"reserve): stitching on the CPU ({_gib(stitch + originals)} of {_gib(host_budget)} host RAM); "
                "the windows still run on the device"
            )
            return StitchPlan(
                torch.device("cpu"), stitch, window, stitch + originals, device_budget, host_budget, message
            )
        raise MemoryPlanError(
            f"{what}, more than {dev} holds ({_gib(device_budget)} free after a {device_reserve_gib:g} GiB reserve) "
            f"and, with the image and its label map ({_gib(originals)}), more than the host has "
            f"({_gib(host_budget)} available after a {host_margin:.0%} margin). Not started: free memory, crop the "
            "image to the body (body_crop), or use a coarser pixdim"
        )
    need = stitch + window + activations + originals + int(runtime_gib * GIB)
    if need <= host_budget:
        message = (
            f"{what}: on the CPU ({_gib(need)} with the network's activations {_gib(activations)}, the image and "
            f"label map, of {_gib(host_budget)} available)"
        )
        return StitchPlan(dev, stitch, window + activations, need, None, host_budget, message)
    raise MemoryPlanError(
        f"{what}; with the network's activations ({_gib(activations)}), the image and its label map "
        f"{_gib(need)}, more than the host has "
        f"({_gib(host_budget)} available after a {host_margin:.0%} margin). Not started: free memory, crop the "
        "image to the body (body_crop), or use a coarser pixdim"
    )


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
        )
        self.last_plan = plan
        (logger.warning if plan.on_cpu and self.network_device.type != "cpu" else logger.info)(plan.message)
        kwargs["device"] = plan.device
        return super().__call__(inputs, network, *args, **kwargs)
