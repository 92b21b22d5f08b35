"""Finding the images a bundle segments, and keeping its outputs away from its inputs.

MONAI's ``load_decathlon_datalist`` covers datalists; inference on "every image in a folder" has no
MONAI counterpart, hence :func:`list_images`.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["IMAGE_SUFFIXES", "list_images", "checked_output_dir"]

#: single-file volume formats LoadImaged reads here (NIfTI by nibabel; NRRD, MHA by ITK)
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


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


def list_images(input_dir: str | os.PathLike) -> list[dict[str, str]]:
    """``[{"image": path}, ...]`` for every volume in ``input_dir``, sorted by name.

    A volume is a file with one of :data:`IMAGE_SUFFIXES` or a sub-folder holding one DICOM series
    (read by ITK through ``LoadImaged``).

    Raises:
        FileNotFoundError: ``input_dir`` does not exist or is no folder.
        ValueError: it holds no volume; the message lists what it does hold.
    """
    folder = Path(input_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"input_dir: no such folder: {folder.resolve()}")
    items = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.name.lower().endswith(IMAGE_SUFFIXES):
            items.append({"image": os.path.abspath(entry)})
        elif entry.is_dir() and _is_dicom_series(entry):
            items.append({"image": os.path.abspath(entry)})
    if not items:
        seen = ", ".join(sorted(p.name for p in folder.iterdir())[:10]) or "nothing"
        raise ValueError(
            f"input_dir {folder.resolve()} holds no image to segment (looked for {', '.join(IMAGE_SUFFIXES)} "
            f"files and DICOM series folders; found: {seen})."
        )
    return items


def checked_output_dir(output_dir: str | os.PathLike, input_dir: str | os.PathLike) -> str:
    """Return ``output_dir`` after refusing one that is, or lies inside, ``input_dir``.

    Segmentations written into the input folder would be picked up as inputs by the next run and
    could overwrite a user's file of the same name.

    Raises:
        ValueError: ``output_dir`` is ``input_dir`` or inside it.
    """
    out, inp = Path(output_dir).resolve(), Path(input_dir).resolve()
    if out == inp or inp in out.parents:
        raise ValueError(
            f"output_dir {out} is the input folder or inside it; choose another --output_dir so that no input "
            "file can be overwritten."
        )
    return str(output_dir)
