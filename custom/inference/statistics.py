"""Per-case organ statistics: volume in ml, voxel count, mean and std of the input intensity, border contact.

What TotalSegmentator's ``--statistics`` gives (volume and mean intensity per structure), for the
label map as inference writes it: on the input image's own grid, after ``Invertd``. MONAI's
Auto3DSeg analyzers (``monai.auto3dseg.LabelStats``) summarise intensities per label for dataset
analysis, with no volume in ml, no border flag and no per-case file, hence this module:

- :func:`label_statistics`: one row per class from a label map, the image in its original
  intensities (HU for CT, as the file stores them after its rescale slope/intercept) and the grid's
  affine. The voxel volume is ``|det(affine[:3, :3])|`` (mm^3; oblique grids included); sums are
  accumulated in float64 over slabs of the volume with ``numpy.bincount``, one pass for all classes.
  A class with a voxel on any face of the image array touches the border: the structure may go on
  outside the field of view, so its volume is a lower bound; the row says so and keeps the volume.
- :class:`CaseStatistics`: the handler the bundles attach: ``<case>_statistics.json`` per case
  (atomic), and, at the end of the run, one ``statistics.csv`` over every case of the run (rank 0,
  case names gathered across DDP ranks).

The intensities come from the input file itself, read again by MONAI's ``LoadImage`` (the reader
the bundles' ``LoadImaged`` uses, so the same grid), unless the items carry the image as loaded under
``raw_key`` (``CopyItemsd`` after ``LoadImaged``). Reading again costs time; keeping a copy costs
memory for the whole case (4 bytes a voxel): the figures are in the BTCV docs (``bench/`` numbers).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from custom.data.cases import SKIPPED
from custom.data.inputs import case_name
from custom.inference.case_outputs import CaseOutputHandler, as_labels, label_volume, original_image, slabs
from custom.utils import atomic_write, is_main_process

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = [
    "BORDER_NOTE",
    "CSV_COLUMNS",
    "label_statistics",
    "same_grid",
    "write_statistics_csv",
    "statistics_table",
    "CaseStatistics",
]

logger = logging.getLogger(__name__)

#: the note of a row whose structure touches the image border
BORDER_NOTE = "touches the image border: the structure may extend beyond the field of view, its volume is a lower bound"
#: the columns of ``statistics.csv``, in order
CSV_COLUMNS = (
    "case",
    "class",
    "name",
    "voxels",
    "volume_ml",
    "mean",
    "std",
    "touches_border",
    "note",
)


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def label_statistics(
    label: Any,
    image: Any | None,
    affine: Any,
    class_names: Sequence[str] | None = None,
    num_classes: int | None = None,
    include_background: bool = False,
) -> list[dict[str, Any]]:
    """One row per class: ``class``, ``name``, ``voxels``, ``volume_ml``, ``mean``, ``std``, ``touches_border``, ``note``.

    Args:
        label: the label map on the image's grid, ``(X, Y, Z)`` or ``(1, X, Y, Z)`` (values 0..C-1), or
            one-hot ``(C, X, Y, Z)`` (argmax).
        image: the image in its original intensities on the same grid, ``(X, Y, Z)`` or ``(1, X, Y, Z)``
            (first channel used); None leaves ``mean`` and ``std`` empty.
        affine: the grid's 4x4 voxel-to-world affine in mm (``MetaTensor.affine``).
        class_names: names by class index, background first; default ``class_<i>``.
        num_classes: classes to report (default: ``len(class_names)``, else the label map's maximum + 1);
            a class absent from the case gets a row with 0 voxels.
        include_background: report class 0 too.

    Raises:
        ValueError: the label and image grids differ, or the label holds a value outside 0..num_classes-1.

    >>> lab = np.zeros((4, 4, 4), int); lab[1:3, 1:3, 1:3] = 1; lab[0, 0, 0] = 2
    >>> img = np.full((4, 4, 4), 50.0); img[0, 0, 0] = -100
    >>> rows = label_statistics(lab, img, np.diag([2.0, 2.0, 2.5, 1.0]), ["background", "a", "b"])
    >>> [(r["name"], r["voxels"], r["volume_ml"], r["mean"], r["touches_border"]) for r in rows]
    [('a', 8, 0.08, 50.0, False), ('b', 1, 0.01, -100.0, True)]
    """
    lab = label_volume(label)
    img = None
    if image is not None:
        img = _numpy(image)
        img = img[0] if img.ndim == 4 else img
        if img.shape != lab.shape:
            raise ValueError(f"the image grid {tuple(img.shape)} differs from the label map's {tuple(lab.shape)}")
    lo, hi = (int(np.rint(lab.min())), int(np.rint(lab.max()))) if lab.size else (0, 0)
    if num_classes is None:
        num_classes = len(class_names) if class_names is not None else hi + 1
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"label values must be within 0..{num_classes - 1}, got {lo}..{hi}")
    names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(num_classes)]
    if len(names) < num_classes:
        names += [f"class_{i}" for i in range(len(names), num_classes)]
    voxel_ml = abs(float(np.linalg.det(np.asarray(_numpy(affine), float)[:3, :3]))) / 1000.0

    counts = np.zeros(num_classes, np.int64)
    sums = np.zeros(num_classes, np.float64)
    squares = np.zeros(num_classes, np.float64)
    for part in slabs(lab.shape):  # one pass, all classes, temporaries bounded by the slab
        classes = as_labels(lab[..., part]).reshape(-1)
        counts += np.bincount(classes, minlength=num_classes)
        if img is not None:
            values = img[..., part].astype(np.float64).reshape(-1)
            sums += np.bincount(classes, weights=values, minlength=num_classes)
            squares += np.bincount(classes, weights=values * values, minlength=num_classes)
    touching: set[int] = set()
    for axis in range(3):
        for index in (0, lab.shape[axis] - 1):
            touching.update(np.unique(as_labels(np.take(lab, index, axis=axis))).tolist())

    rows = []
    for c in range(0 if include_background else 1, num_classes):
        n = int(counts[c])
        mean = std = None
        if n and img is not None:
            m = sums[c] / n
            mean = round(float(m), 3)
            std = round(float(math.sqrt(max(squares[c] / n - m * m, 0.0))), 3)
        border = bool(n) and c in touching
        rows.append(
            {
                "class": c,
                "name": names[c],
                "voxels": n,
                "volume_ml": round(n * voxel_ml, 3),
                "mean": mean,
                "std": std,
                "touches_border": border,
                "note": BORDER_NOTE if border else "",
            }
        )
    return rows


def same_grid(a: Any, b: Any, source: str) -> None:
    """Raise ValueError (naming ``source``) unless ``a`` and ``b`` have the same spatial shape and affine."""
    shape_a, shape_b = tuple(a.shape[-3:]), tuple(b.shape[-3:])
    if shape_a != shape_b:
        raise ValueError(f"{source}: the image as read has shape {shape_a}, the label map {shape_b}: not the same grid")
    aff_a, aff_b = getattr(a, "affine", None), getattr(b, "affine", None)
    if aff_a is not None and aff_b is not None and not np.allclose(_numpy(aff_a), _numpy(aff_b), atol=1e-3):
        raise ValueError(f"{source}: the image as read and the label map have different affines: not the same grid")


class CaseStatistics(CaseOutputHandler):
    """Write ``<case>_statistics.json`` per case and one ``statistics.csv`` per run into ``output_dir``.

    Attach to the inference evaluator (``handlers``), after the ``postprocessing`` that inverts the
    prediction onto the input's grid. The JSON holds ``case``, ``input``, ``voxel_volume_ml``,
    ``spacing_mm``, ``intensity`` (what ``mean``/``std`` are) and ``classes`` (the rows of
    :func:`label_statistics`). The CSV (columns :data:`CSV_COLUMNS`) is written at the end of the run
    from the JSON files of the cases this run processed (every rank's, gathered), by rank 0, and of the
    cases it skipped because their outputs exist (``overwrite`` false: their earlier JSON is kept and
    listed), so a second run over a folder with new images gives the whole folder's table.

    Args:
        output_dir: where the files go (``@output_dir``).
        class_names: names by class index, background first; or
        meta_file: a bundle's metadata.json to read them from (``custom.utils.class_names_from_metadata``).
        enabled: False attaches nothing (the bundle's ``statistics`` switch).
        pred_key: the prediction's key.
        raw_key: item key holding the image as loaded (original intensities, the input's grid); when the
            item lacks it, the input is read again from its file.
        include_background: report class 0 too.
        csv_name: the run's table (``statistics.csv``).

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
        raw_key: str = "image_raw",
        include_background: bool = False,
        csv_name: str = "statistics.csv",
    ) -> None:
        super().__init__(output_dir, enabled, pred_key, "statistics", class_names=class_names, meta_file=meta_file)
        self.raw_key = raw_key
        self.include_background = include_background
        self.csv_name = csv_name
        self._cases: list[str] = []

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        if not self.enabled:
            return
        super().attach(engine)
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self._cases.clear())
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def case_statistics(self, pred: Any, image: Any, source: str) -> dict[str, Any]:
        """The JSON document of one case (``image``: the input as loaded, original intensities, its own grid)."""
        same_grid(image, pred, source)
        affine = _numpy(getattr(pred, "affine", None) if getattr(pred, "affine", None) is not None else image.affine)
        rows = label_statistics(pred, image, affine, self.class_names, include_background=self.include_background)
        spacing = np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(0))
        return {
            "input": source,
            "grid": "the input image's own grid (the label map as written), volumes from its voxel spacing",
            "shape": [int(s) for s in pred.shape[-3:]],
            "spacing_mm": [round(float(s), 4) for s in spacing],
            "voxel_volume_ml": round(abs(float(np.linalg.det(np.asarray(affine, float)[:3, :3]))) / 1000.0, 6),
            "intensity": "mean and std of the input image's values inside each structure, as stored (HU for CT)",
            "classes": rows,
        }

    def iteration_completed(self, engine: Engine) -> None:
        """Each case's JSON; a case skipped because its outputs exist keeps its earlier JSON, listed in the CSV."""
        super().iteration_completed(engine)
        batch = engine.state.batch
        if isinstance(batch, Mapping) and SKIPPED in batch:
            image = batch.get("image")
            image = image[0] if isinstance(image, (list, tuple)) and image else image
            if isinstance(image, (str, os.PathLike)):
                case = case_name(image)
                if (self.output_dir / f"{case}_statistics.json").is_file():
                    self._cases.append(case)

    def write_case(self, item: Mapping[str, Any], batch: Mapping[str, Any], case: str, source: str) -> None:
        image = original_image(item, batch, self.raw_key, source)  # type: ignore[arg-type]
        doc = {"case": case, **self.case_statistics(item[self.pred_key], image, source)}
        path = self.output_dir / f"{case}_statistics.json"
        atomic_write(path, lambda f: f.write(json.dumps(doc, indent=4)), mode="w")
        self._cases.append(case)
        logger.info(f"wrote {path}")

    def epoch_completed(self, engine: Engine) -> None:
        from monai.utils import string_list_all_gather

        dist = torch.distributed
        cases = string_list_all_gather(self._cases) if dist.is_available() and dist.is_initialized() else self._cases
        if not is_main_process() or not cases:
            return
        path = self.output_dir / self.csv_name
        write_statistics_csv(path, [self.output_dir / f"{c}_statistics.json" for c in sorted(set(cases))])
        logger.info(f"wrote {path}: {len(set(cases))} case(s)")


def write_statistics_csv(path: str | os.PathLike, json_files: Sequence[str | os.PathLike]) -> None:
    """One CSV row per case and class from ``<case>_statistics.json`` files (columns :data:`CSV_COLUMNS`), atomic."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for file in json_files:
        with open(file, encoding="utf-8") as f:
            doc = json.load(f)
        for row in doc["classes"]:
            writer.writerow({"case": doc["case"], **{k: ("" if row[k] is None else row[k]) for k in CSV_COLUMNS[1:]}})
    text = buffer.getvalue()
    atomic_write(Path(path), lambda f: f.write(text), mode="w")


def statistics_table(doc: Mapping[str, Any] | str | os.PathLike, all_classes: bool = False) -> str:
    """A ``<case>_statistics.json`` as a plain-text table (what the demo prints): one line per class found.

    Args:
        doc: the document or its path.
        all_classes: also list the classes with no voxel.

    >>> print(statistics_table({"case": "ct", "classes": [{"class": 1, "name": "liver", "voxels": 10,
    ...     "volume_ml": 1.5, "mean": 55.0, "std": 9.5, "touches_border": True, "note": BORDER_NOTE}]}))
    ct
    class  name   voxels  volume ml  mean HU  std HU  border
        1  liver      10        1.5     55.0     9.5  yes (volume is a lower bound)
    """
    if not isinstance(doc, Mapping):
        with open(doc, encoding="utf-8") as f:
            doc = json.load(f)
    rows = [r for r in doc["classes"] if all_classes or r["voxels"]]
    header = ("class", "name", "voxels", "volume ml", "mean HU", "std HU", "border")
    cells = [
        (
            str(r["class"]),
            str(r["name"]),
            str(r["voxels"]),
            f"{r['volume_ml']:.1f}",
            "" if r["mean"] is None else f"{r['mean']:.1f}",
            "" if r["std"] is None else f"{r['std']:.1f}",
            "yes (volume is a lower bound)" if r["touches_border"] else "",
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
    left = {1, 6}  # name and border read left-aligned

    def line(values) -> str:
        parts = [v.ljust(w) if i in left else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths, strict=True))]
        return "  ".join(parts).rstrip()

    return "\n".join([str(doc["case"]), line(header), *(line(c) for c in cells)])
