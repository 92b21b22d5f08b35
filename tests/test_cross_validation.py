"""The paper's protocol through the real bundle commands: two folds, their summary, the leaderboard ensemble."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import SMALL, run_bundle

TRAIN, EVALUATE = "configs/train.json", "configs/evaluate.json"


@pytest.fixture(scope="module")
def folds(tmp_path_factory, sample_dataset) -> dict:
    """Two labelled cases (the real slab under two names), two folds trained for two steps each."""
    data = tmp_path_factory.mktemp("cv_data")
    cases = []
    for i in (1, 2):
        for sub, name in (("imagesTr", f"img000{i}"), ("labelsTr", f"label000{i}")):
            (data / sub).mkdir(exist_ok=True)
            src = sample_dataset / sub / f"{name[:-1]}1.nii.gz"
            os.symlink(src.resolve(), data / sub / f"{name}.nii.gz")
        cases.append({"image": f"imagesTr/img000{i}.nii.gz", "label": f"labelsTr/label000{i}.nii.gz"})
    # the published-split lists: with folds, both are pooled and split again
    (data / "dataset_0.json").write_text(json.dumps({"training": cases[:1], "validation": cases[1:]}), encoding="utf-8")
    work = tmp_path_factory.mktemp("cv_run")
    paths = {"dataset_dir": str(data), "ckpt_dir": str(work / "models"), "output_dir": str(work / "outputs")}
    train = {
        **paths,
        **SMALL,
        "num_folds": 2,
        "max_epochs": 1,
        "epoch_length": 2,
        "val_interval": 1,
        "num_samples": 1,
        "use_checkpoint": False,
        "warmup_epochs": 0,
    }
    for fold in (0, 1):
        run_bundle("training", [TRAIN], {**train, "fold": fold})
    runtime = {**paths, "num_folds": 2, "amp": False, "num_workers": 0}
    for fold in (0, 1):
        run_bundle("evaluating", [TRAIN, EVALUATE], {**runtime, "fold": fold})
    summary = run_bundle("cv_summary", [TRAIN, EVALUATE], runtime)
    return {"work": work, "paths": paths, "runtime": runtime, "summary": summary}


def test_each_fold_trains_in_its_own_folder_on_a_split_written_once(folds):
    models = folds["work"] / "models"
    for fold in (0, 1):
        assert (models / f"fold_{fold}" / "model.pt").is_file() and (
            models / f"fold_{fold}" / "checkpoint.pt"
        ).is_file()
    assert not (models / "model.pt").exists()  # no fold writes the un-folded place
    splits = json.loads((models / "splits_final.json").read_text(encoding="utf-8"))
    assert splits["num_folds"] == 2 and len(splits["splits"]) == 2
    held_out = [s["val"] for s in splits["splits"]]
    assert sorted(sum(held_out, [])) == ["imagesTr/img0001.nii.gz", "imagesTr/img0002.nii.gz"]
    for s in splits["splits"]:
        assert len(s["val"]) == 1 and set(s["train"]).isdisjoint(s["val"])


def test_each_fold_is_evaluated_on_its_held_out_case_and_the_summary_agrees(folds):
    out = folds["work"] / "outputs"
    splits = json.loads((folds["work"] / "models" / "splits_final.json").read_text(encoding="utf-8"))["splits"]
    summary = json.loads((out / "cv_summary.json").read_text(encoding="utf-8"))
    assert (out / "cv_summary.md").is_file() and (folds["work"] / "models" / "postprocessing.json").is_file()
    for fold in (0, 1):
        metrics = json.loads((out / f"fold_{fold}" / "metrics.json").read_text(encoding="utf-8"))
        case = Path(splits[fold]["val"][0]).name.replace(".nii.gz", "")
        assert [c["case"] for c in metrics["cases"]] == [case]  # the fold's held-out case only
        assert (out / f"fold_{fold}" / f"{case}_seg.nii.gz").is_file()
        # the summary recomputes Dice from the written label map; the evaluation's own Dice must agree
        liver_eval = metrics["class_dice"]["liver"]
        liver_cv = summary["folds"][str(fold)]["dice"]["liver"]["mean"]
        assert liver_cv == pytest.approx(liver_eval, abs=1e-4)
    pooled = summary["pooled"]
    assert pooled["cases"] == 2 and pooled["dice"]["liver"]["n"] == 2
    assert pooled["hd95"]["liver"]["mean"] > 0.0 and 0.0 <= pooled["nsd"]["liver"]["mean"] <= 1.0


def test_leaderboard_segments_with_the_fold_ensemble_and_mirroring(folds, sample_dir, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(sample_dir / "ct_full.nii.gz", src / "ct_full.nii.gz")
    proc = run_bundle(
        "inference",
        ["configs/inference.json", "configs/leaderboard.json"],
        {
            "ckpt_dir": folds["paths"]["ckpt_dir"],
            "num_folds": 2,
            "input_dir": str(src),
            "output_dir": str(tmp_path / "seg"),
            "tta": [[0]],  # one mirror: the full set of 8 is the leaderboard default, 8x the time
            "amp": False,
        },
    )
    seg = nib.load(tmp_path / "seg" / "ct_full_seg.nii.gz")
    image = nib.load(src / "ct_full.nii.gz")
    assert seg.shape == image.shape and np.allclose(seg.affine, image.affine)
    assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= set(range(14))
    log = proc.stdout + proc.stderr
    assert "fold_0/model.pt" in log and "fold_1/model.pt" in log
