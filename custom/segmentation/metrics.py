"""Per-case, per-class Dice, HD95 (mm) and NSD (surface Dice at a tolerance in mm), and their summary.

The scores of the paper's tables: Dice and NSD for the Medical Segmentation Decathlon (its scoring uses
the normalised surface Dice at a tolerance in mm per task), Dice and Hausdorff distance for BTCV's
leaderboard. Each is computed on the label's own grid, with that grid's voxel spacing (anisotropic
spacing included), for the label map inference writes there.

MONAI does the geometry: ``monai.metrics.compute_hausdorff_distance(percentile=95, spacing=...)`` and
``compute_surface_dice(class_thresholds=..., spacing=...)`` (distances in mm when ``spacing`` is given,
so the tolerance is in mm too). This module adds what they lack: one class at a time from a label map of
class indices (no 14-channel one-hot on a 512 x 512 x Z grid), a stated rule for empty classes, and the
mean ± std summary per fold and pooled (``cv_summary.json`` and its Markdown table).

Empty classes (a class of one case; "present" = at least one voxel):

================  =====================  ==================================================
label / pred      Dice, NSD              HD95
================  =====================  ==================================================
both absent       null (not scored)      null (not scored)
one absent        0                      the grid's diagonal in mm (``hd95_empty="diagonal"``)
                                         or null (``hd95_empty=None``)
================  =====================  ==================================================

Dice: as :mod:`custom.segmentation.evaluation` (the research BTCV ``test.py`` scores an organ missing
from the label but predicted as 0). NSD: MONAI's ``compute_surface_dice`` rule (nan when absent from
both, 0 when in one only). HD95 when one side is empty has no finite value; leaving it out (null) would
hide a missed organ or a false-positive one from the mean, so by default it scores the largest distance
the grid allows, its diagonal ``sqrt(sum((shape * spacing)^2))`` mm: the rule of the BraTS challenge
scoring, whose 373.13 mm is the diagonal of its 240 x 240 x 155 grid of 1 mm voxels [unverified here: no
copy of the BraTS scoring code in this project's sources; the Decathlon scores no Hausdorff distance and
no BTCV scoring code was found]. The summary says which rule was used.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "METRICS",
    "class_masks",
    "bounding_slices",
    "require",
    "case_metrics",
    "summarize",
    "summary_markdown",
]

#: the metrics of a case, in table order, with their unit
METRICS: dict[str, str] = {"dice": "", "hd95": "mm", "nsd": ""}


def require(module: str, package: str, use: str) -> None:
    """Raise ImportError naming the pip package (pinned in requirements.txt) when ``module`` is missing."""
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{use} needs {package}, which is not installed: pip install -r requirements.txt")


def _label_tensor(label_map: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(label_map) if not isinstance(label_map, torch.Tensor) else label_map)
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 3:
        raise ValueError(f"expected a 3-D label map (X, Y, Z) or (1, X, Y, Z), got shape {tuple(t.shape)}")
    return t.round().long() if t.is_floating_point() else t.long()


def _mask(t: torch.Tensor, c: int | Sequence[int]) -> torch.Tensor:
    if isinstance(c, (int, np.integer)):
        return t == int(c)
    return torch.isin(t, torch.as_tensor([int(v) for v in c], dtype=torch.long))


def class_masks(label_map: np.ndarray | torch.Tensor, classes: Sequence[int | Sequence[int]]) -> list[torch.Tensor]:
    """Boolean masks ``(X, Y, Z)`` of each class: ``label == c`` for an int, ``label in values`` for a region.

    Args:
        label_map: class indices ``(X, Y, Z)`` or ``(1, X, Y, Z)``.
        classes: a label value per class (``[1, 2, ...]``), or label values per region (BraTS
            ``[(2, 3), (1, 2, 3), (3,)]``).

    Raises:
        ValueError: not a 3-D label map.
    """
    t = _label_tensor(label_map)
    return [_mask(t, c) for c in classes]


def bounding_slices(mask: torch.Tensor, margin: int = 0) -> tuple[slice, ...]:
    """Slices of the smallest box holding every ``True`` voxel of a non-empty ``mask``, ``margin`` voxels wider
    (clipped to the grid): what a per-class computation needs of a 512 x 512 x Z volume.

    >>> m = torch.zeros(5, 5, 5, dtype=torch.bool); m[1, 2, 3] = True
    >>> bounding_slices(m, 1)
    (slice(0, 3, None), slice(1, 4, None), slice(2, 5, None))
    """
    out = []
    for axis in range(mask.ndim):
        other = [a for a in range(mask.ndim) if a != axis]
        hit = torch.nonzero(mask.any(dim=other) if other else mask).flatten()
        out.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(out)


def _diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing, strict=True))))


def case_metrics(
    pred: np.ndarray | torch.Tensor,
    label: np.ndarray | torch.Tensor,
    classes: Sequence[int | Sequence[int]],
    spacing: Sequence[float],
    nsd_tolerance_mm: float | Sequence[float],
    hd95_empty: str | None = "diagonal",
) -> dict[str, list[float | None]]:
    """Dice, HD95 (mm) and NSD of each class of one case; ``None`` where the class is not scored.

    Args:
        pred: the predicted label map on the label's grid, ``(X, Y, Z)`` or ``(1, X, Y, Z)``.
        label: the reference label map, same shape.
        classes: the scored classes (see :func:`class_masks`), background left out.
        spacing: voxel size of the label's grid in mm, one per axis (``header.get_zooms()[:3]``).
        nsd_tolerance_mm: surface tolerance in mm, one for all classes or one per class.
        hd95_empty: ``"diagonal"`` or None, the HD95 of a class present in only one of label and
            prediction (see the module docstring).

    Returns:
        ``{"dice": [...], "hd95": [...], "nsd": [...]}``, one entry per class.

    Raises:
        ValueError: shapes differ; spacing not 3 positive numbers; tolerance count or value wrong.

    >>> label = np.zeros((6, 6, 6), int); label[1:3, 1:3, 1:3] = 1
    >>> m = case_metrics(label, label, [1, 2], (1.0, 1.0, 2.0), 1.0)
    >>> m["dice"], m["hd95"], m["nsd"]
    ([1.0, None], [0.0, None], [1.0, None])
    """
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    require("scipy", "scipy", "HD95 and NSD (MONAI's distance transform)")
    pred_t, label_t = _label_tensor(pred), _label_tensor(label)
    shape = tuple(label_t.shape)
    if tuple(pred_t.shape) != shape:
        raise ValueError(f"prediction grid {tuple(pred_t.shape)} differs from the label's {shape}")
    spacing = [float(s) for s in spacing]
    if len(spacing) != 3 or not all(s > 0 and math.isfinite(s) for s in spacing):
        raise ValueError(f"spacing must be 3 positive numbers in mm, got {spacing}")
    tolerances = (
        [float(nsd_tolerance_mm)] * len(classes)
        if isinstance(nsd_tolerance_mm, (int, float))
        else [float(t) for t in nsd_tolerance_mm]
    )
    if len(tolerances) != len(classes) or not all(t >= 0 and math.isfinite(t) for t in tolerances):
        raise ValueError(
            f"nsd_tolerance_mm: one non-negative number or one per class ({len(classes)}), got {tolerances}"
        )
    if hd95_empty not in ("diagonal", None):
        raise ValueError(f"hd95_empty must be 'diagonal' or None, got {hd95_empty!r}")
    out: dict[str, list[float | None]] = {name: [] for name in METRICS}
    for c, tol in zip(classes, tolerances, strict=True):
        p, t = _mask(pred_t, c), _mask(label_t, c)  # one class at a time: 2 masks in memory, not 2 x classes
        n_p, n_t, inter = int(p.sum()), int(t.sum()), int((p & t).sum())
        if n_p == 0 and n_t == 0:
            for name in METRICS:
                out[name].append(None)
            continue
        out["dice"].append(2.0 * inter / (n_p + n_t))
        if n_p == 0 or n_t == 0:
            out["hd95"].append(_diagonal_mm(shape, spacing) if hd95_empty == "diagonal" else None)
            out["nsd"].append(0.0)
            continue
        box = bounding_slices(p | t, margin=1)  # MONAI crops the same way (margin 1): only the copy is smaller
        yp, yt = p[box][None, None].float(), t[box][None, None].float()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # both masks are non-empty here: MONAI's empty-mask warnings do not apply
            hd = compute_hausdorff_distance(yp, yt, include_background=True, percentile=95, spacing=spacing)
            nsd = compute_surface_dice(yp, yt, [tol], include_background=True, spacing=spacing)
        out["hd95"].append(float(hd[0, 0]))
        out["nsd"].append(float(nsd[0, 0]))
    return out


def _stats(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """mean, population std (``ddof=0``) and count of the scored values."""
    v = np.asarray([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], float)
    if not v.size:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "n": int(v.size)}


def _block(cases: Sequence[Mapping[str, Any]], class_names: Sequence[str]) -> dict[str, Any]:
    block: dict[str, Any] = {"cases": len(cases)}
    for name in METRICS:
        per_class = {c: _stats([case[name][i] for case in cases]) for i, c in enumerate(class_names)}
        means = [s["mean"] for s in per_class.values() if s["mean"] is not None]
        case_means = [_stats(case[name])["mean"] for case in cases]
        overall = _stats(case_means)
        overall["mean"] = float(np.mean(means)) if means else None
        block[name] = {**per_class, "mean": overall}
    return block


def summarize(
    cases: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    nsd_tolerance_mm: float | Sequence[float],
    hd95_empty: str | None = "diagonal",
) -> dict[str, Any]:
    """The ``cv_summary.json`` structure: mean ± std over cases per class and mean, per fold and pooled.

    Args:
        cases: one dict per case, ``{"fold": int, "case": str, "dice": [...], "hd95": [...], "nsd": [...]}``
            (the lists of :func:`case_metrics`, one entry per class of ``class_names``).
        class_names: the scored classes' names, in order.
        nsd_tolerance_mm, hd95_empty: as given to :func:`case_metrics`, recorded in the summary.

    Returns:
        ``{"classes", "metrics" (unit per metric), "nsd_tolerance_mm", "hd95_empty", "std",
        "folds": {"0": block, ...}, "pooled": block, "cases": [...]}``; a block is ``{"cases": n,
        "<metric>": {"<class>": {"mean", "std", "n"}, ..., "mean": {"mean", "std", "n"}}}``. Per class:
        over the cases where it is scored (not null). ``"mean"``: ``mean`` is the mean of the class means
        (the ``mean_dice`` of ``metrics.json`` and of the leaderboards), ``std`` and ``n`` are over cases
        of each case's mean over its scored classes. ``std`` is the population standard deviation.
    """
    tol = (
        float(nsd_tolerance_mm) if isinstance(nsd_tolerance_mm, (int, float)) else [float(t) for t in nsd_tolerance_mm]
    )
    folds = sorted({int(c["fold"]) for c in cases})
    return {
        "classes": list(class_names),
        "metrics": dict(METRICS),
        "nsd_tolerance_mm": tol,
        "hd95_empty": hd95_empty,
        "std": "population (ddof=0)",
        "folds": {str(f): _block([c for c in cases if int(c["fold"]) == f], class_names) for f in folds},
        "pooled": _block(cases, class_names),
        "cases": [dict(c) for c in cases],
    }


def _cell(s: Mapping[str, Any], digits: int) -> str:
    if s["mean"] is None:
        return "–"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}" if s["std"] is not None else f"{s['mean']:.{digits}f}"


def _table(block: Mapping[str, Any], class_names: Sequence[str]) -> list[str]:
    lines = ["| class | Dice | HD95 (mm) | NSD |", "|---|---|---|---|"]
    for c in [*class_names, "mean"]:
        cells = [_cell(block[m][c], 2 if m == "hd95" else 3) for m in METRICS]
        lines.append(f"| {'**mean**' if c == 'mean' else c} | " + " | ".join(cells) + " |")
    return lines


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """``cv_summary.md``: a table per fold and one pooled, mean ± std over cases (``–``: nothing scored)."""
    names = summary["classes"]
    tol = summary["nsd_tolerance_mm"]
    tol_text = (
        f"{tol:g} mm"
        if isinstance(tol, float)
        else ", ".join(f"{n} {t:g} mm" for n, t in zip(names, tol, strict=False))
    )
    empty = "the grid's diagonal in mm" if summary["hd95_empty"] == "diagonal" else "not scored (left out of the mean)"
    lines = [
        "# Cross-validation summary",
        "",
        f"Mean ± std over cases (std: {summary['std']}). NSD: surface Dice at {tol_text}. A class absent from both "
        f"label and prediction is not scored; present in only one: Dice and NSD 0, HD95 {empty}. "
        "The mean row: the mean of the class means ± the std over cases of each case's class mean.",
        "",
        f"## Pooled ({summary['pooled']['cases']} cases)",
        "",
        *_table(summary["pooled"], names),
    ]
    for fold, block in summary["folds"].items():
        lines += ["", f"## Fold {fold} ({block['cases']} cases)", "", *_table(block, names)]
    return "\n".join(lines) + "\n"
