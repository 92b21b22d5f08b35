"""Finding the images a bundle segments, naming their outputs, and keeping the outputs away from the inputs.

MONAI's ``load_decathlon_datalist`` covers datalists but stops at the first problem and wants one file
of one layout; :func:`read_datalist` is the one reader of a datalist file for the checks that list every
problem (``custom.data.preflight``), several files (``custom.data.ssl_preprocess``) or an MSD ``dataset.json``
(``custom.segmentation.msd``). Inference on "every image in a folder" has no MONAI counterpart, hence
:func:`list_images`. MONAI's ``ITKReader`` reads a DICOM folder as whatever
series ITK lists first and stacks unevenly spaced slices at their mean spacing without a word, hence
:func:`dicom_series_problem`, which refuses both before the reader runs.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

__all__ = [
    "IMAGE_SUFFIXES",
    "read_datalist",
    "list_images",
    "is_input",
    "case_name",
    "output_name_formatter",
    "dicom_series_problem",
    "checked_output_dir",
]

logger = logging.getLogger(__name__)

#: single-file volume formats LoadImaged reads here (NIfTI by nibabel; NRRD, MHA by ITK)
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
#: slice positions may differ from the series' median spacing by this fraction (rounding in the headers)
SLICE_SPACING_TOLERANCE = 0.01


def read_datalist(path: str | os.PathLike, section: str = "training") -> dict:
    """The JSON object of a decathlon-style datalist file (``dataset_0.json``, an MSD ``dataset.json``).

    Only the file is checked here (present, JSON, an object); its lists are each caller's to check.

    Args:
        path: the datalist file.
        section: the list the caller reads from it (named in the message when the file is not an object).

    Raises:
        FileNotFoundError: ``path`` is not a file (``<path>: datalist not found``).
        ValueError: ``path`` is not valid JSON, or holds something other than an object.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: datalist not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with a {section!r} list, got {type(data).__name__}")
    return data


def _is_dicom_series(folder: Path) -> bool:
    """A folder holding DICOM files: ``*.dcm`` names or the ``DICM`` magic at byte 128 of a file."""
    for entry in sorted(folder.iterdir())[:50]:
        if not entry.is_file():
            continue
        if entry.suffix.lower() == ".dcm":
            return True
        try:
            with open(entry, "rb") as f:
                f.seek(128)
                if f.read(4) == b"DICM":
                    return True
        except OSError:
            continue
    return False


def is_input(entry: Path) -> bool:
    """Whether ``entry`` is something :func:`list_images` segments: an image file or a DICOM folder."""
    if entry.name.startswith("."):
        return False
    if entry.is_file():
        return entry.name.lower().endswith(IMAGE_SUFFIXES)
    return entry.is_dir() and _is_dicom_series(entry)


def _stem(name: str) -> str:
    # MONAI's SaveImage names an output after the input's name up to its first dot (``create_file_basename``)
    return name.split(".")[0]


def case_name(path: str | os.PathLike) -> str:
    """The name of an input's outputs (``<case>_seg.nii.gz``): its name up to the first dot, as MONAI names it.

    When another input in the same folder has that name too (``ct.nii.gz`` beside ``ct.mha`` or a DICOM
    folder ``ct``), each is named after its whole name with dots as underscores (``ct_nii_gz``, ``ct_mha``,
    ``ct``), so that no output replaces another.

    >>> import tempfile; d = Path(tempfile.mkdtemp())
    >>> _ = (d / "ct.nii.gz").write_bytes(b""), (d / "ct.mha").write_bytes(b""), (d / "mr.nrrd").write_bytes(b"")
    >>> case_name(d / "ct.nii.gz"), case_name(d / "ct.mha"), case_name(d / "mr.nrrd")
    ('ct_nii_gz', 'ct_mha', 'mr')
    """
    p = Path(path)
    base = _stem(p.name)
    if p.parent.is_dir():
        for other in p.parent.iterdir():
            if other.name != p.name and _stem(other.name) == base and is_input(other):
                return p.name.replace(".", "_")
    return base


def output_name_formatter(metadict: Mapping | None, saver=None) -> dict:
    """``SaveImaged(output_name_formatter=...)``: MONAI's default naming with :func:`case_name` as the subject.

    Args:
        metadict: the saved item's metadata (``filename_or_obj`` is the input's path).
        saver: the ``SaveImage`` transform (unused; MONAI passes it).
    """
    meta = metadict or {}
    source = meta.get("filename_or_obj")
    subject = case_name(source) if isinstance(source, (str, os.PathLike)) and source else "case"
    return {"subject": subject, "idx": meta.get("patch_index")}


def list_images(input_dir: str | os.PathLike) -> list[dict[str, str]]:
    """``[{"image": path}, ...]`` for every volume in ``input_dir``, sorted by name.

    A volume is a file with one of :data:`IMAGE_SUFFIXES` or a sub-folder holding one DICOM series
    (read by ITK through ``LoadImaged``). Anything else (other files, folders without DICOM files) is
    named in one log line, not segmented.

    Raises:
        FileNotFoundError: ``input_dir`` does not exist or is no folder.
        ValueError: it holds no volume (the message lists what it does hold), or two inputs would get
            the same output name.
    """
    folder = Path(input_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"input_dir: no such folder: {folder.resolve()}")
    items, ignored = [], []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if is_input(entry):
            items.append({"image": os.path.abspath(entry)})
        elif entry.is_dir():
            if any(entry.iterdir()):
                ignored.append(f"{entry.name}/ (a folder with no DICOM file)")
        else:
            ignored.append(entry.name)
    if ignored:
        logger.warning(
            f"input_dir {folder.resolve()}: not segmented, not an image this bundle reads "
            f"({', '.join(IMAGE_SUFFIXES)} or a DICOM series folder): {'; '.join(ignored)}"
        )
    if not items:
        seen = ", ".join(sorted(p.name for p in folder.iterdir())[:10]) or "nothing"
        raise ValueError(
            f"input_dir {folder.resolve()} holds no image to segment (looked for {', '.join(IMAGE_SUFFIXES)} "
            f"files and DICOM series folders; found: {seen})."
        )
    names: dict[str, str] = {}
    for item in items:
        name = case_name(item["image"])
        if name in names:
            raise ValueError(
                f"{names[name]} and {item['image']} would both be segmented as {name!r}; rename one of them."
            )
        names[name] = item["image"]
    return items


def _tag(io, tag: str) -> str:
    found, value = io.GetValueFromTag(tag, "")
    return value.strip() if found else ""


def dicom_series_problem(folder: str | os.PathLike, accept_uneven_slices: bool = False) -> str | None:
    """Why the DICOM folder cannot be read as one evenly spaced volume, or None when it can.

    Refused: a folder holding more than one series (ITK would read the first it lists and ignore the
    others), a series of a single slice (2-D), slices without a position, two slices at one position,
    and gaps: a missing slice or uneven spacing (ITK would stack the slices at their mean spacing, off
    by up to a slice from where they were taken). Series are found as MONAI's ``ITKReader`` finds them.

    Args:
        folder: a DICOM series folder.
        accept_uneven_slices: log uneven spacing as a warning instead of refusing it; the volume is then
            read as ITK reads it (slices evenly spaced at their mean spacing).
    """
    import itk

    names = itk.GDCMSeriesFileNames.New()
    names.SetUseSeriesDetails(True)
    names.AddSeriesRestriction("0008|0021")  # as MONAI's ITKReader lists them
    names.SetDirectory(str(folder))
    series = list(names.GetSeriesUIDs())
    if not series:
        return f"{folder}: no readable DICOM series"
    io = itk.GDCMImageIO.New()
    if len(series) > 1:
        described = []
        for uid in series:
            files = names.GetFileNames(uid)
            io.SetFileName(files[0])
            io.ReadImageInformation()
            text = _tag(io, "0008|103e")
            described.append(
                f"SeriesInstanceUID {_tag(io, '0020|000e') or uid} ({len(files)} files"
                + (f", {text!r}" if text else "")
                + ")"
            )
        return (
            f"{folder}: holds {len(series)} DICOM series: {'; '.join(described)}. Put each series in a folder of "
            "its own (one folder is one volume)."
        )
    files = list(names.GetFileNames(series[0]))
    if len(files) < 2:
        return f"{folder}: a DICOM series of {len(files)} slice: a 2-D image, not a volume"
    positions, normal = [], None
    for f in files:
        io.SetFileName(f)
        io.ReadImageInformation()
        ipp, iop = _tag(io, "0020|0032"), _tag(io, "0020|0037")
        try:
            if normal is None:
                row, col = np.array(iop.split("\\"), float).reshape(2, 3)
                normal = np.cross(row, col)
            positions.append((float(np.dot(np.array(ipp.split("\\"), float), normal)), f))
        except ValueError:
            return f"{f}: no usable ImagePositionPatient/ImageOrientationPatient ({ipp!r}, {iop!r}): cannot place it"
    positions.sort()
    where = np.array([p for p, _ in positions])
    steps = np.diff(where)
    step = float(np.median(steps))
    if step <= 0 or steps.min() <= 1e-3:
        i = int(np.argmin(steps))
        return f"{folder}: two slices at one position ({positions[i][1]}, {positions[i + 1][1]}): not one volume"
    off = np.flatnonzero(np.abs(steps - step) > SLICE_SPACING_TOLERANCE * step)
    if off.size == 0:
        return None
    gaps = "; ".join(
        f"{steps[i]:.3g} mm between {Path(positions[i][1]).name} and {Path(positions[i + 1][1]).name}"
        + (f" (about {round(steps[i] / step) - 1} slice(s) missing)" if steps[i] > 1.5 * step else "")
        for i in off[:5]
    )
    text = f"{folder}: slices unevenly spaced ({len(files)} slices, {step:.4g} mm apart except {gaps})"
    if accept_uneven_slices:
        even = (where[-1] - where[0]) / (len(files) - 1)
        misplaced = float(np.abs(where - (where[0] + even * np.arange(len(files)))).max())
        logger.warning(
            f"{text}; read as --accept_uneven_slices True asks: evenly spaced at {even:.4g} mm, "
            f"slices misplaced by up to {misplaced:.3g} mm"
        )
        return None
    return text + ". Refused: ITK would stack them evenly and misplace slices; --accept_uneven_slices True reads it so."


def checked_output_dir(output_dir: str | os.PathLike, input_dir: str | os.PathLike) -> str:
    """Return ``output_dir`` after refusing one that cannot take the outputs, before anything runs.

    Refused: ``output_dir`` is ``input_dir`` or inside it (segmentations written into the input folder
    would be picked up as inputs by the next run and could overwrite a user's file of the same name); it
    or a folder above it is a file; the folder it is in (or would be made in) is not writable.
    Nothing is created here.

    Raises:
        ValueError: any of these, naming the path.
    """
    out, inp = Path(output_dir).resolve(), Path(input_dir).resolve()
    if out == inp or inp in out.parents:
        raise ValueError(
            f"output_dir {out} is the input folder or inside it; choose another --output_dir so that no input "
            "file can be overwritten."
        )
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"output_dir {out}: {existing} is a file, not a folder; choose another --output_dir.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"output_dir {out}: {existing} is not writable; choose another --output_dir.")
    return str(output_dir)
