"""The MSD bundle: the task table for all ten tasks, and four tasks end to end through `monai.bundle run`."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO, run_bundle
from msd_tasks import OFFICIAL, make_task

from custom.msd import BRATS_REGIONS, TASK_RECIPES, TaskError, load_task, metadata_for_task, msd_datalist

MSD = REPO / "swin_unetr_msd"
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
    assert (recipe.window is not None) == (recipe.modality == "CT") == recipe.ssl_weights_suit


def test_unknown_task_gets_defaults_from_its_data(tmp_path):
    task = make_task(tmp_path, "Task09_Spleen", spacing=2.5, cases=2, tests=0)
    renamed = task.rename(tmp_path / "Task11_Kidney")
    meta = json.loads((renamed / "dataset.json").read_text())
    meta["name"] = "Kidney"
    (renamed / "dataset.json").write_text(json.dumps(meta))
    recipe = load_task(renamed)
    assert recipe.name == "Kidney" and recipe.pixdim == (2.5, 2.5, 2.5) and recipe.window is not None


@pytest.mark.parametrize("drop", ["modality", "labels", "training"])
def test_dataset_json_without_required_fields_is_named(tmp_path, drop):
    task = make_task(tmp_path, "Task09_Spleen", cases=1, tests=0)
    meta = json.loads((task / "dataset.json").read_text())
    del meta[drop]
    (task / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(TaskError, match=rf"dataset.json: missing \[{drop!r}\]"):
        load_task(task)


def test_validation_fold_is_disjoint_and_covers_every_case(tmp_path):
    task = make_task(tmp_path, "Task09_Spleen", cases=7, tests=1)
    train, val = msd_datalist(task, "training"), msd_datalist(task, "validation")
    assert len(val) == 2 and len(train) == 5 and not {d["image"] for d in train} & {d["image"] for d in val}
    assert all(Path(d["image"]).is_file() and "/./" not in d["image"] for d in train + val)
    assert len(msd_datalist(task, "test")) == 1


def test_metadata_follows_the_chosen_task(tmp_path):
    recipe = load_task(make_task(tmp_path, "Task05_Prostate", cases=1, tests=0))
    meta = metadata_for_task(json.loads((MSD / "configs" / "metadata.json").read_text()), recipe)
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
    metrics = json.loads((tmp_path / "outputs" / "metrics.json").read_text())
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
    assert values <= set(range(len(json.loads((task / "dataset.json").read_text())["labels"])))  # MSD label values


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
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())

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
