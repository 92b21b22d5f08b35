"""What the bench scripts share: the repository's paths, the two sizes they measure at, the FLOP count.

Every script is run as a module from the repository root (``python -m bench.compare ...``), so
``bench``, ``bundles`` and ``custom`` import as packages. Sizes: ``small`` is what runs on this
CPU (feature_size 12, 64^3 crops, the CT sample's own 3 mm grid); ``full`` is the recipe (feature_size
48, 96^3 crops, 1.5 x 1.5 x 2.0 mm), for a GPU.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from bundles.sample_data import DEFAULT_SAMPLE_DIR, SMALL_SIZES

__all__ = [
    "REPO",
    "RESULTS",
    "SAMPLE_DIR",
    "SIZES",
    "VOLUMES",
    "FLOP_PER_CROP_F48_96",
    "PEAK_FLOPS",
    "flop_utilisation",
    "cpu_name",
]

REPO = Path(__file__).resolve().parents[1]
#: where the result files live (``results/<script>_<device>_<date>.json``)
RESULTS = REPO / "bench" / "results"
#: the shared CT sample, beside the checkout
SAMPLE_DIR = DEFAULT_SAMPLE_DIR
#: bundle overrides per size (small: the tests' and the demo's); at the BTCV spacing one inference volume alone
#: takes about 5 minutes on two CPU cores
SIZES = {
    "small": dict(SMALL_SIZES),
    "full": {"feature_size": 48, "roi_size": [96, 96, 96], "pixdim": [1.5, 1.5, 2.0]},
}
#: the sample's ``ct_full.nii.gz`` on each size's grid: the volume the inference benchmarks slide over
VOLUMES = {"small": (122, 101, 112), "full": (244, 202, 168)}
#: FLOPs of one 96^3 crop through Swin UNETR f48, forward plus backward (FACTS.md)
FLOP_PER_CROP_F48_96 = 1.909e12
#: bf16 dense peak FLOP/s by GPU name
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12}


def flop_utilisation(crops_per_second: float, device: str, feature_size: int, roi: int) -> float | None:
    """Model FLOP utilisation of a training rate at the full size on a GPU of :data:`PEAK_FLOPS`, else None.

    >>> flop_utilisation(100.0, "NVIDIA H100 80GB HBM3", 48, 96)
    0.193
    >>> flop_utilisation(100.0, "NVIDIA H100 80GB HBM3", 12, 64) is None
    True
    """
    peak = next((v for k, v in PEAK_FLOPS.items() if k in device), None)
    if peak is None or (feature_size, roi) != (48, 96):
        return None
    return round(crops_per_second * FLOP_PER_CROP_F48_96 / peak, 4)


def cpu_name() -> str:
    """``<processor or machine>, <N> cores``: the CPU a result was measured on."""
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
