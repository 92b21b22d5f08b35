"""The MSD bundle: the task table for all ten tasks, and four tasks end to end through `monai.bundle run`."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import MSD, run_bundle
from monai.bundle import ConfigParser

from bundles.msd_tasks import OFFICIAL, make_task
from custom.segmentation.msd import (
    BRATS_REGIONS,
    MSD_TRAINING_CASES,
    TASK_RECIPES,
    TaskError,
    default_max_iterations,
    load_task,
    metadata_for_task,
    msd_datalist,
)
from custom.segmentation.task import Augmentation, task_loss

#: channels and classes (without background) of the ten tasks, from the issue's table
EXPECTED = {
    "Task01_BrainTumour": (4, 3),
    "Task02_Heart": (1, 1),
    "Task03_Liver": (1, 2),
    "Task04_Hippocampus": (1, 2),
    "Task05_Prostate": (2, 2),
    "Task06_Lung": (1, 1),
    "Task07_Pancreas": (1, 2),
    "Task08_HepaticVessel": (1, 2),
    "Task09_Spleen": (1, 1),
    "Task10_Colon": (1, 1),
}


@pytest.mark.parametrize("folder", sorted(OFFICIAL))
def test_task_table_is_consistent_for_all_ten(tmp_path, folder):
    task = make_task(tmp_path, folder, cases=1, tests=0)
    recipe = load_task(task)
    channels, classes = EXPECTED[folder]
    assert recipe.name in TASK_RECIPES and recipe.in_channels == channels
    assert all(s % 32 == 0 for s in recipe.roi_size)
    if folder == "Task01_BrainTumour":
        assert recipe.region_based and recipe.class_names == tuple(BRATS_REGIONS) and recipe.out_channels == 3
    else:
        assert not recipe.region_based and recipe.out_channels == classes + 1 and recipe.class_names[0] == "background"
    assert (recipe.intensity_range is not None) == (recipe.modality == "CT") == recipe.ssl_weights_suit


def test_unknown_task_gets_defaults_from_its_data(tmp_path):
    task = make_task(tmp_path, "Task09_Spleen", spacing=2.5, cases=2, tests=0)
    renamed = task.rename(tmp_path / "Task11_Kidney")
    meta = json.loads((renamed / "dataset.json").read_text(encoding="utf-8"))
    meta["name"] = "Kidney"
    (renamed / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    recipe = load_task(renamed)
    assert recipe.name == "Kidney" and recipe.pixdim == (2.5, 2.5, 2.5) and recipe.intensity_range is not None
    assert recipe.max_iterations == default_max_iterations(2) == 30_000  # the tasks' rule, from its case count


@pytest.mark.parametrize("drop", ["modality", "labels", "training"])
def test_dataset_json_without_required_fields_is_named(tmp_path, drop):
    task = make_task(tmp_path, "Task09_Spleen", cases=1, tests=0)
    meta = json.loads((task / "dataset.json").read_text(encoding="utf-8"))
    del meta[drop]
    (task / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(TaskError, match=rf"dataset.json: missing \[{drop!r}\]"):
        load_task(task)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'["./imagesTr/spleen_000.nii.gz"]', "expected a JSON object with a 'training' list, got list"),
        (b"\xff\xfe not text", "not valid JSON"),
    ],
)
def test_dataset_json_that_is_not_an_object_is_named(tmp_path, content, message):
    """The one datalist reader (``custom.data.inputs.read_datalist``): what it is, not which keys it lacks."""
    task = make_task(tmp_path, "Task09_Spleen", cases=1, tests=0)
    (task / "dataset.json").write_bytes(content)
    with pytest.raises(TaskError, match=message) as err:
        load_task(task)
    assert str(task / "dataset.json") in str(err.value)


def test_validation_fold_is_disjoint_and_covers_every_case(tmp_path):
    task = make_task(tmp_path, "Task09_Spleen", cases=7, tests=1)
    train, val = msd_datalist(task, "training"), msd_datalist(task, "validation")
    assert len(val) == 2 and len(train) == 5 and not {d["image"] for d in train} & {d["image"] for d in val}
    assert all(Path(d["image"]).is_file() and "/./" not in d["image"] for d in train + val)
    assert len(msd_datalist(task, "test")) == 1


def test_metadata_follows_the_chosen_task(tmp_path):
    recipe = load_task(make_task(tmp_path, "Task05_Prostate", cases=1, tests=0))
    meta = metadata_for_task(json.loads((MSD / "configs" / "metadata.json").read_text(encoding="utf-8")), recipe)
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 2
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "PZ", "2": "TZ"}


def test_images_without_the_declared_channels_fail_with_a_named_error(tmp_path):
    task = make_task(tmp_path, "Task05_Prostate", cases=2, tests=0, channels=1)  # json says T2 + ADC
    proc = run_bundle("check_data", ["configs/train.json"], {"dataset_dir": str(task)}, cwd=MSD, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "prostate_000.nii.gz: image has 1 channel(s)" in text and "declares 2" in text


SMALL_MSD = {
    "feature_size": 12,
    "amp": False,
    "num_workers": 0,
    "use_checkpoint": False,
    "sw_batch_size": 2,
    "overlap": 0.25,
    "num_samples": 1,
}
#: task -> (volume shape, voxel size, overrides of the recipe that keep the test small)
CASES = {
    "Task09_Spleen": ((40, 40, 24), 3.0, {"roi_size": [64, 64, 64], "pixdim": [3.0, 3.0, 3.0]}),
    "Task05_Prostate": ((48, 48, 16), 2.0, {"roi_size": [64, 64, 32], "pixdim": [2.0, 2.0, 2.0]}),
    "Task01_BrainTumour": ((40, 40, 30), 4.0, {"roi_size": [64, 64, 64], "pixdim": [4.0, 4.0, 4.0]}),
    "Task04_Hippocampus": ((34, 50, 35), 1.0, {}),  # the task's own recipe: 1 mm, ROI 64^3, volumes padded
}


@pytest.mark.parametrize("folder", sorted(CASES))
def test_train_evaluate_infer(tmp_path, folder):
    shape, spacing, recipe_overrides = CASES[folder]
    task = make_task(tmp_path, folder, shape=shape, spacing=spacing, cases=3, tests=1)
    recipe = load_task(task)
    args = {
        **SMALL_MSD,
        **recipe_overrides,
        "dataset_dir": str(task),
        "ckpt_dir": str(tmp_path / "models"),
        "output_dir": str(tmp_path / "outputs"),
    }
    train = run_bundle(
        "training", ["configs/train.json"], {**args, "max_epochs": 1, "epoch_length": 2, "val_interval": 1}, cwd=MSD
    )
    assert "val_mean_dice" in train.stdout and (tmp_path / "models" / "model.pt").is_file()

    run_bundle("evaluating", ["configs/train.json", "configs/evaluate.json"], args, cwd=MSD)
    metrics = json.loads((tmp_path / "outputs" / "metrics.json").read_text(encoding="utf-8"))
    names = list(recipe.class_names) if recipe.region_based else list(recipe.class_names[1:])
    assert list(metrics["class_dice"]) == names
    assert len(metrics["cases"]) == 1  # fold 0 of 3 cases: the first one

    out = tmp_path / "seg"
    run_bundle(
        "inference",
        ["configs/inference.json"],
        {**args, "input_dir": str(task / "imagesTs"), "output_dir": str(out)},
        cwd=MSD,
    )
    [seg_file] = out.glob("*_seg.nii.gz")
    seg, img = nib.load(seg_file), nib.load(next((task / "imagesTs").glob("*.nii.gz")))
    assert seg.shape == img.shape[:3] and np.allclose(seg.affine, img.affine, atol=1e-4)  # the input's own grid
    values = set(np.unique(np.asarray(seg.dataobj)).tolist())
    assert values <= set(
        range(len(json.loads((task / "dataset.json").read_text(encoding="utf-8"))["labels"]))
    )  # MSD label values


# --- the recipe the bundle trains with: loss, length and schedule, augmentation, label resampling ---


def parse_train(tmp_path, task: Path, **overrides) -> ConfigParser:
    """``configs/train.json`` for ``task`` as ``monai.bundle run`` parses it, with small sizes (nothing runs)."""
    parser = ConfigParser()
    parser.read_config(str(MSD / "configs" / "train.json"))
    parser.update(
        {
            "bundle_root": str(MSD),
            "dataset_dir": str(task),
            "ckpt_dir": str(tmp_path / "models"),
            "output_dir": str(tmp_path / "outputs"),
            "feature_size": 12,
            "cache_rate": 0.0,
            "num_workers": 0,
            **overrides,
        }
    )
    return parser


def brats_loss_by_hand(logits: torch.Tensor, regions: torch.Tensor) -> float:
    """Mean over (batch, region) of 1 - (2 sum(p g) + 1e-5) / (sum p + sum g + 1e-5), p = sigmoid(logits)."""
    p = torch.sigmoid(logits).flatten(2)
    g = regions.flatten(2)
    dice = (2 * (p * g).sum(-1) + 1e-5) / (p.sum(-1) + g.sum(-1) + 1e-5)
    return float((1 - dice).mean())


#: one case, three regions (TC, WT, ET) over four voxels: nested as MSDBrainTumourRegionsd makes them
TINY_REGIONS = torch.tensor([[[0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]]]).view(1, 3, 4, 1, 1)
TINY_LOGITS = torch.tensor([[[-2.0, 0.5, 1.5, 3.0], [-1.0, 2.0, 0.0, 4.0], [-3.0, -0.5, 1.0, 2.5]]]).view(1, 3, 4, 1, 1)


def test_region_loss_changes_when_every_logit_shifts(tmp_path):
    loss = task_loss(load_task(make_task(tmp_path, "Task01_BrainTumour", cases=1, tests=0)))
    before = float(loss(TINY_LOGITS, TINY_REGIONS))
    after = float(loss(TINY_LOGITS - 5.0, TINY_REGIONS))
    assert after > before + 0.1  # lower sigmoid probabilities inside the regions cost more


def test_region_loss_matches_a_hand_computation(tmp_path):
    loss = task_loss(load_task(make_task(tmp_path, "Task01_BrainTumour", cases=1, tests=0)))
    assert float(loss(TINY_LOGITS, TINY_REGIONS)) == pytest.approx(brats_loss_by_hand(TINY_LOGITS, TINY_REGIONS), 1e-6)


def test_train_json_trains_braintumour_regions_with_dice_on_sigmoids(tmp_path):
    """The loss the bundle's config builds: a confident, correct prediction of nested regions costs ~0.

    The former ``DiceCELoss(sigmoid=True)`` added a softmax cross entropy over the three region channels,
    which costs about ln 3 on every voxel inside all three regions, however right the sigmoids are.
    """
    task = make_task(tmp_path, "Task01_BrainTumour", cases=2, tests=0)
    loss = parse_train(tmp_path, task).get_parsed_content("loss")
    assert float(loss(TINY_LOGITS, TINY_REGIONS)) == pytest.approx(brats_loss_by_hand(TINY_LOGITS, TINY_REGIONS), 1e-6)
    confident = 20.0 * (2 * TINY_REGIONS - 1)
    assert float(loss(confident, TINY_REGIONS)) < 1e-3


def test_train_json_keeps_softmax_dice_ce_for_exclusive_classes(tmp_path):
    task = make_task(tmp_path, "Task09_Spleen", cases=2, tests=0)
    loss = parse_train(tmp_path, task).get_parsed_content("loss")
    label = torch.tensor([0, 1, 1, 0]).view(1, 1, 4, 1, 1)
    logits = torch.tensor([[2.0, -1.0, 0.0, 1.0], [-2.0, 1.0, 0.5, 0.0]]).view(1, 2, 4, 1, 1)
    p = torch.softmax(logits, 1).flatten(2)
    g = torch.nn.functional.one_hot(label.flatten(), 2).T[None].float()
    dice = 1 - (2 * (p * g).sum(-1) + 1e-5) / (p.sum(-1) + g.sum(-1) + 1e-5)
    ce = torch.nn.functional.cross_entropy(logits, label[:, 0])
    assert float(loss(logits, label)) == pytest.approx(float(dice.mean() + ce), 1e-6)


def test_an_unknown_crop_is_refused_by_name():
    with pytest.raises(ValueError, match="Augmentation.crop must be 'pos_neg' or 'random', got 'centre'"):
        Augmentation(crop="centre")


def test_every_task_has_a_finite_stated_training_length():
    docs = (MSD / "docs" / "README.md").read_text(encoding="utf-8")
    for name, recipe in TASK_RECIPES.items():
        assert 0 < recipe.max_iterations < 200_000, name
        assert recipe.max_iterations == default_max_iterations(MSD_TRAINING_CASES[name]), name  # the documented rule
        assert f"{recipe.max_iterations:,}" in docs, f"{name}: {recipe.max_iterations:,} iterations not in the docs"
        assert 0 <= recipe.warmup_fraction < 0.5, name


@pytest.mark.parametrize("overrides", [{}, {"max_iterations": 1000}, {"max_epochs": 3}])
def test_learning_rate_schedule_ends_where_training_ends(tmp_path, overrides):
    task = make_task(tmp_path, "Task09_Spleen", cases=8, tests=0)  # fold 0: 6 training cases, batch 1
    parser = parse_train(tmp_path, task, **overrides)
    trainer, scheduler = parser.get_parsed_content("train#trainer"), parser.get_parsed_content("lr_scheduler")
    steps = trainer.state.max_epochs * trainer.state.epoch_length
    assert trainer.state.epoch_length == 6 and scheduler.t_total == steps
    if "max_epochs" in overrides:
        assert trainer.state.max_epochs == 3
    else:
        wanted = overrides.get("max_iterations", TASK_RECIPES["Spleen"].max_iterations)
        assert wanted <= steps < wanted + 6  # whole epochs: at most one epoch more than asked
    assert scheduler.warmup_steps == round(0.01 * steps)
    assert scheduler.lr_lambdas[0](steps) == pytest.approx(0.0, abs=1e-9)  # the cosine reaches 0 at the last step
    assert scheduler.lr_lambdas[0](steps // 2) > 0.4


def test_braintumour_augments_as_the_research_brats21_code(tmp_path):
    brats = parse_train(tmp_path, make_task(tmp_path, "Task01_BrainTumour", cases=2, tests=0))
    crop, *flips, rot90, scale, shift = brats.get_parsed_content("train#random_transforms")
    assert type(crop).__name__ == "RandSpatialCropSamplesd" and list(crop.cropper.cropper.roi_size) == [128, 128, 128]
    assert [type(f).__name__ for f in flips] == ["RandFlipd"] * 3 and [f.prob for f in flips] == [0.5] * 3
    assert rot90.prob == 0.0 and scale.prob == 1.0 and shift.prob == 1.0
    assert brats.get_parsed_content("num_samples") == 1

    spleen = parse_train(tmp_path / "spleen", make_task(tmp_path, "Task09_Spleen", cases=2, tests=0))
    crop, drop, *flips, rot90, scale, shift = spleen.get_parsed_content("train#random_transforms")
    # the labelled-voxel crop draws from the indices the cache holds (as BTCV), then drops them
    assert type(crop).__name__ == "RandCropByPosNegLabeld" and crop.fg_indices_key == "label_fg_indices"
    assert type(drop).__name__ == "DeleteItemsd" and sorted(drop.keys) == ["label_bg_indices", "label_fg_indices"]
    assert [f.prob for f in flips] == [0.2] * 3 and rot90.prob == 0.2 and scale.prob == shift.prob == 0.1


def test_region_labels_stay_binary_when_pixdim_resamples(tmp_path):
    task = make_task(tmp_path, "Task01_BrainTumour", shape=(40, 40, 30), spacing=4.0, cases=2, tests=0)
    parser = parse_train(tmp_path, task, pixdim=[3.0, 3.0, 3.0], roi_size=[64, 64, 64])
    case = msd_datalist(task, "validation")[0]
    label = parser.get_parsed_content("validate#preprocessing")(case)["label"]
    assert label.shape[0] == 3 and np.allclose(label.pixdim, [3.0, 3.0, 3.0])
    assert set(torch.unique(label).tolist()) == {0.0, 1.0}
    assert [int(label[i].sum()) > 0 for i in range(3)] == [True, True, True]


def test_brain_tumour_evaluation_scores_the_written_label_map_by_region(tmp_path):
    """metrics.json holds the region Dice of the MSD label map `run inference` writes for the validation image,
    against the label file on its own grid (both turned into TC/WT/ET); absent from both -> null, else 2|P&L|/(|P|+|L|).
    """
    folder = "Task01_BrainTumour"
    shape, spacing, recipe_overrides = CASES[folder]
    task = make_task(tmp_path, folder, shape=shape, spacing=spacing, cases=3, tests=1)
    args = {**SMALL_MSD, **recipe_overrides, "dataset_dir": str(task), "ckpt_dir": str(tmp_path / "models")}
    run_bundle(
        "training", ["configs/train.json"], {**args, "max_epochs": 1, "epoch_length": 2, "val_interval": 1}, cwd=MSD
    )
    run_bundle(
        "evaluating",
        ["configs/train.json", "configs/evaluate.json"],
        {**args, "output_dir": str(tmp_path / "e")},
        cwd=MSD,
    )
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text(encoding="utf-8"))

    [item] = msd_datalist(task, "validation", num_folds=5, fold=0)  # the bundle's default folds
    (tmp_path / "in").mkdir()
    image = Path(item["image"])
    (tmp_path / "in" / image.name).symlink_to(image)
    inference_args = {**args, "input_dir": str(tmp_path / "in"), "output_dir": str(tmp_path / "seg")}
    run_bundle("inference", ["configs/inference.json"], inference_args, cwd=MSD)
    [seg_file] = (tmp_path / "seg").glob("*_seg.nii.gz")
    seg = np.rint(np.asarray(nib.load(seg_file).dataobj)).astype(int)
    label = np.rint(np.asarray(nib.load(item["label"]).dataobj)).astype(int)
    assert seg.shape == label.shape
    got = metrics["cases"][0]["dice"]
    for name, values in zip(load_task(task).class_names, BRATS_REGIONS.values(), strict=True):
        p, g = np.isin(seg, list(values)), np.isin(label, list(values))
        total = int(p.sum() + g.sum())
        assert (
            (got[name] is None) if total == 0 else got[name] == pytest.approx(2 * int((p & g).sum()) / total, abs=1e-6)
        )
