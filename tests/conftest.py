"""Shared fixtures: the real CT sample as a BTCV dataset folder, and one tiny model trained through the bundle.

Sizes are the smallest Swin UNETR takes (feature_size 12, 64^3), on the sample's own 3 mm grid, so
every bundle command runs in seconds to a minute on two CPU cores while taking its real code path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BTCV = REPO / "swin_unetr_btcv"
sys.path.insert(0, str(REPO))

from bundles.demo import DEMO_OVERRIDES, bundle_command  # noqa: E402
from bundles.demo import cli_args as cli  # noqa: E402,F401  (re-exported to the test modules)
from bundles.sample_data import DEFAULT_SAMPLE_DIR, prepare_sample_dataset  # noqa: E402

#: ``run_bundle(..., python_args=TORCHRUN)``: the same command under torchrun, 2 processes (gloo on CPUs)
TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
#: overrides every bundle command in the tests shares: the demo's small sizes, a cheaper sliding window
SMALL = {**DEMO_OVERRIDES, "sw_batch_size": 2, "overlap": 0.25}


def run_bundle(
    run_id: str,
    configs: list[str],
    overrides: dict,
    cwd: Path = BTCV,
    timeout: int = 600,
    check: bool = True,
    python_args: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run <run_id>`` in ``cwd`` with PYTHONPATH cleared, as a user runs it."""
    cmd = bundle_command(run_id, configs, overrides)
    cmd[1:1] = python_args
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run(
        cmd, cwd=cwd, capture_output=True, encoding="utf-8", errors="replace", timeout=timeout, env=env
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}\nexit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    if not (DEFAULT_SAMPLE_DIR / "ct_slab.nii.gz").is_file():
        pytest.fail(f"the shared CT sample is missing: {DEFAULT_SAMPLE_DIR}")
    return DEFAULT_SAMPLE_DIR


@pytest.fixture(scope="session")
def sample_dataset(tmp_path_factory, sample_dir) -> Path:
    """A BTCV-layout dataset folder made from the real sample (labels imported into BTCV classes)."""
    out = tmp_path_factory.mktemp("btcv_sample")
    prepare_sample_dataset(out, sample_dir)
    return out


@pytest.fixture(scope="session")
def trained(tmp_path_factory, sample_dataset) -> dict:
    """Train 2 epochs x 1 step through ``run training``; returns the paths and the command's output."""
    work = tmp_path_factory.mktemp("btcv_run")
    paths = {
        "dataset_dir": str(sample_dataset),
        "ckpt_dir": str(work / "models"),
        "output_dir": str(work / "outputs"),
    }
    overrides = {
        **paths,
        **SMALL,
        "max_epochs": 2,
        "epoch_length": 1,
        "val_interval": 1,
        "num_samples": 1,
        "use_checkpoint": False,
        "warmup_epochs": 1,
    }
    proc = run_bundle("training", ["configs/train.json"], overrides)
    return {**paths, "work": work, "overrides": overrides, "proc": proc}


@pytest.fixture()
def input_dir(tmp_path, sample_dir) -> Path:
    """A folder holding one image to segment: the real CT slab as ``slab.nii.gz``."""
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(sample_dir / "ct_slab.nii.gz", d / "slab.nii.gz")
    return d


#: SeriesInstanceUID :func:`write_dicom_series` gives a series unless told otherwise
CT_UID = "1.2.826.0.1.3680043.2.1125.7.1"
#: a second series of the same study (a localizer, in the tests)
LOCALIZER_UID = "1.2.826.0.1.3680043.2.1125.7.2"


def write_dicom_series(
    nifti: Path, folder: Path, series_uid: str = CT_UID, slices: range | None = None, prefix: str = "slice"
) -> None:
    """Write ``nifti`` (or the ``slices`` of it) as a DICOM CT series with ITK, one file per slice."""
    import itk

    image = itk.imread(str(nifti), itk.SS)
    voxels = itk.array_from_image(image)  # (z, y, x)
    origin, spacing = np.array(itk.origin(image)), np.array(itk.spacing(image))
    direction = itk.array_from_matrix(image.GetDirection())
    folder.mkdir(parents=True, exist_ok=True)
    for i in slices if slices is not None else range(voxels.shape[0]):
        sl = itk.image_from_array(np.ascontiguousarray(voxels[i]))
        sl.SetSpacing([float(spacing[0]), float(spacing[1])])
        tags = sl.GetMetaDataDictionary()
        tags["0020|0032"] = "\\".join(f"{v:.4f}" for v in origin + direction @ np.array([0.0, 0.0, i * spacing[2]]))
        tags["0020|0037"] = "\\".join(f"{v:.6f}" for v in np.concatenate([direction[:, 0], direction[:, 1]]))
        tags["0020|0013"] = str(i + 1)
        tags["0028|0030"] = f"{spacing[1]:.4f}\\{spacing[0]:.4f}"
        tags["0018|0050"] = f"{spacing[2]:.4f}"
        tags["0008|0060"] = "CT"
        tags["0020|000d"] = "1.2.826.0.1.3680043.2.1125.7"
        tags["0020|000e"] = series_uid
        io = itk.GDCMImageIO.New()
        io.KeepOriginalUIDOn()
        itk.imwrite(sl, str(folder / f"{prefix}{i:03d}.dcm"), imageio=io)


def truncated(src: Path, dst: Path) -> Path:
    """``dst``: the first half of ``src``'s bytes (an interrupted copy or download)."""
    raw = src.read_bytes()
    dst.write_bytes(raw[: len(raw) // 2])
    return dst
