"""Shared fixtures: the real CT sample as a BTCV dataset folder, and one tiny model trained through the bundle.

Sizes are the smallest Swin UNETR takes (feature_size 12, 64^3), on the sample's own 3 mm grid, so
every bundle command runs in seconds to a minute on two CPU cores while taking its real code path.
The helpers the test modules import are in ``helpers.py``; this file holds only fixtures.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import btcv_overrides, run_bundle

from bundles.sample_data import DEFAULT_SAMPLE_DIR, prepare_sample_dataset


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
    overrides = btcv_overrides(sample_dataset, work, max_epochs=2, epoch_length=1, val_interval=1, warmup_epochs=1)
    proc = run_bundle("training", ["configs/train.json"], overrides)
    paths = {k: overrides[k] for k in ("dataset_dir", "ckpt_dir", "output_dir")}
    return {**paths, "work": work, "overrides": overrides, "proc": proc}


@pytest.fixture(scope="module")
def two_case_dataset(tmp_path_factory, sample_dataset) -> Path:
    """Two cases (the slab twice) so that each of two ranks gets one."""
    d = tmp_path_factory.mktemp("two_cases")
    for sub in ("imagesTr", "labelsTr"):
        (d / sub).mkdir()
    case = []
    for i in (1, 2):
        os.symlink((sample_dataset / "imagesTr/img0001.nii.gz").resolve(), d / f"imagesTr/img000{i}.nii.gz")
        os.symlink((sample_dataset / "labelsTr/label0001.nii.gz").resolve(), d / f"labelsTr/label000{i}.nii.gz")
        case.append({"image": f"imagesTr/img000{i}.nii.gz", "label": f"labelsTr/label000{i}.nii.gz"})
    (d / "dataset_0.json").write_text(json.dumps({"training": case, "validation": case}), encoding="utf-8")
    return d


@pytest.fixture()
def input_dir(tmp_path, sample_dir) -> Path:
    """A folder holding one image to segment: the real CT slab as ``slab.nii.gz``."""
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(sample_dir / "ct_slab.nii.gz", d / "slab.nii.gz")
    return d
