"""The evaluation Dice rule (custom/segmentation/evaluation.py) and metrics.json (custom/segmentation/report.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.handlers import IgniteMetricHandler, from_engine
from monai.metrics import DiceMetric
from monai.transforms import Compose

from custom.segmentation.evaluation import CheckSameGridd, LabelDiceMetric, label_dice
from custom.segmentation.report import EvaluationReport


def one_hot(x: torch.Tensor, n: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(x[:, 0].long(), n).movedim(-1, 1).float()


def case(seed: int, n: int = 5, shape=(12, 10, 8)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (1, 1, *shape), generator=g), torch.randint(0, n, (1, 1, *shape), generator=g)


def test_present_classes_score_as_monai_and_false_positives_score_zero():
    pred, label = case(0)
    label[label == 3] = 0  # class 3: predicted, absent from the label
    pred[pred == 4], label[label == 4] = 0, 0  # class 4: absent from both
    ours = label_dice(pred, label, num_classes=5)[0]
    monai = DiceMetric(include_background=False, reduction="none")(one_hot(pred, 5), one_hot(label, 5))[0]
    assert torch.allclose(ours[:2].float(), monai[:2], atol=1e-6)  # classes 1, 2: the plain Dice
    assert math.isnan(monai[2]) and ours[2] == 0.0  # MONAI's ignore_empty hides the false positive; we score it 0
    assert math.isnan(ours[3])  # absent from both: nothing to score
    assert torch.allclose(label_dice(one_hot(pred, 5), one_hot(label, 5))[0], ours, equal_nan=True)  # channel form


def test_region_channels_and_background():
    pred = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]]).view(1, 2, 4)
    label = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]).view(1, 2, 4)
    assert label_dice(pred, label, include_background=True)[0].tolist()[0] == pytest.approx(2 / 3)
    assert math.isnan(label_dice(pred, label, include_background=True)[0, 1])


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="shape"):
        label_dice(torch.zeros(1, 1, 4), torch.zeros(1, 1, 5), num_classes=3)
    with pytest.raises(ValueError, match="label holds class 7"):
        label_dice(torch.zeros(1, 1, 4), torch.full((1, 1, 4), 7), num_classes=3)


def test_label_on_another_grid_is_refused_with_both_files():
    pred = MetaTensor(torch.zeros(1, 4, 4, 4), affine=torch.eye(4), meta={"filename_or_obj": "/d/img.nii.gz"})
    label = MetaTensor(torch.zeros(1, 4, 4, 4), affine=2 * torch.eye(4), meta={"filename_or_obj": "/d/lab.nii.gz"})
    CheckSameGridd("pred")({"pred": pred, "label": pred.clone()})
    with pytest.raises(ValueError, match=r"/d/lab.nii.gz.*/d/img.nii.gz"):
        CheckSameGridd("pred")({"pred": pred, "label": label})


def test_metrics_json_scores_false_positives_zero_and_absent_null(tmp_path):
    from ignite.engine import Engine

    names = ["background", "a", "b", "c", "d"]
    cases = []
    for seed in (1, 2):
        pred, label = case(seed)
        label[label == 3] = 0  # c: a false positive in both cases
        pred[pred == 4], label[label == 4] = 0, 0  # d: absent everywhere
        meta = {"filename_or_obj": f"/data/case{seed}.nii.gz"}
        cases.append({"image": MetaTensor(torch.rand(1, 12, 10, 8), meta=meta), "label": label[0], "pred": pred[0]})
    engine = Engine(lambda e, batch: [cases[batch]])
    IgniteMetricHandler(
        metric_fn=LabelDiceMetric(num_classes=5), output_transform=from_engine(["pred", "label"]), save_details=True
    ).attach(engine, "val_mean_dice")
    EvaluationReport(str(tmp_path), names, save_png=False).attach(engine)
    engine.run([0, 1], max_epochs=1)

    metrics = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert [c["case"] for c in metrics["cases"]] == ["case1", "case2"]
    assert metrics["class_dice"]["c"] == 0.0 and metrics["class_dice"]["d"] is None
    per_case = np.array([[c["dice"][n] for n in ("a", "b")] for c in metrics["cases"]])
    expected = [label_dice(c["pred"][None], c["label"][None], num_classes=5)[0, :2].tolist() for c in cases]
    assert np.allclose(per_case, expected, atol=1e-6)
    assert metrics["mean_dice"] == pytest.approx((per_case.mean(0).sum() + 0.0) / 3, abs=1e-6)  # d left out
    assert engine.state.metrics["val_mean_dice"] == pytest.approx(metrics["mean_dice"], abs=1e-6)
    assert "predicted scores 0" in metrics["note"]


@pytest.mark.parametrize("region_based", [False, True], ids=["classes", "regions"])
def test_evaluation_repeats_the_inference_steps(region_based):
    """Evaluation runs inference's image steps (no foreground crop) and its post-processing up to the
    inversion, so that the Dice it reports is that of the label map inference writes. Both configs of both
    bundles build them with the same builders of the shared pipeline, from the same task."""
    from pathlib import Path

    from monai.transforms import EnsureTyped

    from custom.segmentation import pipeline
    from custom.segmentation.task import TaskRecipe

    def steps(transforms) -> list:
        kept = [t for t in transforms if not isinstance(t, EnsureTyped)]  # device and type moves only
        return [(type(t).__name__, getattr(t, "keys", None)) for t in kept]

    task = TaskRecipe(
        name="T",
        modality="CT",
        pixdim=(2.0, 2.0, 2.0),
        roi_size=(64, 64, 64),
        intensity_range=(-175.0, 250.0),
        region_based=region_based,
    )
    evaluate = steps(pipeline.load_transforms(task, "evaluate"))
    assert [n for n, _ in evaluate] == [n for n, _ in steps(pipeline.load_transforms(task, "infer"))]
    assert [k for n, k in evaluate if n != "LoadImaged"] == [("image",)] * 3  # only the image is resampled
    pre = Compose(pipeline.load_transforms(task, "evaluate"))
    post = [type(t).__name__ for t in pipeline.evaluation_postprocessing(task, pre).transforms]
    written = [type(t).__name__ for t in pipeline.inference_postprocessing(task, pre, "/tmp/o", "/tmp/i").transforms]
    assert written[-1] == "SaveImaged" and post[: len(written) - 1] == written[:-1]
    for bundle in ("swin_unetr_btcv", "swin_unetr_msd"):
        configs = Path(__file__).resolve().parents[1] / bundle / "configs"
        evaluate_json = json.loads((configs / "evaluate.json").read_text(encoding="utf-8"))
        inference_json = json.loads((configs / "inference.json").read_text(encoding="utf-8"))
        assert evaluate_json["validate#preprocessing"]["transforms"]["stage"] == "evaluate"
        assert inference_json["preprocessing"]["transforms"]["stage"] == "infer"
        assert evaluate_json["validate#postprocessing"]["_target_"].endswith("pipeline.evaluation_postprocessing")
        assert inference_json["postprocessing"]["_target_"].endswith("pipeline.inference_postprocessing")
