"""Memory planned before a cache is filled: estimate, compare with what is free, fall back instead of dying.

``CacheDataset`` fills its cache item by item; when the cache does not fit, the OOM killer ends the run
after minutes of caching with nothing but "exit -9" (model-zoo #395, MONAI Label #1175). MONAI has no
estimate of a cache's size, hence :class:`CachePlan`: before the cache is filled it

1. reads each case's image header (shape and voxel size; NIfTI through nibabel, no voxel data) and
   computes its voxel count after resampling to ``pixdim`` and padding to ``roi_size``;
2. runs the first case through the cache's own deterministic transforms once and measures what
   each voxel costs as cached: the dense arrays (image channels, label, at their cached dtypes) per
   voxel, and the foreground/background indices (``FgBgToIndicesd``: one index per voxel whose image
   is above the threshold) as a fraction of the resampled voxels;
3. sums ``voxels x dense bytes + voxels x index fraction x index bytes`` over the cases to cache (the
   foreground crop is taken as none: an upper bound; on the sample CT the estimate is 2-6 % above the
   measured cache, see the BTCV docs);
4. compares it with the free memory of the cache's device (``torch.cuda.mem_get_info`` less
   ``device_reserve_gib`` for the model and its activations) or with host RAM (``MemAvailable`` less
   ``host_margin``), and where it does not fit, logs the numbers and falls back: a device cache moves
   to the CPU, a CPU cache caches fewer cases (a lower ``cache_rate``; the rest are loaded per step).

Budgets for tests and for users who know better: the environment variables ``SWIN_CACHE_DEVICE_MIB``
and ``SWIN_CACHE_HOST_MIB`` replace the measured budget (MiB, after margins).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["CachePlan", "host_budget_bytes", "device_budget_bytes", "resampled_voxels"]

logger = logging.getLogger(__name__)

MIB = 2**20
GIB = 2**30
DEVICE_ENV = "SWIN_CACHE_DEVICE_MIB"
HOST_ENV = "SWIN_CACHE_HOST_MIB"


def resampled_voxels(
    path: str | os.PathLike, pixdim: Sequence[float] | None = None, roi_size: Sequence[int] | None = None
) -> tuple[int, int] | None:
    """Voxels of a NIfTI image after resampling to ``pixdim``: ``(unpadded, padded to roi_size)``, from its header.

    Returns None for what nibabel cannot read as an image header (a DICOM folder, another format).

    Example:
        >>> import tempfile, nibabel as nib
        >>> p = tempfile.mktemp(suffix=".nii")
        >>> nib.save(nib.Nifti1Image(np.zeros((10, 10, 5), np.int16), np.diag([3.0, 3.0, 3.0, 1.0])), p)
        >>> resampled_voxels(p, [1.5, 1.5, 2.0], [32, 32, 32])
        (3200, 32768)
    """
    try:
        import nibabel as nib

        header = nib.load(str(path)).header
    except Exception:  # not a file nibabel reads
        return None
    shape = np.asarray(header.get_data_shape()[:3], float)
    if pixdim is not None:
        zooms = np.asarray(header.get_zooms()[:3], float)
        shape = np.maximum(np.round(shape * zooms / np.asarray(pixdim, float)), 1)
    unpadded = int(np.prod(shape))
    padded = int(np.prod(np.maximum(shape, roi_size))) if roi_size is not None else unpadded
    return unpadded, padded


def _meminfo_available() -> int:
    """Host RAM available for new allocations, in bytes (psutil when installed, else /proc/meminfo)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    raise RuntimeError("cannot tell the available host memory (no psutil, no MemAvailable in /proc/meminfo)")


def host_budget_bytes(margin: float = 0.1) -> int:
    """Host RAM a cache may take: ``MemAvailable`` less ``margin`` of it (or ``SWIN_CACHE_HOST_MIB``)."""
    if os.environ.get(HOST_ENV):
        return int(float(os.environ[HOST_ENV]) * MIB)
    return int(_meminfo_available() * (1.0 - margin))


def device_budget_bytes(device: torch.device, reserve_gib: float = 16.0) -> int:
    """Free memory of a CUDA ``device`` less ``reserve_gib`` for the model and its activations (or the env value)."""
    if os.environ.get(DEVICE_ENV):
        return int(float(os.environ[DEVICE_ENV]) * MIB)
    free, _ = torch.cuda.mem_get_info(device)
    return max(0, int(free - reserve_gib * GIB))


class CachePlan:
    """Where a ``CacheDataset`` caches and how much: :attr:`device` and :attr:`cache_rate`, decided on construction.

    Used by the bundles' dataset blocks: ``"cache_rate": "$@train#cache_plan.cache_rate"`` and, for a
    cache on the training device, the cache transforms' ``"device": "$@train#cache_plan.device"``.
    See the module docstring for the estimate and the fallbacks.

    Args:
        data: the dataset's items (dicts naming files), in order; ``CacheDataset`` caches the first
            ``int(len(data) * cache_rate)``.
        transform: the deterministic transforms the cache holds the output of (a callable or a list of
            transforms), run on the first case, on the CPU; transforms after it that only change a
            dtype or add indices are described by ``cached_bytes`` and ``index_bytes``.
        device: where the cache is wanted (``@data_device``); a CUDA device falls back to the CPU.
        cache_rate: the wanted fraction of cases to cache.
        pixdim, roi_size: the recipe's resampling spacing (None: native) and crop (the cache pads to it).
        image_key: the item key whose file header gives the voxel counts.
        cached_bytes: bytes per element as cached for some keys (``{"label": 1}`` for a uint8 label);
            other dense arrays count at their dtype as the transform returns them.
        index_bytes: bytes per foreground/background index (4 for int32, 0 when none are cached).
        index_key, index_threshold: indices are counted where ``out[index_key] > index_threshold``.
        device_reserve_gib: device memory kept for the model, optimizer and activations.
        host_margin: fraction of the available host RAM kept free.
        name: what the cache is, for the log ("training", "validation").

    Raises:
        ValueError: ``cache_rate`` outside [0, 1].
    """

    def __init__(
        self,
        data: Sequence[Mapping[str, Any]],
        transform: Callable | Sequence[Callable],
        device: str | torch.device | None = "cpu",
        cache_rate: float = 1.0,
        pixdim: Sequence[float] | None = None,
        roi_size: Sequence[int] | None = None,
        image_key: str = "image",
        cached_bytes: Mapping[str, int] | None = None,
        index_bytes: int = 0,
        index_key: str = "image",
        index_threshold: float = 0.0,
        device_reserve_gib: float = 16.0,
        host_margin: float = 0.1,
        name: str = "training",
    ) -> None:
        if not 0.0 <= float(cache_rate) <= 1.0:
            raise ValueError(f"cache_rate must be within [0, 1], got {cache_rate!r}")
        self.name, self.data = name, list(data)
        self.wanted_device = torch.device(device if device is not None else "cpu")
        self.wanted_rate = float(cache_rate)
        self.device, self.cache_rate = self.wanted_device, self.wanted_rate
        self.pixdim, self.roi_size, self.image_key = pixdim, roi_size, image_key
        self.cached_bytes, self.index_bytes = dict(cached_bytes or {}), int(index_bytes)
        self.index_key, self.index_threshold = index_key, float(index_threshold)
        self.per_case: list[int] = []
        self.estimate = 0
        n_cached = min(int(len(self.data) * self.wanted_rate), len(self.data))
        if n_cached == 0:
            return
        if not callable(transform):
            from monai.transforms import Compose

            transform = Compose(list(transform))
        self.per_case = self._estimate_cases(transform, n_cached)
        self.estimate = sum(self.per_case)
        self._decide(device_reserve_gib, host_margin)

    # ---------------------------------------------------------------- the estimate
    def measure(self, out: Mapping[str, Any]) -> tuple[float, int]:
        """``(dense bytes per voxel, number of indices)`` of one transformed item, as the cache would hold it."""
        image = out[self.image_key]
        spatial = int(np.prod(image.shape[1:]))
        dense = 0.0
        indices = 0
        for key, value in out.items():
            if not isinstance(value, (torch.Tensor, np.ndarray)) or value.ndim < 2:
                if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 1 and value.shape[0] > 3:
                    indices += int(value.shape[0])  # indices already in the output (e.g. FgBgToIndicesd)
                continue
            itemsize = self.cached_bytes.get(key, value.element_size() if torch.is_tensor(value) else value.itemsize)
            dense += int(np.prod(value.shape)) / spatial * itemsize
        if self.index_bytes and not indices:
            indices = int((torch.as_tensor(out[self.index_key]) > self.index_threshold).sum())
        return dense, indices

    def _estimate_cases(self, transform: Callable, n_cached: int) -> list[int]:
        first = self.data[0]
        out = transform(dict(first))
        if isinstance(out, list):  # a transform that returns several samples: the cache holds them all
            out = out[0]
        dense, indices = self.measure(out)
        real_first = out[self.image_key].shape[1:]
        header_first = resampled_voxels(first[self.image_key], self.pixdim, self.roi_size)
        fraction = indices / header_first[0] if header_first else 0.0
        sizes = []
        for item in self.data[:n_cached]:
            voxels = resampled_voxels(item[self.image_key], self.pixdim, self.roi_size) if header_first else None
            if voxels is None:  # no header to read: assume every case costs what the first one does
                voxels = (int(np.prod(real_first)), int(np.prod(real_first)))
                fraction = indices / voxels[0]
            sizes.append(int(voxels[1] * dense + voxels[0] * fraction * self.index_bytes))
        return sizes

    # ---------------------------------------------------------------- the decision
    def _decide(self, device_reserve_gib: float, host_margin: float) -> None:
        n = len(self.data)
        what = f"{self.name} cache: {len(self.per_case)} of {n} cases, about {self.estimate / MIB:.0f} MiB estimated"
        if self.wanted_device.type == "cuda":
            budget = device_budget_bytes(self.wanted_device, device_reserve_gib)
            if self.estimate <= budget:
                logger.info(f"{what}; fits on {self.wanted_device} ({budget / MIB:.0f} MiB free after the reserve)")
                return
            self.device = torch.device("cpu")
            logger.warning(
                f"{what}; does not fit on {self.wanted_device} ({budget / MIB:.0f} MiB free after keeping "
                f"{device_reserve_gib:g} GiB for the model): caching on the CPU instead"
            )
        budget = host_budget_bytes(host_margin)
        if self.estimate <= budget:
            logger.info(f"{what}; fits in host RAM ({budget / MIB:.0f} MiB available after the margin)")
            return
        fit, total = 0, 0
        for size in self.per_case:
            if total + size > budget:
                break
            total, fit = total + size, fit + 1
        self.cache_rate = min(1.0, fit / n + 1e-9) if fit else 0.0  # CacheDataset caches int(n * rate) cases
        logger.warning(
            f"{what}; does not fit in host RAM ({budget / MIB:.0f} MiB available after the margin): caching "
            f"{fit} of {n} cases (cache_rate {self.wanted_rate:g} -> {fit / n:.3g}, about {total / MIB:.0f} MiB); "
            "the others are loaded at each step"
        )

    def __repr__(self) -> str:
        return (
            f"CachePlan({self.name}: {self.estimate / MIB:.1f} MiB for {len(self.per_case)} of {len(self.data)} "
            f"cases, device {self.device}, cache_rate {self.cache_rate:g})"
        )
