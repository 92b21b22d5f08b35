"""Small MSD-shaped task folders: dataset.json as distributed, 4-D NIfTI for multi-channel tasks.

The one builder of MSD task folders for the tests (``tests/``) and for the model zoo's checks
(``ci/zoo_checks.py``), so that both run the MSD bundle on the same data.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["OFFICIAL", "make_task"]

#: the ten official tasks as their dataset.json declares them (name, modality, labels)
OFFICIAL = {
    "Task01_BrainTumour": (
        "BRATS",
        {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
    ),
    "Task02_Heart": ("LeftAtrium", {"0": "MRI"}, {"0": "background", "1": "left atrium"}),
    "Task03_Liver": ("Liver", {"0": "CT"}, {"0": "background", "1": "liver", "2": "cancer"}),
    "Task04_Hippocampus": ("Hippocampus", {"0": "MRI"}, {"0": "background", "1": "Anterior", "2": "Posterior"}),
    "Task05_Prostate": ("Prostate", {"0": "T2", "1": "ADC"}, {"0": "background", "1": "PZ", "2": "TZ"}),
    "Task06_Lung": ("Lung", {"0": "CT"}, {"0": "background", "1": "cancer"}),
    "Task07_Pancreas": ("Pancreas", {"0": "CT"}, {"0": "background", "1": "pancreas", "2": "cancer"}),
    "Task08_HepaticVessel": ("HepaticVessel", {"0": "CT"}, {"0": "background", "1": "Vessel", "2": "Tumour"}),
    "Task09_Spleen": ("Spleen", {"0": "CT"}, {"0": "background", "1": "spleen"}),
    "Task10_Colon": ("Colon", {"0": "CT"}, {"0": "background", "1": "colon cancer primaries"}),
}


def make_task(
    root: Path,
    folder: str,
    shape: tuple[int, int, int] = (40, 40, 24),
    spacing: float = 3.0,
    cases: int = 3,
    channels: int | None = None,
    tests: int = 1,
) -> Path:
    """Write ``root/folder`` with ``cases`` labelled and ``tests`` unlabelled volumes; returns the folder.

    Images hold a bright blob per label on a body-like background (CT: HU, MRI: positive intensities
    with zero air); a 4-D image (X, Y, Z, C) when the task has several channels. ``channels``
    overrides the number of channels written (to make a task whose files disagree with its json).
    """
    name, modality, labels = OFFICIAL[folder]
    n_ch = len(modality) if channels is None else channels
    ct = "CT" in modality.values()
    task = root / folder
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (task / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    training, test = [], []
    for i in range(cases + tests):
        label = np.zeros(shape, np.uint8)
        body = np.zeros(shape, bool)
        body[4:-4, 4:-4, 2:-2] = True
        for value in range(1, len(labels)):
            c = [int(s * (0.3 + 0.15 * value)) for s in shape]
            label[c[0] - 4 : c[0] + 4, c[1] - 4 : c[1] + 4, c[2] - 3 : c[2] + 3] = value
        base = np.where(body, 40.0, -1000.0) if ct else np.where(body, 300.0, 0.0)
        channels_data = [base + 80.0 * label + rng.normal(0, 5, shape) * body for _ in range(n_ch)]
        image = (channels_data[0] if n_ch == 1 else np.stack(channels_data, -1)).astype(np.float32)
        case = f"{name.lower()}_{i:03d}.nii.gz"
        if i < cases:
            nib.save(nib.Nifti1Image(image, affine), str(task / "imagesTr" / case))
            nib.save(nib.Nifti1Image(label, affine), str(task / "labelsTr" / case))
            training.append({"image": f"./imagesTr/{case}", "label": f"./labelsTr/{case}"})
        else:
            nib.save(nib.Nifti1Image(image, affine), str(task / "imagesTs" / case))
            test.append(f"./imagesTs/{case}")
    meta = {
        "name": name,
        "description": "synthetic stand-in for the tests",
        "tensorImageSize": "4D" if n_ch > 1 else "3D",
        "modality": modality,
        "labels": labels,
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        "test": test,
    }
    (task / "dataset.json").write_text(json.dumps(meta, indent=4), encoding="utf-8")
    return task
