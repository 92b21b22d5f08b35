"""What the tests share besides fixtures: the repository's paths, the small sizes, running a bundle command
as a user does, and writers of the test inputs (DICOM series, truncated files).

Imported by the test modules (``from helpers import run_bundle, SMALL``); ``conftest.py`` holds only
the fixtures. The repository root is on ``sys.path`` through ``pythonpath`` in ``pyproject.toml``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np

from bundles.demo import DEMO_OVERRIDES, bundle_command
from bundles.demo import cli_args as cli
from bundles.package import sha256
from bundles.sample_data import SMALL_SIZES

__all__ = [
    "REPO",
    "BTCV",
    "MSD",
    "SSL",
    "TORCHRUN",
    "SMALL",
    "SMALL_SIZES",
    "SMALL_SSL",
    "ssl_overrides",
    "btcv_overrides",
    "CT_UID",
    "LOCALIZER_UID",
    "bundle_command",
    "cli",
    "run_bundle",
    "sha256",
    "write_dicom_series",
    "truncated",
    "custom_of_child",
    "tensorboard_scalars",
]

REPO = Path(__file__).resolve().parents[1]
BTCV = REPO / "swin_unetr_btcv"
MSD = REPO / "swin_unetr_msd"
SSL = REPO / "swin_unetr_ssl"

#: ``run_bundle(..., python_args=TORCHRUN)``: the same command under torchrun, 2 processes (gloo on CPUs)
TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
#: overrides every bundle command in the tests shares: the demo's small sizes (``SMALL_SIZES``), no AMP,
#: no loader processes, a cheaper sliding window
SMALL = {**DEMO_OVERRIDES, "sw_batch_size": 2, "overlap": 0.25}
#: SSL pre-training at the small sizes (the corpus keeps the sample's own grid): one volume a step, two crops of it
SMALL_SSL = {
    "feature_size": SMALL_SIZES["feature_size"],
    "roi_size": SMALL_SIZES["roi_size"],
    "amp": False,
    "num_workers": 0,
    "use_checkpoint": False,
    "batch_size": 1,
    "num_samples": 2,
    "warmup_steps": 1,
    "val_interval": 1,
}


def btcv_overrides(dataset: Path, work: Path, **extra) -> dict:
    """BTCV training at :data:`SMALL` on ``dataset``, one crop a step, no gradient checkpointing (nothing to save
    on a CPU); checkpoints in ``work/models``, logs in ``work/outputs``; ``extra`` adds to or replaces any of it."""
    return {
        **SMALL,
        "dataset_dir": str(dataset),
        "ckpt_dir": str(work / "models"),
        "output_dir": str(work / "outputs"),
        "num_samples": 1,
        "use_checkpoint": False,
        **extra,
    }


def ssl_overrides(dataset: Path, work: Path, **extra) -> dict:
    """Pre-training at :data:`SMALL_SSL` on ``dataset``'s ``ssl_dataset.json``; corpus, checkpoints, logs in ``work``."""
    return {
        **SMALL_SSL,
        "dataset_dir": str(dataset),
        "datalist": [str(dataset / "ssl_dataset.json")],
        "cache_dir": str(work / "cache"),
        "ckpt_dir": str(work / "models"),
        "output_dir": str(work / "outputs"),
        **extra,
    }


#: ``python -m monai.bundle`` run by ``runpy`` (the same module search path: the working directory first), then,
#: at exit, one ``CUSTOM_MODULE <name> <file>`` line for every ``custom`` module the run imported
_REPORTING_MAIN = """
import atexit, runpy, sys

def _report():
    for name, module in sorted(sys.modules.items()):
        if name == "custom" or name.startswith("custom."):
            print("CUSTOM_MODULE", name, getattr(module, "__file__", None), flush=True)

atexit.register(_report)
sys.argv[0] = "monai.bundle"
runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
"""


def run_bundle(
    run_id: str,
    configs: list[str],
    overrides: dict,
    cwd: Path = BTCV,
    timeout: int = 600,
    check: bool = True,
    python_args: tuple[str, ...] = (),
    report_custom: bool = False,
) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run <run_id>`` in ``cwd`` with PYTHONPATH cleared, as a user runs it.

    ``report_custom``: the same run through :data:`_REPORTING_MAIN`, so that :func:`custom_of_child` can
    tell from the output which files the run's ``custom`` modules were loaded from.
    """
    cmd = bundle_command(run_id, configs, overrides)
    if report_custom:
        assert cmd[1:3] == ["-m", "monai.bundle"], cmd
        cmd[1:3] = ["-c", _REPORTING_MAIN]
    cmd[1:1] = python_args
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run(
        cmd, cwd=cwd, capture_output=True, encoding="utf-8", errors="replace", timeout=timeout, env=env
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}\nexit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def custom_of_child(proc: subprocess.CompletedProcess) -> dict[str, Path]:
    """``{module name: file}`` of every ``custom`` module a ``run_bundle(..., report_custom=True)`` run imported.

    Raises:
        AssertionError: the run reported no ``custom`` module (it imported none, or was not reporting).
    """
    found = {}
    for line in proc.stdout.splitlines():
        if line.startswith("CUSTOM_MODULE "):
            _, name, file = line.split(" ", 2)
            found[name] = Path(file)
    assert "custom" in found, f"the run imported no custom module:\n{proc.stdout[-3000:]}"
    return found


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of every TensorBoard event file in ``folder`` (TensorBoard's own reader).

    Raises:
        AssertionError: ``folder`` holds no event file.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(folder.glob("events.out.tfevents.*"))
    assert files, f"no TensorBoard log in {folder}"
    scalars: dict[str, list[tuple[int, float]]] = {}
    for f in files:
        events = EventAccumulator(str(f))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((s.step, s.value) for s in events.Scalars(tag))
    return {tag: sorted(values) for tag, values in scalars.items()}


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
        tags["0020|0052"] = f"{series_uid}.1"  # FrameOfReferenceUID: every scanner writes one (a DICOM SEG needs it)
        io = itk.GDCMImageIO.New()
        io.KeepOriginalUIDOn()
        itk.imwrite(sl, str(folder / f"{prefix}{i:03d}.dcm"), imageio=io)


def truncated(src: Path, dst: Path) -> Path:
    """``dst``: the first half of ``src``'s bytes (an interrupted copy or download)."""
    raw = src.read_bytes()
    dst.write_bytes(raw[: len(raw) // 2])
    return dst
