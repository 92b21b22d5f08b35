"""Shared fixtures: the real CT sample as a BTCV dataset folder, and one tiny model trained through the bundle.

Sizes are the smallest Swin UNETR takes (feature_size 12, 64^3), on the sample's own 3 mm grid, so
every bundle command runs in seconds to a minute on two CPU cores while taking its real code path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
