"""DICOM SEG output for DICOM series input: one SEG object over the source series, a coded segment per class.

PACS viewers, OHIF and 3D Slicer show a DICOM Segmentation (SEG) over the images it references;
a NIfTI label map they do not. MONAI writes no DICOM SEG; ``highdicom`` (an optional extra, imported
only when a SEG is written) builds a standards-conformant one from the source datasets. This module
adds what highdicom cannot know:

- :func:`frames_for_series`: the label map (on the grid MONAI's ``LoadImage`` reads the series to,
  RAS world coordinates, as ``Invertd`` writes the prediction) mapped to the source instances: for
  every instance, each pixel's position from ``ImagePositionPatient``, ``ImageOrientationPatient``
  and ``PixelSpacing`` (DICOM's LPS, turned to RAS) is taken to a voxel of the label map through the
  inverse affine; a pixel that falls off a voxel centre or outside the map is refused (the label map
  is not on this series' grid), so frames follow the instances, whatever the slice order or files;
- :func:`segment_descriptions`: one segment per class (background excluded), numbered as the
  class index, labelled with the class name, with a SNOMED CT anatomic term where :data:`ANATOMY`
  has one (laterality as a type modifier), otherwise the generic "Tissue"; algorithm type AUTOMATIC;
  the display colour of the preview (:func:`custom.inference.visualize.label_palette`);
- :func:`write_dicom_seg` and the handler :class:`CaseDicomSeg` (``<case>_seg.dcm``, DICOM input only).

The SNOMED CT codes are those of pydicom 3.0.2's ``pydicom.sr.codedict.codes.SCT`` (from DICOM PS3.16;
checked there: Spleen 78961009, Kidney 64033007, Gallbladder 28231008, Esophagus 32849002, Liver
10200004, Stomach 69695003, Aorta 15825003, Inferior vena cava 64131007, Portal vein 32764006,
Pancreas 15776009, Adrenal gland 23451007, Right 24028007, Left 7771000, Tissue 85756007; the
categories from CID 7150: Anatomical Structure 91723000, Morphologically Abnormal Structure 49755003).
BTCV's "portal and splenic veins" is one class for two vessels; it is coded as Portal vein (the
label keeps the class name).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from custom.inference.case_outputs import CaseOutputHandler, as_labels, label_volume
from custom.inference.visualize import label_palette
from custom.utils import atomic_write

__all__ = [
    "ANATOMY",
    "GENERIC",
    "MISSING_HIGHDICOM",
    "import_highdicom",
    "read_series",
    "frames_for_series",
    "segment_descriptions",
    "write_dicom_seg",
    "CaseDicomSeg",
]

logger = logging.getLogger(__name__)

MISSING_HIGHDICOM = "dicom_seg needs highdicom: pip install highdicom (or run with --dicom_seg False)"

#: class name (lower case, laterality prefix removed) -> (category, (SNOMED CT code, meaning)); see the module docstring
ANATOMY: dict[str, tuple[str, tuple[str, str]]] = {
    "spleen": ("anatomy", ("78961009", "Spleen")),
    "kidney": ("anatomy", ("64033007", "Kidney")),
    "gallbladder": ("anatomy", ("28231008", "Gallbladder")),
    "esophagus": ("anatomy", ("32849002", "Esophagus")),
    "liver": ("anatomy", ("10200004", "Liver")),
    "stomach": ("anatomy", ("69695003", "Stomach")),
    "aorta": ("anatomy", ("15825003", "Aorta")),
    "inferior vena cava": ("anatomy", ("64131007", "Inferior vena cava")),
    "portal and splenic veins": ("anatomy", ("32764006", "Portal vein")),
    "portal vein": ("anatomy", ("32764006", "Portal vein")),
    "splenic vein": ("anatomy", ("35819009", "Splenic vein")),
    "pancreas": ("anatomy", ("15776009", "Pancreas")),
    "adrenal gland": ("anatomy", ("23451007", "Adrenal gland")),
    "prostate": ("anatomy", ("41216001", "Prostate")),
    "hippocampus": ("anatomy", ("5366008", "Hippocampus")),
    "heart": ("anatomy", ("80891009", "Heart")),
    "lung": ("anatomy", ("39607008", "Lung")),
    "colon": ("anatomy", ("71854001", "Colon")),
    "tumor": ("abnormal", ("108369006", "Neoplasm")),
    "tumour": ("abnormal", ("108369006", "Neoplasm")),
    "cancer": ("abnormal", ("108369006", "Neoplasm")),
    "lesion": ("abnormal", ("52988006", "Lesion")),
}
#: a class without a term in :data:`ANATOMY`
GENERIC = ("tissue", ("85756007", "Tissue"))
_CATEGORIES = {
    "anatomy": ("91723000", "Anatomical Structure"),
    "abnormal": ("49755003", "Morphologically Abnormal Structure"),
    "tissue": ("85756007", "Tissue"),
}
_LATERALITY = {"right": ("24028007", "Right"), "left": ("7771000", "Left")}


def import_highdicom():
    """``highdicom``, or ImportError with :data:`MISSING_HIGHDICOM`."""
    try:
        import highdicom
    except ImportError as e:
        raise ImportError(MISSING_HIGHDICOM) from e
    return highdicom


def read_series(folder: str | os.PathLike) -> list[Any]:
    """The pydicom datasets of the one image series in ``folder`` (files that are not DICOM are passed by).

    Raises:
        ValueError: no DICOM image in ``folder``, or several series (the message names them).
    """
    import pydicom

    datasets = []
    for path in sorted(Path(folder).iterdir()):
        if not path.is_file():
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)  # the SEG references the pixels, it needs no copy
        except Exception:  # not a DICOM file
            continue
        if "Rows" in ds and "ImagePositionPatient" in ds:
            datasets.append(ds)
    if not datasets:
        raise ValueError(f"{folder}: no DICOM image with ImagePositionPatient in this folder")
    series = sorted({str(ds.SeriesInstanceUID) for ds in datasets})
    if len(series) > 1:
        raise ValueError(
            f"{folder}: {len(series)} series in one folder ({', '.join(series)}); one SEG needs one series"
        )
    for ds in datasets:
        if "FrameOfReferenceUID" not in ds:
            raise ValueError(
                f"{folder}: {Path(ds.filename).name} has no FrameOfReferenceUID: a SEG cannot reference it"
            )
    return datasets


def frames_for_series(label: Any, affine: Any, datasets: Sequence[Any], tolerance: float = 0.05) -> np.ndarray:
    """``(len(datasets), Rows, Columns)`` label values: each source instance's pixels looked up in ``label``.

    Args:
        label: the label map ``(X, Y, Z)`` / ``(1, X, Y, Z)`` (one-hot ``(C, ...)``: argmax).
        affine: its 4x4 voxel-to-world affine in RAS mm (``MetaTensor.affine`` as MONAI reads the series).
        datasets: the source instances (pydicom datasets), in any order; frame ``i`` is ``datasets[i]``.
        tolerance: how far (in voxels) a pixel centre may lie from a voxel centre.

    Raises:
        ValueError: a pixel of an instance is off the label map's voxel centres or outside it (the message
            names the file and the distance).
    """
    lab = label_volume(label)  # a view: only the gathered frames are copied
    inverse = np.linalg.inv(np.asarray(affine.cpu() if isinstance(affine, torch.Tensor) else affine, float))
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    frames = []
    for ds in datasets:
        rows, cols = int(ds.Rows), int(ds.Columns)
        origin = lps_to_ras @ np.asarray(ds.ImagePositionPatient, float)
        iop = np.asarray(ds.ImageOrientationPatient, float)
        row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
        along_row = lps_to_ras @ iop[:3] * col_spacing  # one column to the right
        along_col = lps_to_ras @ iop[3:] * row_spacing  # one row down
        start = inverse[:3, :3] @ origin + inverse[:3, 3]
        d_col, d_row = inverse[:3, :3] @ along_row, inverse[:3, :3] @ along_col
        r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        ijk = start[:, None, None] + d_row[:, None, None] * r + d_col[:, None, None] * c
        index = np.rint(ijk).astype(np.int64)
        off = float(np.abs(ijk - index).max())
        name = Path(getattr(ds, "filename", "") or "instance").name
        if off > tolerance:
            raise ValueError(
                f"{name}: its pixels lie {off:.2f} voxels off the label map's voxel centres: "
                "the label map is not on this series' grid"
            )
        if (index < 0).any() or any((index[a] >= lab.shape[a]).any() for a in range(3)):
            raise ValueError(f"{name}: its pixels fall outside the label map {lab.shape}: not this series' grid")
        frames.append(as_labels(lab[index[0], index[1], index[2]]))
    return np.stack(frames)


def _code(hd, pair: tuple[str, str]):
    return hd.sr.CodedConcept(value=pair[0], scheme_designator="SCT", meaning=pair[1])


def segment_descriptions(
    class_names: Sequence[str], algorithm_name: str = "Swin UNETR", algorithm_version: str = "1"
) -> list[Any]:
    """highdicom ``SegmentDescription`` per class 1..N-1 (``class_names[0]`` is the background): see the module docstring.

    Raises:
        ImportError: highdicom is not installed (:data:`MISSING_HIGHDICOM`).
    """
    hd = import_highdicom()
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, version=algorithm_version, family=codes.cid7162.ArtificialIntelligence
    )
    palette = label_palette(max(len(class_names), 2))
    out = []
    for number, name in enumerate(class_names[1:], start=1):
        key, side = " ".join(name.lower().replace("_", " ").split()), None
        for word in _LATERALITY:
            if key.startswith(word + " ") or key.endswith(" " + word):
                side, key = word, key.removeprefix(word + " ").removesuffix(" " + word)
        category, term = ANATOMY.get(key, GENERIC)
        desc = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name[:64],
            segmented_property_category=_code(hd, _CATEGORIES[category]),
            segmented_property_type=_code(hd, term),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*(int(v) for v in palette[number])),
        )
        if side is not None and (key, category) != ("", "tissue"):
            desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                _code(hd, _LATERALITY[side])
            ]
        out.append(desc)
    return out


def write_dicom_seg(
    path: str | os.PathLike,
    label: Any,
    affine: Any,
    series: str | os.PathLike | Sequence[Any],
    class_names: Sequence[str],
    algorithm_name: str = "Swin UNETR",
    algorithm_version: str = "1",
    series_description: str = "Swin UNETR segmentation",
) -> Path:
    """Write the DICOM SEG of ``label`` over the source ``series`` to ``path`` (atomic). Returns ``path``.

    Args:
        path: the SEG file (``<case>_seg.dcm``).
        label, affine: the label map on the series' grid as MONAI reads it (see :func:`frames_for_series`).
        series: the series folder, or its pydicom datasets.
        class_names: names by class index, background first; one segment per other class, numbered as the
            class; classes the prediction lacks are described with no frame.
        algorithm_name, algorithm_version: the segment's algorithm identification (bundle name, version).
        series_description: the SEG series' description.

    Raises:
        ImportError: highdicom missing (:data:`MISSING_HIGHDICOM`).
        ValueError: the folder holds no single series, the label map is not on its grid, or it holds a
            value outside the classes.
    """
    hd = import_highdicom()
    datasets = read_series(series) if isinstance(series, (str, os.PathLike)) else list(series)
    frames = frames_for_series(label, affine, datasets)
    if frames.size and (frames.min() < 0 or frames.max() >= len(class_names)):
        raise ValueError(f"label values {frames.min()}..{frames.max()} outside the {len(class_names)} classes")
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=frames.astype(np.uint16 if len(class_names) > 255 else np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(class_names, algorithm_name, algorithm_version),
        series_instance_uid=hd.UID(),
        series_number=int(getattr(datasets[0], "SeriesNumber", None) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="swin-unetr-bundles",
        manufacturer_model_name=algorithm_name[:64],
        software_versions=str(algorithm_version),
        device_serial_number="0",
        series_description=series_description[:64],
    )
    atomic_write(Path(path), lambda f: seg.save_as(f, enforce_file_format=True))
    return Path(path)


class CaseDicomSeg(CaseOutputHandler):
    """Write ``<case>_seg.dcm`` beside ``<case>_seg.nii.gz`` for every case whose input is a DICOM series folder.

    Inputs that are files (NIfTI, NRRD, ...) are passed by: a SEG needs source instances to reference.
    highdicom is imported at the first DICOM case; without it that case fails with :data:`MISSING_HIGHDICOM`.

    Args:
        output_dir: where the SEG files go (``@output_dir``).
        class_names: names by class index, background first; or
        meta_file: a bundle's metadata.json (class names; its ``name`` and ``version`` identify the algorithm).
        enabled: False attaches nothing (the bundle's ``dicom_seg`` switch).
        pred_key: the prediction's key (the label map on the input's grid, after ``Invertd``).

    Raises:
        ValueError: neither or both of ``class_names`` and ``meta_file``; ``enabled`` not a bool.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        class_names: Sequence[str] | None = None,
        meta_file: str | os.PathLike | None = None,
        enabled: bool = True,
        pred_key: str = "pred",
    ) -> None:
        super().__init__(output_dir, enabled, pred_key, "dicom_seg", class_names=class_names, meta_file=meta_file)
        self.algorithm_name, self.algorithm_version = "Swin UNETR", "1"
        if meta_file is not None:
            import json

            with open(meta_file, encoding="utf-8") as f:
                meta = json.load(f)
            self.algorithm_name = str(meta.get("name", self.algorithm_name))
            self.algorithm_version = str(meta.get("version", self.algorithm_version))

    def write_case(self, item: Mapping[str, Any], batch: Mapping[str, Any], case: str, source: str) -> None:
        if not os.path.isdir(source):
            return
        pred = item[self.pred_key]
        path = write_dicom_seg(
            self.output_dir / f"{case}_seg.dcm",
            pred,
            pred.affine,
            source,
            self.class_names,
            self.algorithm_name,
            self.algorithm_version,
        )
        logger.info(f"wrote {path}")
