"""Check a bundle's data before any model is built: every problem, each with its file, all at once.

MONAI has no counterpart: ``load_decathlon_datalist`` fails on the first missing key, and a broken
volume otherwise surfaces as a crash inside a DataLoader worker hours into training.

Used by the bundles' ``check_data`` run id and, unless ``--preflight False``, at the start of
training and inference. Reads each image and label in every format the bundles' ``LoadImaged`` reads:
NIfTI with nibabel, ``.mha``/``.mhd``/``.nrrd`` and DICOM series folders with MONAI's ``ITKReader``
(a DICOM folder is first checked for one evenly spaced series, :func:`custom.data.inputs.dicom_series_problem`).
Checks shapes, 2-D images, label values and NaN/Inf in the voxels: for BTCV-sized data a few seconds
per case.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from custom.data.cases import SKIPPED
from custom.data.inputs import dicom_series_problem, read_datalist
from custom.utils import one_line_reason

__all__ = ["DataCheckError", "DataCheck"]

logger = logging.getLogger(__name__)


class DataCheckError(ValueError):
    """The data has problems; the message lists every one, each naming its file."""


@dataclass
class DataCheck:
    """Preflight of a decathlon-style datalist.

    Args:
        datalist: path of the datalist JSON, or a list of paths (the SSL bundle reads several); None with
            ``items``.
        dataset_dir: folder the datalist's relative paths start from; no path may leave it.
        num_classes: labels must lie in ``0 .. num_classes - 1``.
        roi_size: the training crop; volumes smaller than it after resampling are reported as padded.
        pixdim: the target spacing (mm) the bundle resamples to; None = kept as stored.
        sections: datalist lists to check (``training`` must be present and non-empty).
        affine_tolerance: largest allowed difference (mm) between image and label affines.
        require_labels: training and validation entries need a ``label`` (not for self-supervision).
        items: ``[{"image": path}, ...]`` to check instead of a datalist (inference inputs).
        min_voxels: a volume with fewer voxels than this along an axis after resampling is refused
            (a single slice or a scout cannot be padded into a sensible 3-D crop); smaller than the ROI
            but not that thin is noted: it is zero-padded to the ROI.
        in_channels: the image channels the bundle expects (the 4th dimension of a 4-D NIfTI, 1 for 3-D);
            None skips the check.
        accept_uneven_slices: a DICOM series with missing or unevenly spaced slices is noted, not refused
            (inference's ``--accept_uneven_slices True``).
    """

    datalist: str | Sequence[str] | None
    dataset_dir: str
    num_classes: int
    roi_size: Sequence[int] = (96, 96, 96)
    pixdim: Sequence[float] | None = (1.5, 1.5, 2.0)
    sections: Sequence[str] = ("training", "validation")
    affine_tolerance: float = 1e-3
    require_labels: bool = True
    in_channels: int | None = None
    items: Sequence[dict] | None = None
    min_voxels: int = 8
    accept_uneven_slices: bool = False
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def run(self) -> int:
        """Check everything; log a summary. Returns the number of cases checked.

        Raises:
            DataCheckError: at least one problem was found (all are listed).
        """
        self.problems, self.notes = [], []
        if self.items is not None:
            cases = [("test", item) for item in self.items if SKIPPED not in item]  # output kept: not read
            files = [f"the {len(cases)} input(s) in {self.dataset_dir}"]
        else:
            files = [self.datalist] if isinstance(self.datalist, (str, os.PathLike)) else list(self.datalist)
            cases = [case for f in files for case in self._read_datalist(f)]
        for section, item in cases:
            self._check_case(section, item)
        for note in self.notes:
            logger.info(note)
        if self.problems:
            text = (
                f"check_data found {len(self.problems)} problem(s) in {', '.join(map(str, files))}:\n  "
                + "\n  ".join(self.problems)
            )
            logger.error(text)
            raise DataCheckError(text)
        logger.info(f"check_data: {len(cases)} cases in {', '.join(map(str, files))} look usable")
        return len(cases)

    # -- datalist ---------------------------------------------------------------------------------
    def _read_datalist(self, datalist: str) -> list[tuple[str, dict]]:
        path = Path(datalist)
        try:
            data = read_datalist(path, "training")
        except (FileNotFoundError, ValueError) as e:
            self.problems.append(str(e))
            return []
        cases = []
        for section in self.sections:
            items = data.get(section)
            if items is None:
                if section == "training":
                    self.problems.append(f"{path}: no 'training' list")
                continue
            if not isinstance(items, list) or (section == "training" and not items):
                self.problems.append(f"{path}: {section!r} must be a non-empty list of {{'image', 'label'}} entries")
                continue
            for i, item in enumerate(items):
                if isinstance(item, str):
                    item = {"image": item}
                if not isinstance(item, dict) or "image" not in item:
                    self.problems.append(f"{path}: {section}[{i}] has no 'image'")
                    continue
                cases.append((section, item))
        return cases

    def _resolve(self, rel: str, what: str) -> Path | None:
        root = os.path.normpath(os.path.abspath(self.dataset_dir))
        # lexical check: a symbolic link inside dataset_dir may point anywhere (datasets are often links)
        full = os.path.normpath(rel if os.path.isabs(rel) else os.path.join(root, rel))
        if not os.path.isabs(rel) and os.path.commonpath([root, full]) != root:
            self.problems.append(f"{rel}: {what} path leaves dataset_dir {root}")
            return None
        if not os.path.exists(full):
            self.problems.append(f"{full}: {what} file not found")
            return None
        return Path(full)

    # -- one case ---------------------------------------------------------------------------------
    def _load(self, path: Path, what: str):
        """``(shape, zooms, affine, voxels)`` of an image or label, or None (the problem is recorded)."""
        try:
            if path.name.endswith((".nii", ".nii.gz")):
                import nibabel as nib

                img = nib.load(str(path))
                data = np.asanyarray(img.dataobj)
                return data.shape, tuple(img.header.get_zooms()), img.affine, data
            if path.is_dir():
                problem = dicom_series_problem(path, self.accept_uneven_slices)
                if problem:
                    self.problems.append(problem)
                    return None
            from monai.data import ITKReader

            reader = ITKReader()  # as LoadImaged reads .mha, .mhd, .nrrd and DICOM folders
            data, meta = reader.get_data(reader.read(str(path)))
            affine = np.asarray(meta["affine"], float)
            zooms = tuple(float(z) for z in np.linalg.norm(affine[:3, :3], axis=0)[: min(3, data.ndim)])
            return data.shape, zooms, affine, data
        except Exception as e:  # nibabel and ITK raise many types for corrupt or truncated files
            self.problems.append(f"{path}: unreadable {what} ({one_line_reason(e)})")
            return None

    def _check_case(self, section: str, item: dict) -> None:
        image_path = self._resolve(item["image"], "image")
        label_path = self._resolve(item["label"], "label") if "label" in item and self.require_labels else None
        if self.require_labels and "label" not in item and section in ("training", "validation"):
            self.problems.append(f"{item['image']}: {section} entry has no 'label'")
        if image_path is None:
            return
        loaded = self._load(image_path, "image")
        if loaded is None:
            return
        shape, zooms, affine, data = loaded
        if data.ndim < 3:
            self.problems.append(f"{image_path}: a 2-D image (shape {tuple(shape)}), not a volume")
            return
        channels = data.shape[3] if data.ndim == 4 else 1
        if self.in_channels is not None and (data.ndim > 4 or channels != self.in_channels):
            self.problems.append(
                f"{image_path}: image has {channels} channel(s) (shape {data.shape}) but the task declares "
                f"{self.in_channels} (dataset.json 'modality')"
            )
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            self.problems.append(f"{image_path}: image holds NaN or Inf values")
        self._check_size(image_path, shape, zooms)
        if label_path is None:
            return
        loaded = self._load(label_path, "label")
        if loaded is None:
            return
        _, _, label_affine, labels = loaded
        if labels.shape[:3] != data.shape[:3]:
            self.problems.append(
                f"{label_path}: label shape {labels.shape} differs from image shape {data.shape} ({image_path.name})"
            )
        diff = float(np.abs(label_affine - affine).max())
        if diff > self.affine_tolerance:
            self.problems.append(
                f"{label_path}: label affine differs from the image's by up to {diff:.4g} mm ({image_path.name}); "
                "the label would not lie on the anatomy"
            )
        if labels.dtype.kind == "f" and not np.equal(np.mod(labels, 1), 0).all():
            self.problems.append(f"{label_path}: label holds fractional values (dtype {labels.dtype}): not a label map")
            return
        values = np.unique(labels).astype(np.int64)
        bad = values[(values < 0) | (values >= self.num_classes)]
        if bad.size:
            self.problems.append(
                f"{label_path}: label values {bad.tolist()[:10]} outside the bundle's classes 0..{self.num_classes - 1}"
            )

    def _check_size(self, path: Path, shape: Sequence[int], zooms: Sequence[float]) -> None:
        zooms = zooms[:3]
        pixdim = zooms if self.pixdim is None else self.pixdim
        resampled = [math.floor(n * z / p) for n, z, p in zip(shape[:3], zooms, pixdim, strict=False)]
        thin = [i for i, n in enumerate(resampled) if n < self.min_voxels]
        if thin:
            self.problems.append(
                f"{path}: only {tuple(resampled)} voxels at {tuple(float(p) for p in pixdim)} mm (axis {thin} under "
                f"{self.min_voxels}): a slice or a scout, not a volume; padding it to roi_size would train on "
                "padding. Remove it from the list."
            )
            return
        small = [i for i, (n, r) in enumerate(zip(resampled, self.roi_size, strict=False)) if n < r]
        if small:
            self.notes.append(
                f"{path}: {tuple(resampled)} voxels at {tuple(float(p) for p in pixdim)} mm, smaller than roi_size "
                f"{tuple(self.roi_size)} on axis {small}: it is zero-padded to the ROI (background) before cropping"
            )
