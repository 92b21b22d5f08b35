"""The recipe travels with the weights: saved by training, read by inference, evaluation and export."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import BTCV, MSD, SMALL, run_bundle
from monai.bundle import ConfigParser

from bundles.msd_tasks import make_task
from custom.networks.recipe import RecipeMismatchError, check_recipe

#: the sizes the ``trained`` fixture trained with (SMALL): inference must find them in model.pt
SIZES = ("feature_size", "roi_size", "pixdim")


def inference_parser(bundle: Path, ckpt_dir, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.update(
        {"bundle_root": str(bundle), "ckpt_dir": str(ckpt_dir), "device": "$torch.device('cpu')", **overrides}
    )
    return parser


def test_model_and_checkpoint_carry_the_recipe(trained):
    ckpt = Path(trained["ckpt_dir"])
    model = torch.load(ckpt / "model.pt", weights_only=True)
    assert set(model) == {"model", "recipe"}
    recipe = model["recipe"]
    meta = json.loads((BTCV / "configs" / "metadata.json").read_text(encoding="utf-8"))
    assert recipe["bundle"] == meta["name"] and recipe["version"] == meta["version"] and recipe["format"] == 2
    # one format for every bundle: the network's arguments and the task, under the configs' own names
    assert recipe["network"] == {"in_channels": 1, "out_channels": 14, "feature_size": 12, "legacy_merging": False}
    task = recipe["task"]  # legacy_merging above is read from the trained network itself
    assert task["name"] == "BTCV" and task["roi_size"] == [64, 64, 64] and task["pixdim"] == [3.0, 3.0, 3.0]
    assert task["intensity_range"] == [-175, 250] and task["in_channels"] == 1 and task["num_labels"] == 14
    assert task["class_names"][:2] == ["background", "spleen"] and len(task["class_names"]) == 14
    assert torch.load(ckpt / "checkpoint.pt", weights_only=True)["recipe"] == recipe


def test_inference_without_size_overrides_reproduces_the_trained_sizes(trained, input_dir, tmp_path):
    """Trained at feature_size 12, 64^3, 3 mm; inference with none of them given gives the same label map."""
    common = {"ckpt_dir": trained["ckpt_dir"], "input_dir": str(input_dir)}
    given = run_bundle("inference", ["configs/inference.json"], {**SMALL, **common, "output_dir": str(tmp_path / "a")})
    plain = {k: v for k, v in SMALL.items() if k not in SIZES}
    run_bundle("inference", ["configs/inference.json"], {**plain, **common, "output_dir": str(tmp_path / "b")})
    a = nib.load(tmp_path / "a" / "slab_seg.nii.gz")
    b = nib.load(tmp_path / "b" / "slab_seg.nii.gz")
    assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)) and np.allclose(a.affine, b.affine)
    assert "recipe of" in given.stdout + given.stderr


def test_contradicting_override_is_refused_naming_both_values(trained, input_dir, tmp_path):
    proc = run_bundle(
        "inference",
        ["configs/inference.json"],
        {**SMALL, "ckpt_dir": trained["ckpt_dir"], "input_dir": str(input_dir), "output_dir": str(tmp_path / "o")}
        | {"pixdim": [1.5, 1.5, 2.0]},
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and not (tmp_path / "o").exists()
    assert "pixdim=[3.0, 3.0, 3.0], the config says pixdim=[1.5, 1.5, 2.0]" in out
    assert "--accept_recipe_mismatch True" in out


def test_accepting_the_mismatch_deliberately_builds_the_config_s_values(trained, caplog):
    parser = inference_parser(BTCV, trained["ckpt_dir"], roi_size=[96, 96, 96], accept_recipe_mismatch=True)
    with caplog.at_level(logging.WARNING, logger="custom.networks.recipe"):
        parser.get_parsed_content("network_def")
    assert parser.get_parsed_content("inferer").roi_size == [96, 96, 96]
    assert "roi_size=[64, 64, 64], the config says roi_size=[96, 96, 96]" in caplog.text
    with pytest.raises(TypeError, match="--accept_recipe_mismatch True"):
        check_recipe({"roi_size": [64, 64, 64]}, {"roi_size": [96, 96, 96]}, accept_mismatch="true")


def test_weights_without_a_recipe_use_the_config_and_say_so(trained, tmp_path, caplog):
    """An older model.pt (a plain state_dict) still loads, with the config's sizes, and the log says so."""
    old = tmp_path / "models"
    old.mkdir()
    torch.save(torch.load(Path(trained["ckpt_dir"]) / "model.pt", weights_only=True)["model"], old / "model.pt")
    parser = inference_parser(BTCV, old, feature_size=12, roi_size=[64, 64, 64], pixdim=[3.0, 3.0, 3.0])
    with caplog.at_level(logging.INFO, logger="custom.networks.recipe"):
        net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(old / "model.pt", weights_only=True))
    assert "carries no recipe" in caplog.text and "using the config's values" in caplog.text
    # and a model.pt with its recipe loads whole into network_def (the export command loads it that way)
    net.load_state_dict(torch.load(Path(trained["ckpt_dir"]) / "model.pt", weights_only=True))


def test_evaluation_reads_the_recipe_and_refuses_a_contradiction(trained, tmp_path):
    configs = ["configs/train.json", "configs/evaluate.json"]
    paths = {k: trained[k] for k in ("dataset_dir", "ckpt_dir")} | {"output_dir": str(tmp_path / "eval")}
    proc = run_bundle("evaluating", configs, {**paths, "feature_size": 24, "num_workers": 0, "amp": False}, check=False)
    assert proc.returncode != 0
    assert "feature_size=12, the config says feature_size=24" in proc.stdout + proc.stderr


def test_check_recipe_compares_numbers_not_spellings():
    check_recipe(
        {"pixdim": [1.5, 1.5, 2.0], "legacy_merging": False}, {"pixdim": (1.5, 1.5, 2), "legacy_merging": False}
    )
    with pytest.raises(RecipeMismatchError, match="legacy_merging=False, the config says legacy_merging=True"):
        check_recipe({"legacy_merging": False}, {"legacy_merging": True})


def test_msd_model_deploys_from_the_bundle_and_its_weights_alone(tmp_path):
    """Trained on a task folder; inference and verify_net_in_out then run without it (as a serving machine)."""
    from ci.zoo_checks import check_net_in_out

    task = make_task(tmp_path, "Task05_Prostate", shape=(48, 48, 16), spacing=2.0, cases=2, tests=1)  # 2 channels
    bundle = tmp_path / "bundle"
    shutil.copytree(MSD, bundle, ignore=shutil.ignore_patterns("models", "outputs", "__pycache__"))
    small = {**SMALL, "roi_size": [64, 64, 32], "pixdim": [2.0, 2.0, 2.0], "num_samples": 1, "use_checkpoint": False}
    train = {"max_epochs": 1, "epoch_length": 1, "val_interval": 1, "num_folds": 2, "warmup_epochs": 0}
    paths = {"dataset_dir": str(task), "ckpt_dir": str(bundle / "models"), "output_dir": str(tmp_path / "out")}
    run_bundle("training", ["configs/train.json"], {**small, **train, **paths}, cwd=bundle)
    served = tmp_path / "served"
    shutil.copytree(task / "imagesTs", served)
    shutil.rmtree(task)  # the serving machine has no training folder

    plain = {k: v for k, v in small.items() if k not in ("feature_size", "roi_size", "pixdim")}
    out = tmp_path / "seg"
    run_bundle(
        "inference", ["configs/inference.json"], {**plain, "input_dir": str(served), "output_dir": str(out)}, cwd=bundle
    )
    [seg] = out.glob("*_seg.nii.gz")
    assert nib.load(seg).shape == (48, 48, 16)

    meta = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
    meta["network_data_format"]["inputs"]["image"].update(num_channels=2, spatial_shape=[64, 64, 32])
    meta["network_data_format"]["outputs"]["pred"].update(
        num_channels=3, spatial_shape=[64, 64, 32], channel_def={"0": "background", "1": "PZ", "2": "TZ"}
    )
    (bundle / "configs" / "metadata.json").write_text(json.dumps(meta, indent=4) + "\n", encoding="utf-8")
    assert "3" in check_net_in_out(bundle)  # 2 input channels, 3 classes: from model.pt, no --dataset_dir


#: recipes as the first recipe format wrote them (bundles 0.3.x / 0.4.0): BTCV flat, MSD with its task nested
BTCV_FORMAT_1 = {
    "format": 1,
    "bundle": "Swin UNETR BTCV segmentation",
    "version": "0.4.0",
    "in_channels": 1,
    "num_classes": 14,
    "feature_size": 12,
    "pixdim": [3.0, 3.0, 3.0],
    "roi_size": [64, 64, 64],
    "intensity_range": [-175, 250],
    "class_names": ["background"] + [f"organ {i}" for i in range(1, 14)],
    "loss": "DiceCELoss",
    "legacy_merging": False,
}
MSD_FORMAT_1 = {
    "format": 1,
    "bundle": "Swin UNETR MSD segmentation",
    "version": "0.4.0",
    "in_channels": 1,
    "num_classes": 2,
    "region_based": False,
    "feature_size": 12,
    "pixdim": [2.0, 2.0, 2.0],  # the training's override of the task table's 1.5 x 1.5 x 2.0
    "roi_size": [64, 64, 64],
    "class_names": ["background", "spleen"],
    "task": {
        "name": "Spleen",
        "modality": "CT",
        "pixdim": [1.5, 1.5, 2.0],
        "roi_size": [96, 96, 96],
        "window": [-57.0, 164.0],
        "num_samples": 2,
        "region_based": False,
        "ssl_weights_suit": True,
        "in_channels": 1,
        "class_names": ["background", "spleen"],
        "num_labels": 2,
        "max_iterations": 30000,
        "warmup_fraction": 0.01,
        "augmentation": {"crop": "pos_neg", "flip_prob": 0.2, "rotate90_prob": 0.2, "intensity_prob": 0.1},
        "out_channels": 2,
    },
    "loss": "DiceCELoss",
    "legacy_merging": False,
}


@pytest.mark.parametrize(
    "bundle, recipe, expected",
    [
        (BTCV, BTCV_FORMAT_1, {"pixdim": (3.0, 3.0, 3.0), "roi_size": (64, 64, 64), "intensity_range": (-175, 250)}),
        (MSD, MSD_FORMAT_1, {"pixdim": (2.0, 2.0, 2.0), "roi_size": (64, 64, 64), "intensity_range": (-57.0, 164.0)}),
        (BTCV, None, {"pixdim": (1.5, 1.5, 2.0), "roi_size": (96, 96, 96), "intensity_range": (-175.0, 250.0)}),
    ],
    ids=["btcv-format-1", "msd-format-1", "no-recipe"],
)
def test_weights_of_every_earlier_format_still_load(tmp_path, bundle, recipe, expected):
    """model.pt files written before the one recipe format (and files with none) run with what they were trained with."""
    from monai.networks.nets import SwinUNETR

    classes = 2 if bundle == MSD else 14
    feature_size = 12 if recipe else 48
    state = SwinUNETR(1, classes, feature_size=feature_size).state_dict()
    (tmp_path / "models").mkdir()
    torch.save({"model": state, "recipe": recipe} if recipe else state, tmp_path / "models" / "model.pt")
    parser = inference_parser(bundle, tmp_path / "models", dataset_dir=str(tmp_path / "no_task_folder"))
    task = parser.get_parsed_content("task")
    assert {k: tuple(getattr(task, k)) for k in expected} == expected
    assert task.out_channels == classes and parser.get_parsed_content("feature_size") == feature_size
    parser.get_parsed_content("network_def").load_state_dict(state)  # every tensor in place: the same network
    if bundle == MSD:  # the window of the first format's nested task (``window``) reaches the transform
        scale = [t for t in parser.get_parsed_content("preprocessing").transforms if hasattr(t, "scaler")][0]
        assert (scale.scaler.a_min, scale.scaler.a_max) == (-57.0, 164.0)
