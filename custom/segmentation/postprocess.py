"""Keep only a class's largest connected component where the cross-validation results say it helps.

nnU-Net's rule (``nnunetv2/postprocessing/remove_connected_components.py``, read for the idea): for each
class, remove all but the largest connected component from the cross-validation predictions and keep the
change only if it improves the class's score; the choice is written to a file that inference applies.
Here the score is the class's mean Dice over all cross-validation cases pooled (cases where the class is
absent from both label and prediction are not scored, see :mod:`custom.segmentation.metrics`); a tie
(nothing changed, or a gain of exactly 0) leaves the class alone. Removing components never adds a
voxel, so classes are decided independently: the removed voxels become background.

The operation is MONAI's ``KeepLargestConnectedComponent`` (``independent=True``, default full
connectivity: 26 neighbours in 3-D), the same object at decision time and at inference, so what was
scored is what runs. MONAI has no step that decides whether to apply it; that is what this adds.

Decision file (JSON)::

    {"format": 1, "method": "keep_largest_connected_component", "applied_labels": [1, 6],
     "criterion": "...", "cases": 30,
     "classes": {"1": {"name": "spleen", "applied": true, "dice_before": 0.93, "dice_after": 0.94, "n": 30}, ...}}
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import KeepLargestConnectedComponent, KeepLargestConnectedComponentd, MapTransform

from custom.segmentation.metrics import bounding_slices, require
from custom.utils import atomic_write

__all__ = [
    "DECISION_FORMAT",
    "PostprocessingError",
    "LargestComponentTrial",
    "decide_largest_component",
    "write_decision",
    "read_decision",
    "KeepLargestComponentsd",
]

DECISION_FORMAT = 1
_CRITERION = "mean Dice of the class over the pooled cross-validation cases rises (strictly)"


class PostprocessingError(ValueError):
    """The decision file is missing or not one of these; the message names it and the fix."""


def _dice(p: torch.Tensor, t: torch.Tensor) -> float | None:
    n = int(p.sum()) + int(t.sum())
    return None if n == 0 else 2.0 * int((p & t).sum()) / n


def _as_map(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    t = t.round().long() if t.is_floating_point() else t.long()
    return t if t.ndim == 4 else t[None]


class LargestComponentTrial:
    """Score each class with and without its small components, one case at a time; :meth:`decision` decides.

    Args:
        labels: the label values to decide (the foreground classes, e.g. ``1..13`` for BTCV).
        class_names: a name per entry of ``labels``, recorded in the decision.

    Raises:
        ValueError: ``class_names`` does not match ``labels``.
    """

    def __init__(self, labels: Sequence[int], class_names: Sequence[str] | None = None) -> None:
        require("skimage", "scikit-image", "keeping the largest connected component (MONAI's)")
        self.labels = [int(c) for c in labels]
        self.names = list(class_names) if class_names is not None else [str(c) for c in self.labels]
        if len(self.names) != len(self.labels):
            raise ValueError(f"class_names has {len(self.names)} entries for {len(self.labels)} labels")
        self._keep = {
            c: KeepLargestConnectedComponent(applied_labels=[c], is_onehot=False, independent=True) for c in self.labels
        }
        self.before: dict[int, list[float]] = {c: [] for c in self.labels}
        self.after: dict[int, list[float]] = {c: [] for c in self.labels}
        self.cases = 0

    def add(self, pred: np.ndarray | torch.Tensor, label: np.ndarray | torch.Tensor) -> None:
        """Score one case: label maps ``(X, Y, Z)`` or ``(1, X, Y, Z)`` on the same grid.

        Raises:
            ValueError: the shapes differ.
        """
        p, t = _as_map(pred), _as_map(label)
        if p.shape != t.shape:
            raise ValueError(f"prediction shape {tuple(p.shape)} differs from label shape {tuple(t.shape)}")
        self.cases += 1
        for c in self.labels:
            pc, tc = p == c, t == c
            d0 = _dice(pc, tc)
            if d0 is None:
                continue
            self.before[c].append(d0)
            if not bool(pc.any()):
                self.after[c].append(d0)
                continue
            box = (slice(None), *bounding_slices(pc[0]))  # every component of c lies inside c's bounding box
            kept = torch.as_tensor(self._keep[c](p[box])) == c
            inter, n_t = int((kept & tc[box]).sum()), int(tc.sum())
            self.after[c].append(2.0 * inter / (int(kept.sum()) + n_t))

    def decision(self) -> dict[str, Any]:
        """The decision (see the module docstring), ready for :func:`write_decision`.

        Raises:
            ValueError: no case was added.
        """
        if self.cases == 0:
            raise ValueError("no cross-validation cases to decide the post-processing on")
        classes = {}
        for c, name in zip(self.labels, self.names, strict=True):
            b = float(np.mean(self.before[c])) if self.before[c] else None
            a = float(np.mean(self.after[c])) if self.after[c] else None
            applied = b is not None and a is not None and a > b
            classes[str(c)] = {
                "name": name,
                "applied": applied,
                "dice_before": b,
                "dice_after": a,
                "n": len(self.before[c]),
            }
        return {
            "format": DECISION_FORMAT,
            "method": "keep_largest_connected_component",
            "applied_labels": [c for c in self.labels if classes[str(c)]["applied"]],
            "criterion": _CRITERION,
            "connectivity": "full (26 neighbours in 3-D)",
            "cases": self.cases,
            "classes": classes,
        }


def decide_largest_component(
    pairs: Iterable[tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]],
    labels: Sequence[int],
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """For each label value, whether keeping its largest connected component raises its pooled mean Dice.

    Args:
        pairs: ``(prediction, label)`` label maps ``(X, Y, Z)`` or ``(1, X, Y, Z)``, one pair per
            cross-validation case (any iterable: a generator reading files keeps one case in memory).
        labels, class_names: see :class:`LargestComponentTrial`.

    Returns:
        the decision (see the module docstring), ready for :func:`write_decision`.

    Raises:
        ValueError: a prediction's shape differs from its label's; no pairs.
    """
    trial = LargestComponentTrial(labels, class_names)
    for pred, label in pairs:
        trial.add(pred, label)
    return trial.decision()


def write_decision(decision: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write the decision atomically (a reader never sees half a file)."""
    atomic_write(path, lambda f: f.write(json.dumps(decision, indent=4) + "\n"), mode="w")


def read_decision(path: str | os.PathLike) -> list[int]:
    """The label values whose largest component is kept, from a decision file.

    Raises:
        PostprocessingError: missing file, not JSON, or not a decision file of this kind.
    """
    path = Path(path)
    if not path.is_file():
        raise PostprocessingError(
            f"{path}: no post-processing decision there; run the cross-validation summary (run cv_summary) "
            "first, or set the decision file to None to segment without post-processing"
        )
    try:
        decision = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PostprocessingError(f"{path}: cannot be read as JSON ({e}); run cv_summary again") from None
    labels = decision.get("applied_labels") if isinstance(decision, Mapping) else None
    if decision.get("method") != "keep_largest_connected_component" or not isinstance(labels, list):
        raise PostprocessingError(f"{path}: not a post-processing decision file (no 'applied_labels' list)")
    if not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in labels):
        raise PostprocessingError(f"{path}: 'applied_labels' must be positive label values, got {labels}")
    return labels


class KeepLargestComponentsd(MapTransform):
    """Apply a decision file to label maps ``(1, X, Y, Z)`` of class indices at inference.

    For the label values the file names, only the largest connected component is kept (MONAI's
    ``KeepLargestConnectedComponentd``, ``independent=True``, as decided); the others are left as they
    are. With ``decision_file=None``, or a file that applies to no class, the data pass unchanged.

    Args:
        keys: the label maps to clean (``pred``, after ``AsDiscreted(argmax=True)``).
        decision_file: the file :func:`write_decision` wrote, or None.

    Raises:
        PostprocessingError: at construction, when ``decision_file`` is set but missing or invalid.
    """

    def __init__(self, keys: KeysCollection, decision_file: str | os.PathLike | None = None) -> None:
        super().__init__(keys)
        self.decision_file = decision_file
        self.applied_labels = read_decision(decision_file) if decision_file is not None else []
        if self.applied_labels:
            require("skimage", "scikit-image", f"the post-processing of {decision_file}")
        self._keep = (
            KeepLargestConnectedComponentd(keys, applied_labels=self.applied_labels, is_onehot=False, independent=True)
            if self.applied_labels
            else None
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        return dict(data) if self._keep is None else self._keep(data)
