"""Body crop at inference: run the sliding window over the body's bounding box only, background outside.

nnU-Net and TotalSegmentator crop to the body before they segment; issue 18 asks the same of the
bundles, so that windows over the air around the body, where the answer is background, are not run.
:class:`BodyCropInferer` wraps the bundle's ``SlidingWindowInferer`` and does it on the preprocessed
input, on its device:

1. **Body mask.** ``mode="above"`` (CT): a voxel is body when any channel is strictly above
   ``threshold``, in the preprocessed units. The bundles window CT with ``ScaleIntensityRanged(a_min,
   a_max, 0, 1, clip=True)``, so every voxel at or below ``a_min`` HU (air, and the scanner's padding
   outside its field of view) is exactly 0, the window's minimum: ``threshold=0.0`` (the default)
   means "above ``a_min`` HU" (-175 HU for BTCV: fat, about -100 HU, and every other tissue is in).
   A threshold in HU is converted with :func:`hu_to_window`. ``mode="nonzero"`` (MRI): a voxel is
   body when any channel is not 0; ``NormalizeIntensity(nonzero=True)`` leaves the background at
   exactly 0 and z-scores the rest, so negative values inside the body count too.
2. **Largest connected component**, 26-connected, judged on a grid of ``block``-voxel cubes (a cube
   is body when any voxel in it is): the component with the most body voxels is kept, then its
   voxels on the full grid. Body parts closer than a cube apart count as one component (the box can
   only grow: the CT table touching the body stays in), and a speck of noise in the air, or a
   separate table, is dropped. MONAI has ``get_largest_connected_component_mask`` and
   ``KeepLargestConnectedComponent``, but they label through scikit-image on the host (cuCIM on a
   GPU, where installed), so the mask leaves the device, and they rank components by node count;
   only the bounding box is needed here, a coarse grid labels fast on any device in torch, and its
   components are ranked by the body voxels they hold (:func:`largest_component`; the whole detection took
   about 1 s for a BTCV-sized volume on this project's 2-core CPU, ``bench/body_crop_bench.py``).
3. **Body box**: the component's bounding box, ``margin`` voxels wider on each side, clipped to the
   image; for a batch, the union of the cases' boxes.
4. **Windows**: of the windows the wrapped inferer would run over the whole image (MONAI's tiling:
   ``roi_size``, ``overlap``), those that meet the body box; the run box is their union
   (:func:`window_box`). MONAI's tiling of the run box is exactly that subset, so every voxel of the
   body box is covered by the same windows, blended with the same weights in the same order, as in
   the uncropped run: **inside the body box the output is the uncropped output**, for any network
   (to the last bit where the network gives each window the same numbers whatever its batch
   neighbours). Between the body box and the run box the blend misses the skipped windows; outside
   the run box, fixed background logits (see ``outside``). No body found (an empty mask), or no
   window to skip: the whole image (logged). Only windows wholly in the air are skipped, so the
   saving needs air wider than a window beside the body; ``tiling="box"`` tiles the body box afresh
   instead (fewer windows, an output that differs inside, see :class:`BodyCropInferer`).

Each call logs the boxes and how many windows ran out of how many (:func:`count_windows`, the count
MONAI's ``sliding_window_inference`` runs). Measured on the CT sample ``ct_full`` (243 x 201 x 168 at
1.5 x 1.5 x 2.0 mm, ROI 96^3): the body spans the field of view, so no window is skipped at overlap
0.25 (24 of 24) or 0.5 (60 of 60), with either tiling; the saving depends on the scan's field of view.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.utils import convert_to_dst_type, ensure_tuple_rep, fall_back_tuple

from custom.utils import require_bool

__all__ = [
    "BACKGROUND_LOGIT",
    "BodyCropInferer",
    "body_box",
    "body_crop_inferer",
    "body_mask",
    "count_windows",
    "hu_to_window",
    "largest_component",
    "roi_box",
    "window_box",
]

logger = logging.getLogger(__name__)

#: the logit written outside the box: softmax outputs get ``[+L, 0, ..., 0]`` (argmax 0, softmax
#: ``(1, e^-L, ...)``: background 1.0 exactly in float32, others about 2e-22), sigmoid outputs
#: ``-L`` in every channel (sigmoid about 2e-22, below any threshold). 50 fits fp16 and bf16 too.
BACKGROUND_LOGIT = 50.0

MODES = ("above", "nonzero")
OUTSIDE = ("softmax", "sigmoid")
TILINGS = ("aligned", "box")


def hu_to_window(hu: float, intensity_range: Sequence[float], out_range: Sequence[float] = (0.0, 1.0)) -> float:
    """The preprocessed value of ``hu`` under ``ScaleIntensityRange(a_min, a_max, b_min, b_max, clip=True)``.

    Args:
        hu: a CT value in Hounsfield units.
        intensity_range: the window ``(a_min, a_max)`` in HU (the bundles' ``intensity_range``).
        out_range: ``(b_min, b_max)``; the bundles use ``(0, 1)``.

    Raises:
        ValueError: the window is empty or reversed.

    Example:
        >>> hu_to_window(-175, (-175, 250)), hu_to_window(-1000, (-175, 250)), round(hu_to_window(40, (-175, 250)), 3)
        (0.0, 0.0, 0.506)
    """
    a_min, a_max = float(intensity_range[0]), float(intensity_range[1])
    b_min, b_max = float(out_range[0]), float(out_range[1])
    if not a_max > a_min:
        raise ValueError(f"intensity_range {list(intensity_range)}: a_max must be above a_min")
    value = b_min + (min(max(float(hu), a_min), a_max) - a_min) / (a_max - a_min) * (b_max - b_min)
    return float(value)


def count_windows(
    image_size: Sequence[int], roi_size: Sequence[int] | int, overlap: Sequence[float] | float = 0.25
) -> int:
    """How many windows MONAI's ``sliding_window_inference`` runs over one image of ``image_size``.

    The same rule as ``sliding_window_inference`` (MONAI 1.6): an image smaller than the ROI is padded
    up to it; the scan interval is ``int(roi * (1 - overlap))`` (at least 1), or ``roi`` where the
    image equals the ROI; ``dense_patch_slices`` then takes ``ceil((size - roi) / interval) + 1``
    windows per dimension (the last one shifted back inside). MONAI computes the slices themselves;
    this is the count alone, in closed form, for the log.

    Args:
        image_size: spatial size of the image.
        roi_size: window size (an int for all dimensions; non-positive entries take the image's size).
        overlap: overlap per dimension (or one for all), in [0, 1).

    Raises:
        ValueError: overlap outside [0, 1).

    Example:
        >>> count_windows((244, 202, 168), (96, 96, 96), 0.5)
        60
    """
    image_size = tuple(int(s) for s in image_size)
    dims = len(image_size)
    roi = fall_back_tuple(roi_size, image_size)
    overlaps = ensure_tuple_rep(overlap, dims)
    if any(not 0 <= o < 1 for o in overlaps):
        raise ValueError(f"overlap must be >= 0 and < 1, got {overlap}")
    total = 1
    for size, r, o in zip(image_size, roi, overlaps, strict=True):
        size = max(size, r)
        interval = r if r == size else max(int(r * (1 - o)), 1)
        total *= math.ceil((size - r) / interval) + 1
    return total


def body_mask(image: torch.Tensor, mode: str = "above", threshold: float = 0.0) -> torch.Tensor:
    """Body voxels of ``image`` (``C`` + spatial, or ``B, C`` + spatial): any channel above ``threshold``, or non-zero.

    Args:
        image: the preprocessed image.
        mode: ``"above"`` (CT windowed to 0..1: strictly above ``threshold``) or ``"nonzero"`` (MRI
            z-scored over its non-zero voxels: any value but 0).
        threshold: for ``"above"``, in the preprocessed units (see :func:`hu_to_window`).

    Returns:
        a bool tensor without the channel dimension, on ``image``'s device.

    Raises:
        ValueError: an unknown ``mode``.
    """
    if mode == "above":
        return (image > threshold).any(dim=-4)
    if mode == "nonzero":
        return (image != 0).any(dim=-4)
    raise ValueError(f"body crop mode {mode!r}: expected one of {MODES}")


def _block_sums(mask: torch.Tensor, block: int) -> torch.Tensor:
    """Number of true voxels of a 3D ``mask`` in each ``block``^3 cube (the mask zero-padded to a multiple)."""
    pad = [(-s) % block for s in mask.shape]
    m = F.pad(mask.to(torch.int32), (0, pad[2], 0, pad[1], 0, pad[0]))
    x, y, z = (s // block for s in m.shape)
    return m.view(x, block, y, block, z, block).sum(dim=(1, 3, 5))


def largest_component(mask: torch.Tensor, block: int = 4) -> torch.Tensor:
    """The voxels of a 3D bool ``mask`` in its largest 26-connected component, judged on ``block``^3 cubes.

    Each cube holding a mask voxel is a node; neighbouring nodes (26-connectivity) are connected.
    Labels spread by 3^3 max-pooling and pointer jumping (a node takes the label of the node its label
    names) until nothing changes; the component with the most mask voxels wins (the first on a tie).
    Exact for the coarse graph, on ``mask``'s device. With ``block=1`` it is the usual largest
    26-connected component, but slow on a whole volume (80 s for 243 x 201 x 168 on this project's
    CPU, against 0.6 s with the default ``block=4`` of :class:`BodyCropInferer`).

    Args:
        mask: bool, spatial dimensions only (X, Y, Z).
        block: edge of the cubes, in voxels (>= 1).

    Returns:
        bool tensor like ``mask``: the mask voxels in the largest component (all False for an empty mask).

    Raises:
        ValueError: ``mask`` is not 3D, or ``block`` < 1.

    Example:
        >>> m = torch.zeros(20, 20, 20, dtype=torch.bool)
        >>> m[2:8, 2:8, 2:8] = True; m[15, 15, 15] = True
        >>> int(largest_component(m, block=2).sum())
        216
    """
    if mask.ndim != 3:
        raise ValueError(f"largest_component takes a 3D mask, got shape {tuple(mask.shape)}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    mask = mask.bool()
    counts = _block_sums(mask, block)
    nodes = counts > 0
    if not nodes.any():
        return torch.zeros_like(mask)
    n = nodes.numel()
    # float64 labels: max_pool3d takes floating point only, and float64 is exact for any index here
    index = torch.arange(1, n + 1, device=mask.device, dtype=torch.float64).view(nodes.shape)
    labels = torch.where(nodes, index, 0.0)
    while True:
        spread = F.max_pool3d(labels[None, None], kernel_size=3, stride=1, padding=1)[0, 0]
        spread = torch.where(nodes, spread, 0.0)
        flat = spread.flatten()
        jumped = flat[(flat.long() - 1).clamp(min=0)].view(nodes.shape)
        spread = torch.where(nodes, torch.maximum(spread, jumped), 0.0)
        if torch.equal(spread, labels):
            break
        labels = spread
    sizes = torch.zeros(n + 1, device=mask.device, dtype=torch.int64)
    sizes.scatter_add_(0, labels.flatten().long(), counts.flatten().long())
    sizes[0] = 0
    keep = labels == sizes.argmax()
    for dim in range(3):
        keep = keep.repeat_interleave(block, dim=dim)
    return keep[: mask.shape[0], : mask.shape[1], : mask.shape[2]] & mask


def body_box(mask: torch.Tensor, margin: int | Sequence[int] = 4) -> tuple[slice, ...] | None:
    """The bounding box of a spatial bool ``mask``, ``margin`` voxels wider on each side, clipped to the image.

    Args:
        mask: bool, spatial dimensions only.
        margin: voxels added on each side, per dimension or one for all.

    Returns:
        one slice per spatial dimension, or None for an empty mask.

    Example:
        >>> m = torch.zeros(40, 40, 40, dtype=torch.bool); m[10:20, 5:6, 30:40] = True
        >>> body_box(m, margin=2)
        (slice(8, 22, None), slice(3, 8, None), slice(28, 40, None))
    """
    if not bool(mask.any()):
        return None
    dims = mask.ndim
    margins = ensure_tuple_rep(margin, dims)
    box = []
    for d in range(dims):
        other = tuple(i for i in range(dims) if i != d)
        hits = torch.nonzero(mask.any(dim=other) if other else mask).flatten()
        lo = max(int(hits[0]) - int(margins[d]), 0)
        hi = min(int(hits[-1]) + 1 + int(margins[d]), mask.shape[d])
        box.append(slice(lo, hi))
    return tuple(box)


def window_box(
    box: Sequence[slice],
    image_size: Sequence[int],
    roi_size: Sequence[int] | int,
    overlap: Sequence[float] | float = 0.25,
) -> tuple[slice, ...]:
    """The union of the sliding windows over ``image_size`` that meet ``box``.

    The windows are those MONAI's ``sliding_window_inference`` places over the whole image (starts
    ``k * interval``, the last one shifted back inside, see :func:`count_windows`); in each dimension
    the ones that overlap ``box`` are kept. MONAI's tiling of the returned box is exactly those
    windows. A dimension where the image is not larger than the ROI is kept whole.

    Args:
        box: one slice per spatial dimension (the body box).
        image_size: spatial size of the whole image.
        roi_size: window size (an int for all dimensions; non-positive entries take the image's size).
        overlap: overlap per dimension (or one for all), in [0, 1).

    Example:
        >>> window_box((slice(59, 64), slice(0, 4), slice(18, 24)), (64, 64, 48), 16, 0.5)
        (slice(48, 64, None), slice(0, 16, None), slice(8, 32, None))
    """
    image_size = tuple(int(s) for s in image_size)
    roi = fall_back_tuple(roi_size, image_size)
    overlaps = ensure_tuple_rep(overlap, len(image_size))
    out = []
    for b, size, r, o in zip(box, image_size, roi, overlaps, strict=True):
        if size <= r:
            out.append(slice(0, size))
            continue
        interval = max(int(r * (1 - o)), 1)
        starts = [min(k * interval, size - r) for k in range(math.ceil((size - r) / interval) + 1)]
        kept = [s for s in starts if s < b.stop and s + r > b.start]
        out.append(slice(min(kept), max(kept) + r))
    return tuple(out)


def roi_box(box: Sequence[slice], image_size: Sequence[int], roi_size: Sequence[int] | int) -> tuple[slice, ...]:
    """``box`` grown to at least ``roi_size`` per dimension, around its centre, shifted to stay inside the image.

    Where the image is smaller than the ROI, the whole dimension (the inferer pads it as always).

    Example:
        >>> roi_box((slice(10, 20), slice(0, 4), slice(2, 6)), (40, 40, 8), 16)
        (slice(7, 23, None), slice(0, 16, None), slice(0, 8, None))
    """
    image_size = tuple(int(s) for s in image_size)
    roi = fall_back_tuple(roi_size, image_size)
    out = []
    for b, size, r in zip(box, image_size, roi, strict=True):
        need = min(r, size)
        lo, hi = b.start, b.stop
        if hi - lo < need:
            lo = max(min((lo + hi - need) // 2, size - need), 0)
            hi = lo + need
        out.append(slice(lo, hi))
    return tuple(out)


class BodyCropInferer(Inferer):
    """``inferer`` (a ``SlidingWindowInferer``) over the windows that meet the body's box, background outside.

    Used in place of the bundle's ``inferer`` by ``SupervisedEvaluator``: same call,
    ``(inputs, network, *args, **kwargs)``, inputs ``B, C`` + 3 spatial dimensions, and the output of
    the full spatial size (a ``MetaTensor`` with the input's metadata where the input is one, as
    ``sliding_window_inference`` gives, so ``Invertd`` works as before). See the module docstring
    for the rule.

    Args:
        inferer: the wrapped inferer; it must have ``roi_size`` and ``overlap`` (MONAI's
            ``SlidingWindowInferer`` and its subclasses do).
        mode: ``"above"`` (CT) or ``"nonzero"`` (MRI), see :func:`body_mask`.
        threshold: for ``"above"``, in preprocessed units; 0.0 is the bundles' CT window minimum.
        margin: voxels around the body's bounding box.
        outside: ``"softmax"`` (one channel per class, background first: ``[+L, 0, ...]`` outside) or
            ``"sigmoid"`` (one channel per region: ``-L`` everywhere outside), L =
            :data:`BACKGROUND_LOGIT`.
        block: cube edge for the connected components (:func:`largest_component`).
        tiling: ``"aligned"`` (default): the windows of the whole image's tiling that meet the body
            box (:func:`window_box`): inside the body box the output is the uncropped output, and
            only windows wholly in air are skipped. ``"box"``: a fresh tiling of the body box (grown
            to the ROI, :func:`roi_box`): fewer windows where the air is narrower than a window, but
            the windows sit elsewhere, so the output inside differs from the uncropped one (by how
            much for trained weights: ``bench/body_crop_bench.py --weights``).

    Raises:
        TypeError: ``inferer`` has no ``roi_size``/``overlap``; the network's output is not a tensor.
        ValueError: unknown ``mode`` or ``outside``, negative ``margin``, input not 3D.

    Example:
        >>> from monai.inferers import SlidingWindowInferer
        >>> inferer = BodyCropInferer(SlidingWindowInferer((16, 16, 16), 1, 0.5), outside="softmax")
        >>> image = torch.zeros(1, 1, 64, 64, 64); image[:, :, 20:30, 20:30, 20:30] = 0.5
        >>> net = torch.nn.Conv3d(1, 3, 1)
        >>> out = inferer(image, net)
        >>> tuple(out.shape), int(out[0, :, 0, 0, 0].argmax()), inferer.last_windows
        ((1, 3, 64, 64, 64), 0, (64, 343))
    """

    def __init__(
        self,
        inferer: Inferer,
        mode: str = "above",
        threshold: float = 0.0,
        margin: int | Sequence[int] = 4,
        outside: str = "softmax",
        block: int = 4,
        tiling: str = "aligned",
    ) -> None:
        super().__init__()
        if not (hasattr(inferer, "roi_size") and hasattr(inferer, "overlap")):
            raise TypeError(
                f"BodyCropInferer wraps a sliding-window inferer (with roi_size and overlap), got {type(inferer).__name__}"
            )
        if mode not in MODES:
            raise ValueError(f"body crop mode {mode!r}: expected one of {MODES}")
        if tiling not in TILINGS:
            raise ValueError(f"body crop tiling {tiling!r}: expected one of {TILINGS}")
        if outside not in OUTSIDE:
            raise ValueError(f"body crop outside {outside!r}: expected one of {OUTSIDE}")
        if any(int(m) < 0 for m in ensure_tuple_rep(margin, 3)):
            raise ValueError(f"body crop margin must be >= 0, got {margin}")
        self.inferer = inferer
        self.mode = mode
        self.threshold = float(threshold)
        self.margin = margin
        self.outside = outside
        self.block = int(block)
        self.tiling = tiling
        #: (windows run, windows of the whole image) of the last call, for the batch
        self.last_windows: tuple[int, int] | None = None
        #: the body box of the last call (None: no body found, the whole image ran)
        self.last_body_box: tuple[slice, ...] | None = None
        #: the box the wrapped inferer ran on in the last call (:func:`window_box` of the body box)
        self.last_box: tuple[slice, ...] | None = None

    @property
    def roi_size(self) -> Any:
        """The wrapped sliding window's ROI (read by tests, MONAI Label and the recipe checks)."""
        return self.inferer.roi_size

    @property
    def overlap(self) -> Any:
        return self.inferer.overlap

    @property
    def sw_batch_size(self) -> int:
        return self.inferer.sw_batch_size

    def box(self, inputs: torch.Tensor) -> tuple[slice, ...] | None:
        """The body box of a batch ``inputs`` (``B, C`` + spatial; the union of the cases' boxes), or None: no body."""
        boxes = []
        for case in inputs:
            case_box = body_box(largest_component(body_mask(case, self.mode, self.threshold), self.block), self.margin)
            if case_box is not None:
                boxes.append(case_box)
        if not boxes:
            return None
        dims = inputs.ndim - 2
        return tuple(slice(min(b[d].start for b in boxes), max(b[d].stop for b in boxes)) for d in range(dims))

    def background(self, channels: int, like: torch.Tensor) -> torch.Tensor:
        """The logits written outside the run box, shaped ``(1, channels, 1, 1, 1)``."""
        if self.outside == "softmax":
            values = torch.zeros(channels, dtype=like.dtype, device=like.device)
            values[0] = BACKGROUND_LOGIT
        else:
            values = torch.full((channels,), -BACKGROUND_LOGIT, dtype=like.dtype, device=like.device)
        return values.view(1, channels, 1, 1, 1)

    def __call__(
        self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Run the wrapped inferer on the windows of ``inputs`` (``B, C, X, Y, Z``) that meet the body; background outside."""
        if inputs.ndim != 5:
            raise ValueError(f"BodyCropInferer takes B, C, X, Y, Z inputs, got shape {tuple(inputs.shape)}")
        plain = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        spatial = tuple(plain.shape[2:])
        batch = plain.shape[0]
        roi, overlap = self.inferer.roi_size, self.inferer.overlap
        total = count_windows(spatial, roi, overlap) * batch
        body = self.box(plain)
        self.last_body_box = body
        if body is None:
            self.last_box, self.last_windows = None, (total, total)
            logger.info(f"body crop: no body found in {spatial}: whole image, {total} of {total} windows")
            return self.inferer(inputs, network, *args, **kwargs)
        box = window_box(body, spatial, roi, overlap) if self.tiling == "aligned" else roi_box(body, spatial, roi)
        run = count_windows([s.stop - s.start for s in box], roi, overlap) * batch
        self.last_box, self.last_windows = box, (run, total)
        logger.info(
            f"body crop: body [{_text(body)}], windows over [{_text(box)}] of {spatial}: {run} of {total} windows"
        )
        if run >= total:  # every window is needed: the whole image, as without the crop
            return self.inferer(inputs, network, *args, **kwargs)
        crop = self.inferer(plain[(slice(None), slice(None), *box)].contiguous(), network, *args, **kwargs)
        if not isinstance(crop, torch.Tensor):
            raise TypeError(f"BodyCropInferer needs a network with one tensor output, got {type(crop).__name__}")
        crop = crop.as_tensor() if isinstance(crop, MetaTensor) else crop
        out = self.background(crop.shape[1], crop).expand(batch, crop.shape[1], *spatial).clone()
        out[(slice(None), slice(None), *box)] = crop
        if isinstance(inputs, MetaTensor):
            out = convert_to_dst_type(out, MetaTensor([]).copy_meta_from(inputs, copy_attr=False), device=out.device)[0]
        return out


def _text(box: Sequence[slice]) -> str:
    return ", ".join(f"{s.start}:{s.stop}" for s in box)


def body_crop_inferer(inferer: Inferer, enabled: bool = True, **kwargs: Any) -> Inferer:
    """``BodyCropInferer(inferer, **kwargs)`` when ``enabled``, else ``inferer`` itself (the bundles' ``body_crop`` id).

    Args:
        inferer: the bundle's sliding-window inferer.
        enabled: the ``body_crop`` setting: True or False (a Python literal on the command line).
        kwargs: :class:`BodyCropInferer`'s other arguments.

    Raises:
        TypeError: ``enabled`` is not a bool (``--body_crop false`` arrives as the string "false").
    """
    require_bool(enabled, "body_crop")
    return BodyCropInferer(inferer, **kwargs) if enabled else inferer
