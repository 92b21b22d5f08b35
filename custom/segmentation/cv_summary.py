"""The cross-validation summary: score every fold's held-out predictions, choose the post-processing.

After the folds are trained and each has segmented its held-out cases (label maps on the labels' own
grids), :func:`cv_summary` reads each ``(label, prediction)`` file pair once and writes:

- ``cv_summary.json``: per case and class Dice, HD95 (mm) and NSD, and mean ± std over cases per class
  and mean, per fold and pooled (:func:`custom.segmentation.metrics.summarize`);
- ``cv_summary.md``: the same as Markdown tables (:func:`custom.segmentation.metrics.summary_markdown`);
- the post-processing decision file (:mod:`custom.segmentation.postprocess`), decided on the pooled cases.

The scores are of the raw predictions (what the folds produce); the decision file records each class's
pooled Dice before and after keeping its largest component, and the Markdown says which classes gain.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from custom.data.inputs import case_name
from custom.segmentation.folds import fold_datalist
from custom.segmentation.metrics import case_metrics, summarize, summary_markdown
from custom.segmentation.postprocess import LargestComponentTrial, write_decision
from custom.utils import atomic_write

__all__ = ["cv_summary", "cv_summary_from_splits", "fold_prediction_pairs", "read_pair"]


def read_pair(label_file: str | os.PathLike, pred_file: str | os.PathLike, atol: float = 1e-3) -> tuple:
    """``(prediction, label, spacing)`` of a file pair: label maps and the label's voxel size in mm.

    Raises:
        FileNotFoundError: a file is missing (named).
        ValueError: the prediction is not on the label's grid (shape or affine), naming both files.
    """
    import nibabel as nib

    for f in (label_file, pred_file):
        if not Path(f).is_file():
            raise FileNotFoundError(f"{f}: not found (listed for the cross-validation summary)")
    label_img, pred_img = nib.load(str(label_file)), nib.load(str(pred_file))
    label, pred = np.asanyarray(label_img.dataobj), np.asanyarray(pred_img.dataobj)
    label = label[..., 0] if label.ndim == 4 and label.shape[-1] == 1 else label
    pred = pred[..., 0] if pred.ndim == 4 and pred.shape[-1] == 1 else pred
    if label.shape != pred.shape or not np.allclose(label_img.affine, pred_img.affine, atol=atol):
        raise ValueError(
            f"{pred_file}: not on the grid of its label {label_file} (shape {pred.shape} vs {label.shape}, affine "
            f"differs by more than {atol} mm): score the label map inference writes on the image's grid"
        )
    spacing = tuple(float(s) for s in label_img.header.get_zooms()[:3])
    return pred, label, spacing


def cv_summary(
    folds: Mapping[int, Sequence[tuple[str | os.PathLike, str | os.PathLike]]],
    output_dir: str | os.PathLike,
    class_names: Sequence[str],
    nsd_tolerance_mm: float | Sequence[float],
    classes: Sequence[int | Sequence[int]] | None = None,
    decision_file: str | os.PathLike | None = None,
    postprocess_labels: Sequence[int] | None = None,
    hd95_empty: str | None = "diagonal",
) -> dict[str, Any]:
    """Write ``cv_summary.json``, ``cv_summary.md`` and the post-processing decision; return the summary.

    Args:
        folds: fold -> ``[(label_file, prediction_file), ...]``, the fold's held-out cases.
        output_dir: where ``cv_summary.json`` and ``cv_summary.md`` go (``@output_dir``).
        class_names: a name per scored class (foreground only; BTCV's 13 organs).
        nsd_tolerance_mm: NSD tolerance in mm, one or one per class.
        classes: the label value of each class (default ``1..len(class_names)``), or label values per
            region (BraTS: ``list(custom.segmentation.msd.BRATS_REGIONS.values())``).
        decision_file: default ``output_dir/postprocessing.json``.
        postprocess_labels: the label values post-processing decides on (default: every label value of
            ``classes``); with regions these are the written label values (1, 2, 3), each judged by its
            own Dice.
        hd95_empty: see :func:`custom.segmentation.metrics.case_metrics`.

    Raises:
        FileNotFoundError, ValueError: see :func:`read_pair`; no cases; names and classes differ.
    """
    classes = list(classes) if classes is not None else list(range(1, len(class_names) + 1))
    if len(classes) != len(class_names):
        raise ValueError(f"{len(class_names)} class names for {len(classes)} classes")
    if postprocess_labels is None:
        values = {v for c in classes for v in ([c] if isinstance(c, (int, np.integer)) else c)}
        postprocess_labels = sorted(int(v) for v in values)
    if all(isinstance(c, (int, np.integer)) for c in classes):
        pp_names = [class_names[classes.index(v)] if v in classes else str(v) for v in postprocess_labels]
    else:
        pp_names = [f"label {v}" for v in postprocess_labels]
    trial = LargestComponentTrial(postprocess_labels, pp_names)
    cases = []
    for fold in sorted(folds):
        for label_file, pred_file in folds[fold]:
            pred, label, spacing = read_pair(label_file, pred_file)
            scores = case_metrics(pred, label, classes, spacing, nsd_tolerance_mm, hd95_empty)
            cases.append({"fold": int(fold), "case": str(label_file), "prediction": str(pred_file), **scores})
            trial.add(pred, label)
    if not cases:
        raise ValueError("cv_summary: no (label, prediction) pairs given")
    out = Path(output_dir)
    decision_path = Path(decision_file) if decision_file is not None else out / "postprocessing.json"
    decision = trial.decision()
    write_decision(decision, decision_path)
    summary = summarize(cases, class_names, nsd_tolerance_mm, hd95_empty)
    summary["postprocessing"] = {"file": str(decision_path), "applied_labels": decision["applied_labels"]}
    atomic_write(out / "cv_summary.json", lambda f: f.write(json.dumps(summary, indent=4) + "\n"), mode="w")
    gains = [
        f"{c['name']} ({c['dice_before']:.3f} -> {c['dice_after']:.3f})"
        for c in decision["classes"].values()
        if c["applied"]
    ]
    note = (
        f"\nPost-processing ({decision_path.name}): largest connected component kept for "
        + (", ".join(gains) if gains else "no class (it raised no class's pooled mean Dice)")
        + ".\n"
    )
    atomic_write(out / "cv_summary.md", lambda f: f.write(summary_markdown(summary) + note), mode="w")
    return summary


def fold_prediction_pairs(
    cases: Sequence[Mapping[str, Any]],
    splits_file: str | os.PathLike,
    num_folds: int,
    prediction_dir: str,
    dataset_dir: str | os.PathLike | None = None,
    postfix: str = "seg",
) -> dict[int, list[tuple[str, str]]]:
    """fold -> ``[(label_file, prediction_file), ...]`` of its held-out cases, by the splits file.

    Args:
        cases: every labelled case (``image`` and ``label`` paths), as given to the folds.
        splits_file: the file the folds were trained with (it must exist: the folds were trained).
        num_folds: the number of folds.
        prediction_dir: a folder per fold, ``"{fold}"`` standing for the fold (``@output_dir + '/fold_{fold}'``),
            holding ``<case>_<postfix>.nii.gz`` as inference and evaluation name them
            (:func:`custom.data.inputs.case_name` of the image).
        dataset_dir: as given to the folds (case identifiers are relative to it).

    Raises:
        FileNotFoundError: no splits file, or a held-out case's prediction is missing (named, with the fix).
    """
    if not Path(splits_file).is_file():
        raise FileNotFoundError(
            f"{splits_file}: no splits file, so no trained folds to summarize; train the folds first"
        )
    pairs: dict[int, list[tuple[str, str]]] = {}
    for fold in range(num_folds):
        folder = Path(prediction_dir.format(fold=fold))
        pairs[fold] = []
        for item in fold_datalist(cases, splits_file, num_folds, fold, "validation", dataset_dir):
            pred = folder / f"{case_name(item['image'])}_{postfix}.nii.gz"
            if not pred.is_file():
                raise FileNotFoundError(
                    f"{pred}: the prediction of fold {fold} for its held-out case {item['image']} is missing; "
                    f"segment fold {fold}'s validation cases first (evaluate with --fold {fold})"
                )
            pairs[fold].append((str(item["label"]), str(pred)))
    return pairs


def cv_summary_from_splits(
    cases: Sequence[Mapping[str, Any]],
    splits_file: str | os.PathLike,
    num_folds: int,
    prediction_dir: str,
    output_dir: str | os.PathLike,
    class_names: Sequence[str],
    nsd_tolerance_mm: float | Sequence[float],
    dataset_dir: str | os.PathLike | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """:func:`cv_summary` of the predictions :func:`fold_prediction_pairs` finds: the ``run cv_summary`` step.

    ``kwargs`` go to :func:`cv_summary` (``classes``, ``decision_file``, ``postprocess_labels``, ``hd95_empty``).
    """
    folds = fold_prediction_pairs(cases, splits_file, num_folds, prediction_dir, dataset_dir)
    return cv_summary(folds, output_dir, class_names, nsd_tolerance_mm, **kwargs)
