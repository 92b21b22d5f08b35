"""``metrics.json`` and the per-case PNG of an evaluation run.

``MetricsSaver`` writes CSV without class names; the bundles promise ``metrics.json`` by organ name.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from monai.utils import string_list_all_gather

from custom.data.inputs import IMAGE_SUFFIXES
from custom.inference.preview import save_evaluation_preview
from custom.inference.visualize import save_overlay_png
from custom.segmentation.evaluation import class_means
from custom.utils import atomic_write, is_main_process

if TYPE_CHECKING:
    from ignite.engine import Engine

logger = logging.getLogger(__name__)


def _nan_to_none(x: float) -> float | None:
    return None if math.isnan(x) else round(float(x), 6)


#: the scoring rule, written into every ``metrics.json``
NOTE = (
    "Dice = 2|P&L|/(|P|+|L|) per case and class; a class absent from the label but predicted scores 0 "
    "(false positive); null = absent from both label and prediction of that case, left out of the means; "
    "mean_dice = mean over classes of each class's mean over cases"
)


def _ras(x: Any) -> Any:
    """``x`` reoriented to RAS when it carries an affine (the picture's orientation), else unchanged."""
    from monai.data import MetaTensor
    from monai.transforms import Orientation

    return Orientation("RAS")(x) if isinstance(x, MetaTensor) else x


class EvaluationReport:
    """Write ``metrics.json`` (Dice per class by name, mean, per case) and a PNG per case.

    Reads the per-case, per-class scores the metric handler keeps (``save_details=True``) in
    ``engine.state.metric_details[metric_name]``, shape ``(cases, classes)``, already gathered across
    DDP ranks by MONAI; case names are gathered here in the same order. The bundles' ``evaluate.json``
    feeds it :class:`custom.segmentation.evaluation.LabelDiceMetric` on the original label grid: a class the label
    lacks but the prediction holds scores 0 (false positive); a class absent from both label and
    prediction of a case scores NaN, written as ``null`` and left out of that class's mean (and a class
    never scored is left out of ``mean_dice``). MONAI's ``MeanDice`` would hand it NaN for every class
    the label lacks (``ignore_empty``), false positives included, so it is not used here.

    Args:
        output_dir: where ``metrics.json`` and the ``<case>.png`` pictures go.
        class_names: names by channel index, background first (from metadata.json).
        metric_name: the evaluator's metric to report, e.g. ``val_mean_dice``.
        include_background: whether the metric's first column is the background.
        save_png: draw image | label | prediction for each case (by the rank that evaluated it).
    """

    def __init__(
        self,
        output_dir: str,
        class_names: Sequence[str],
        metric_name: str = "val_mean_dice",
        include_background: bool = False,
        save_png: bool = True,
        image_key: str = "image",
        label_key: str = "label",
        pred_key: str = "pred",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.class_names = list(class_names)
        self.metric_name = metric_name
        self.include_background = include_background
        self.save_png = save_png
        self.keys = (image_key, label_key, pred_key)
        self._cases: list[str] = []

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self._cases.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    @staticmethod
    def case_name(item: Mapping[str, Any], key: str) -> str:
        meta = getattr(item[key], "meta", {})
        name = Path(str(meta.get("filename_or_obj", f"case{id(item)}"))).name
        for suffix in IMAGE_SUFFIXES:
            if name.endswith(suffix):
                return name[: -len(suffix)]
        return name

    def iteration_completed(self, engine: Engine) -> None:
        image_key, label_key, pred_key = self.keys
        for item in engine.state.output:
            case = self.case_name(item, image_key)
            self._cases.append(case)
            if self.save_png and not self.include_background:
                # label maps (one class per voxel): the three-view preview, prediction above label, Dice in the title
                save_evaluation_preview(self.output_dir / f"{case}.png", item, self.class_names, case)
            elif self.save_png:
                # overlapping regions (BrainTumour): one axial strip per region channel
                save_overlay_png(
                    self.output_dir / f"{case}.png",
                    _ras(item[image_key]),
                    _ras(item[label_key]),
                    _ras(item[pred_key]),
                    title=case,
                    background_channel=not self.include_background,
                )

    def epoch_completed(self, engine: Engine) -> None:
        details = engine.state.metric_details.get(self.metric_name)
        cases = string_list_all_gather(self._cases) if torch.distributed.is_initialized() else list(self._cases)
        if not is_main_process():
            return
        if details is None:
            raise RuntimeError(f"no per-case details for {self.metric_name}: set save_details True on that metric.")
        scores = torch.as_tensor(details, dtype=torch.float64).reshape(len(cases), -1)
        names = self.class_names if self.include_background else self.class_names[1:]
        if scores.shape[1] != len(names):
            raise ValueError(
                f"{self.metric_name} has {scores.shape[1]} classes but metadata names {len(names)}: {names}"
            )
        class_mean, mean = class_means(scores)
        report = {
            "metric": "dice",
            "mean_dice": _nan_to_none(mean.item()),
            "class_dice": {n: _nan_to_none(v) for n, v in zip(names, class_mean.tolist(), strict=True)},
            "cases": [
                {
                    "case": case,
                    "mean_dice": _nan_to_none(torch.nanmean(row).item()),
                    "dice": {n: _nan_to_none(v) for n, v in zip(names, row.tolist(), strict=True)},
                }
                for case, row in zip(cases, scores, strict=True)
            ],
            "grid": "original label grid (the prediction inverted onto each image's own grid, as inference writes it)",
            "note": NOTE,
        }
        path = self.output_dir / "metrics.json"
        atomic_write(path, lambda f: f.write(json.dumps(report, indent=4)), mode="w")
        logger.info(f"wrote {path}: mean Dice {report['mean_dice']} over {len(cases)} cases")
