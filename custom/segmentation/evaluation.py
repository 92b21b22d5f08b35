"""Dice of a written label map against the original label, the way challenge scoring counts it.

Why not MONAI's ``DiceMetric``: its ``ignore_empty`` (MONAI 1.6.1, ``monai/metrics/meandice.py``)
has two settings and neither is the rule these bundles report. ``ignore_empty=True`` (the default,
also behind ``MeanDice``) gives NaN whenever the label lacks a class, *even when the prediction holds
it*, so a false-positive organ vanishes from the means; ``ignore_empty=False`` gives 0 for that case
but 1.0 when label and prediction both lack the class. :class:`LabelDiceMetric` scores a class of a
case as ``2 |P & L| / (|P| + |L|)``: 0 when the label lacks it but the prediction holds it (a false
positive), NaN (``null`` in ``metrics.json``) only when both lack it (nothing to score). It also
reads label maps of class indices directly (one bincount per case) instead of one-hot tensors, which
on the original CT grid (512 x 512 x Z, 14 classes) would cost gigabytes.

:class:`CheckSameGridd` refuses a label whose grid differs from the image's, naming both files: the
score is that of the label map inference writes on the image's grid, voxel by voxel.

Source of the protocol: the paper's research code (research-contributions ``SwinUNETR/BTCV/test.py``)
resamples the argmax prediction to the original label's grid (nearest) and scores Dice there.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.metrics import CumulativeIterationMetric
from monai.transforms import MapTransform

__all__ = ["LabelDiceMetric", "label_dice", "class_means", "CheckSameGridd"]


def label_dice(
    y_pred: torch.Tensor, y: torch.Tensor, num_classes: int | None = None, include_background: bool = False
) -> torch.Tensor:
    """Dice per case and class, ``(B, C)``: ``2 |P & L| / (|P| + |L|)``, NaN where ``|P| + |L| = 0``.

    Args:
        y_pred: ``(B, 1, spatial...)`` class indices (with ``num_classes``), or ``(B, C, spatial...)``
            binary channels (one-hot or overlapping regions, thresholded at 0.5).
        y: the label, in the same form and on the same grid as ``y_pred``.
        num_classes: number of classes including the background, for class-index maps.
        include_background: keep channel / class 0 in the result.

    Raises:
        ValueError: shapes differ, or a class index outside ``[0, num_classes)``.

    >>> p = torch.tensor([0, 1, 1, 2]).view(1, 1, 4)
    >>> l = torch.tensor([0, 1, 0, 0]).view(1, 1, 4)
    >>> label_dice(p, l, num_classes=4).tolist()  # class 2 predicted but absent: 0; class 3 nowhere: nan
    [[0.6666666666666666, 0.0, nan]]
    """
    if y_pred.shape != y.shape:
        raise ValueError(f"prediction shape {tuple(y_pred.shape)} differs from label shape {tuple(y.shape)}")
    batch = y_pred.shape[0]
    if y_pred.shape[1] == 1 and num_classes is not None and num_classes > 1:
        n = int(num_classes)
        p, t = y_pred.reshape(batch, -1).round().long(), y.reshape(batch, -1).round().long()
        for name, v in (("prediction", p), ("label", t)):
            if v.numel() and (int(v.min()) < 0 or int(v.max()) >= n):
                raise ValueError(f"{name} holds class {int(v.max())} or {int(v.min())}: expected 0..{n - 1}")
        conf = torch.stack([torch.bincount(t[b] * n + p[b], minlength=n * n).view(n, n) for b in range(batch)])
        inter, n_label, n_pred = conf.diagonal(dim1=1, dim2=2), conf.sum(2), conf.sum(1)
    else:
        p, t = y_pred.reshape(*y_pred.shape[:2], -1) > 0.5, y.reshape(*y.shape[:2], -1) > 0.5
        inter, n_label, n_pred = (p & t).sum(2), t.sum(2), p.sum(2)
    denom = (n_label + n_pred).double()
    dice = torch.where(denom > 0, 2.0 * inter.double() / denom.clamp_min(1), torch.full_like(denom, float("nan")))
    return dice if include_background else dice[:, 1:]


def class_means(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(per-class means over cases, mean of those means)`` of ``(cases, classes)`` scores, NaN skipped.

    A class with no scored case has a NaN mean and is left out of the overall mean.

    >>> per_class, mean = class_means(torch.tensor([[1.0, float("nan")], [0.5, float("nan")]]))
    >>> per_class.tolist()[0], mean.item()
    (0.75, 0.75)
    """
    per_class = torch.nanmean(scores.double(), dim=0) if scores.numel() else scores.double().sum(0) * float("nan")
    return per_class, torch.nanmean(per_class) if per_class.numel() else torch.tensor(float("nan"))


class LabelDiceMetric(CumulativeIterationMetric):
    """Per-case, per-class Dice with false positives scored 0 (see the module docstring); MONAI's cumulative
    metric machinery keeps the buffer and gathers it across DDP ranks, so ``IgniteMetricHandler``
    (``save_details=True``) puts the ``(cases, classes)`` scores in ``engine.state.metric_details``.

    ``aggregate()`` is the mean over classes of each class's mean over cases, the ``mean_dice`` of
    ``metrics.json``.

    Args:
        num_classes: classes including the background, for class-index label maps (None: binary channels).
        include_background: score class / channel 0 too (the BraTS regions have no background channel).
    """

    def __init__(self, num_classes: int | None = None, include_background: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.include_background = include_background

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore
        if y is None:
            raise ValueError("LabelDiceMetric needs a label")
        return label_dice(y_pred, y, self.num_classes, self.include_background)

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        return class_means(self.get_buffer())[1]


def _source(x: Any) -> str:
    return str(getattr(x, "meta", {}).get("filename_or_obj", "?"))


class CheckSameGridd(MapTransform):
    """Refuse a ``ref_key`` item (the original label) whose grid is not the grid of each of ``keys``
    (the prediction, inverted onto the image's grid): shape and affine (within ``atol`` mm).

    Args:
        keys: the items to check (the prediction).
        ref_key: the original label, loaded from its file.
        atol: largest allowed difference of affine entries, as the preflight check allows.

    Raises:
        ValueError: naming the label and the image files and both grids.
    """

    def __init__(self, keys: KeysCollection, ref_key: str = "label", atol: float = 1e-3) -> None:
        super().__init__(keys)
        self.ref_key = ref_key
        self.atol = atol

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        ref = d[self.ref_key]
        for key in self.key_iterator(d):
            item = d[key]
            same = tuple(item.shape[1:]) == tuple(ref.shape[1:])
            a, b = getattr(item, "affine", None), getattr(ref, "affine", None)
            if same and a is not None and b is not None:
                same = bool(np.allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), atol=self.atol))
            if not same:
                raise ValueError(
                    f"{_source(ref)}: the label's grid (shape {tuple(ref.shape[1:])}) is not the grid of its image "
                    f"{_source(item)} (shape {tuple(item.shape[1:])}, affines compared to {self.atol} mm): "
                    "evaluation scores the label map inference writes on the image's grid; "
                    "resample the label onto its image first."
                )
        return d
