"""The BTCV bundle through its real commands (`python -m monai.bundle run ...`) on the real CT sample."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import (
    BTCV,
    REPO,
    SMALL,
    TORCHRUN,
    btcv_overrides,
    custom_of_child,
    run_bundle,
    sha256,
    tensorboard_scalars,
    write_dicom_series,
)
from monai.networks.nets import SwinUNETR
from PIL import Image

from ci.zoo_checks import check_torchscript

ORGANS = [
    "spleen",
    "right kidney",
    "left kidney",
    "gallbladder",
    "esophagus",
    "liver",
    "stomach",
    "aorta",
    "inferior vena cava",
    "portal and splenic veins",
    "pancreas",
    "right adrenal gland",
    "left adrenal gland",
]


def small_net() -> SwinUNETR:
    return SwinUNETR(in_channels=1, out_channels=14, feature_size=12)


def test_training_writes_best_model_and_resumable_checkpoint(trained):
    ckpt = Path(trained["ckpt_dir"])
    net = small_net()
    net.load_state_dict(torch.load(ckpt / "model.pt", weights_only=True)["model"])  # a complete state_dict
    state = torch.load(ckpt / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "trainer", "validator"} <= set(state)
    assert state["trainer"]["iteration"] == 2 and state["trainer"]["max_epochs"] == 2
    assert state["lr_scheduler"]["last_epoch"] == 2
    assert 0.0 <= state["validator"]["best_metric"] <= 1.0
    scalars = tensorboard_scalars(Path(trained["output_dir"]))  # TensorBoard: the loss per step, Dice per epoch
    assert [step for step, _ in scalars["train_loss"]] == [1, 2] and all(
        math.isfinite(v) for _, v in scalars["train_loss"]
    )
    assert [step for step, _ in scalars["val_mean_dice"]] == [1, 2]
    assert max(v for _, v in scalars["val_mean_dice"]) == pytest.approx(state["validator"]["best_metric"], abs=1e-6)
    assert "val_mean_dice" in trained["proc"].stdout


def test_training_cache_holds_indices_and_crops_drop_them(sample_dataset):
    # the speed default: foreground indices computed once and cached with the volume (label uint8,
    # indices int32), so crops never rescan it; the index arrays must not travel into the batch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BTCV / "configs" / "train.json"))
    parser.update({"bundle_root": str(BTCV), "dataset_dir": str(sample_dataset), **SMALL, "num_workers": 0})
    dataset = parser.get_parsed_content("train#dataset")
    cached = dataset._cache[0]
    assert cached["label"].dtype == torch.uint8 and cached["label_fg_indices"].dtype == torch.int32
    label = cached["label"].flatten()
    assert torch.equal(
        label[cached["label_fg_indices"].long()] > 0, torch.ones_like(cached["label_fg_indices"], dtype=bool)
    )
    assert len(cached["label_fg_indices"]) == int((label > 0).sum())
    crops = dataset[0]
    assert len(crops) == parser.get_parsed_content("num_samples")
    for crop in crops:
        assert set(crop) >= {"image", "label"} and not any("indices" in k for k in crop)
        assert tuple(crop["image"].shape[1:]) == tuple(SMALL["roi_size"])
    batch = next(iter(parser.get_parsed_content("train#dataloader")))
    assert batch["image"].shape[0] == parser.get_parsed_content("num_samples")


@pytest.fixture()
def run_copy(trained, tmp_path) -> dict:
    """The trained run's checkpoints copied, so that a test may change them."""
    shutil.copytree(trained["ckpt_dir"], tmp_path / "models")
    return {**trained["overrides"], "ckpt_dir": str(tmp_path / "models"), "output_dir": str(tmp_path / "outputs")}


def test_finished_run_is_refused_not_restarted(run_copy):
    before = sha256(Path(run_copy["ckpt_dir"]) / "checkpoint.pt")
    proc = run_bundle("training", ["configs/train.json"], run_copy, check=False)
    assert proc.returncode != 0
    assert "already finished 2 of max_epochs=2" in proc.stdout + proc.stderr
    assert sha256(Path(run_copy["ckpt_dir"]) / "checkpoint.pt") == before


def test_resume_continues_then_fresh_start_keeps_old_files(run_copy):
    ckpt = Path(run_copy["ckpt_dir"])
    proc = run_bundle("training", ["configs/train.json"], {**run_copy, "max_epochs": 3})
    assert "resumed from" in proc.stdout and "epoch 2, iteration 2" in proc.stdout
    state = torch.load(ckpt / "checkpoint.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 3 and state["lr_scheduler"]["last_epoch"] == 3

    old, old_model = sha256(ckpt / "checkpoint.pt"), sha256(ckpt / "model.pt")
    run_bundle("training", ["configs/train.json"], {**run_copy, "max_epochs": 1, "resume": False})
    backups = list(ckpt.glob("checkpoint.pt.*.bak"))
    assert len(backups) == 1 and sha256(backups[0]) == old
    model_backups = list(ckpt.glob("model.pt.*.bak"))
    assert len(model_backups) == 1 and sha256(model_backups[0]) == old_model  # the user's best weights, kept
    assert torch.load(ckpt / "checkpoint.pt", weights_only=True)["trainer"]["iteration"] == 1


def test_string_false_is_refused(run_copy):
    proc = run_bundle("training", ["configs/train.json"], {**run_copy, "max_epochs": 3, "resume": "false"}, check=False)
    assert proc.returncode != 0 and "--resume False" in proc.stdout + proc.stderr


def test_evaluate_writes_dice_by_organ_and_pictures(trained, tmp_path):
    out = tmp_path / "eval"
    run_bundle(
        "evaluating", ["configs/train.json", "configs/evaluate.json"], {**trained["overrides"], "output_dir": str(out)}
    )
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert list(metrics["class_dice"]) == ORGANS
    scored = [v for v in metrics["class_dice"].values() if v is not None]
    assert len(scored) >= 12 and all(0.0 <= v <= 1.0 for v in scored)  # 12 organs in the slab, + false positives
    assert metrics["mean_dice"] == pytest.approx(sum(scored) / len(scored), abs=1e-6)
    assert "predicted scores 0" in metrics["note"] and "absent from both" in metrics["note"]
    assert [c["case"] for c in metrics["cases"]] == ["img0001"]
    png = Image.open(out / "img0001.png")
    # the evaluation preview: three views of the prediction above the same of the label, and a legend
    assert png.mode == "RGB" and png.width >= 1200 and png.height > png.width / 3


def test_evaluate_reports_the_dice_of_the_written_label_map_on_the_label_grid(trained, sample_dataset, tmp_path):
    """metrics.json is the Dice of the label map `run inference` writes for the same weights and image, scored
    against the original label on its own grid; an organ the label lacks but the prediction holds scores 0
    (a false positive), one absent from both is null."""
    image = (sample_dataset / "imagesTr/img0001.nii.gz").resolve()
    (tmp_path / "in").mkdir()
    os.symlink(image, tmp_path / "in/img0001.nii.gz")
    overrides = {**SMALL, "ckpt_dir": trained["ckpt_dir"], "input_dir": str(tmp_path / "in")}
    run_bundle("inference", ["configs/inference.json"], {**overrides, "output_dir": str(tmp_path / "seg")})
    seg = np.asarray(nib.load(tmp_path / "seg/img0001_seg.nii.gz").dataobj).astype(np.int64)

    # the label with the most predicted organ taken out: that organ is then a false positive by construction
    original = nib.load(sample_dataset / "labelsTr/label0001.nii.gz")
    label = np.rint(np.asarray(original.dataobj)).astype(np.int64)
    false_positive = max(range(1, 14), key=lambda c: int((seg == c).sum()))
    assert (seg == false_positive).any(), "the tiny model predicts no organ at all"
    label[label == false_positive] = 0
    data = tmp_path / "data"
    for sub in ("imagesTr", "labelsTr"):
        (data / sub).mkdir(parents=True)
    os.symlink(image, data / "imagesTr/img0001.nii.gz")
    nib.save(nib.Nifti1Image(label.astype(np.uint8), original.affine), data / "labelsTr/label0001.nii.gz")
    case = [{"image": "imagesTr/img0001.nii.gz", "label": "labelsTr/label0001.nii.gz"}]
    (data / "dataset_0.json").write_text(json.dumps({"training": case, "validation": case}), encoding="utf-8")
    out = tmp_path / "eval"
    run_bundle(
        "evaluating",
        ["configs/train.json", "configs/evaluate.json"],
        {**trained["overrides"], "dataset_dir": str(data), "output_dir": str(out)},
    )
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))

    assert seg.shape == label.shape  # the written label map lies on the label's own grid
    expected = {}
    for c, organ in enumerate(ORGANS, start=1):
        p, g = seg == c, label == c
        total = int(p.sum() + g.sum())
        expected[organ] = None if total == 0 else 2.0 * int((p & g).sum()) / total
    got = metrics["cases"][0]["dice"]
    assert expected[ORGANS[false_positive - 1]] == 0.0 and got[ORGANS[false_positive - 1]] == 0.0
    for organ, value in expected.items():
        assert (got[organ] is None) if value is None else got[organ] == pytest.approx(value, abs=1e-6), organ
    scored = [v for v in expected.values() if v is not None]
    assert metrics["mean_dice"] == pytest.approx(sum(scored) / len(scored), abs=1e-6)
    assert metrics["class_dice"] == got  # one case: the class means are its scores


def test_loss_is_the_research_default_where_an_absent_class_still_counts():
    """Research BTCV main.py: DiceCELoss(to_onehot_y, softmax), squared_pred off, smooth_nr = smooth_dr = 1e-5.
    With smooth_nr 0 and squared_pred (the --squared_dice branch) an organ absent from a crop costs 1 whatever
    the network predicts: no gradient, and a perfect prediction of "nothing here" is never rewarded."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BTCV / "configs" / "train.json"))
    loss = parser.get_parsed_content("loss")
    assert (loss.dice.squared_pred, loss.dice.smooth_nr, loss.dice.smooth_dr) == (False, 1e-5, 1e-5)
    assert loss.dice.to_onehot_y and loss.dice.softmax and not loss.dice.batch

    label = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    label[..., :4] = 6  # liver and background only: 12 organs absent from this crop
    perfect = 50.0 * torch.nn.functional.one_hot(label[:, 0], 14).movedim(-1, 1).double()
    assert float(loss.dice(perfect, label)) < 1e-4  # "nothing here" predicted right costs nothing
    logits = torch.randn(1, 14, 8, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    logits.requires_grad_(True)
    loss.dice.reduction = "none"
    loss.dice(logits, label)[0, 13].sum().backward()  # the Dice term of one absent organ
    assert float(logits.grad[:, 13].abs().sum()) > 0


def test_inference_nifti_on_the_input_grid(trained, input_dir, tmp_path):
    before = sha256(input_dir / "slab.nii.gz")
    out = tmp_path / "seg"
    run_bundle(
        "inference",
        ["configs/inference.json"],
        {**SMALL, "ckpt_dir": trained["ckpt_dir"], "input_dir": str(input_dir), "output_dir": str(out)},
    )
    seg, img = nib.load(out / "slab_seg.nii.gz"), nib.load(input_dir / "slab.nii.gz")
    assert seg.shape == img.shape and np.allclose(seg.affine, img.affine, atol=1e-4)
    data = np.asarray(seg.dataobj)
    assert data.dtype == np.uint8 and data.max() <= 13
    assert sha256(input_dir / "slab.nii.gz") == before and sorted(os.listdir(input_dir)) == ["slab.nii.gz"]


def test_inference_refuses_output_in_input_folder(trained, input_dir):
    proc = run_bundle(
        "inference",
        ["configs/inference.json"],
        {**SMALL, "ckpt_dir": trained["ckpt_dir"], "input_dir": str(input_dir), "output_dir": str(input_dir)},
        check=False,
    )
    assert proc.returncode != 0 and "is the input folder" in proc.stdout + proc.stderr
    assert sorted(os.listdir(input_dir)) == ["slab.nii.gz"]


def test_inference_dicom_series_folder(trained, tmp_path, sample_dir):
    inp = tmp_path / "dicom_in"
    write_dicom_series(sample_dir / "ct_slab.nii.gz", inp / "series1")
    out = tmp_path / "seg"
    run_bundle(
        "inference",
        ["configs/inference.json"],
        {**SMALL, "ckpt_dir": trained["ckpt_dir"], "input_dir": str(inp), "output_dir": str(out)},
    )
    seg, ref = nib.load(out / "series1_seg.nii.gz"), nib.load(sample_dir / "ct_slab.nii.gz")
    # the series is the slab slice by slice: its label map lies on the slab's grid
    assert seg.shape == ref.shape and np.allclose(seg.affine, ref.affine, atol=1e-3)
    assert np.asarray(seg.dataobj).max() <= 13


def test_torchscript_export_of_the_trained_model_reproduces_eager(trained, tmp_path):
    """The zoo's TorchScript check (``ci/zoo_checks.py``, which runs it on fresh weights) on the trained checkpoint."""
    details = check_torchscript(
        BTCV,
        {"feature_size": 12},
        tmp_path,
        ckpt_file=Path(trained["ckpt_dir"]) / "model.pt",
        spatial_shape=(64, 64, 64),
    )
    assert "loaded module vs eager on another input: max abs difference" in details
    assert (tmp_path / "model.ts").is_file()


def test_standalone_copy_outside_the_repo(trained, input_dir, tmp_path):
    """A copied-out bundle carries its own `custom/` and runs with no path back into the repository: every
    ``custom`` module the run imports is loaded from the copy's files."""
    copy = tmp_path / "elsewhere" / "swin_unetr_btcv"
    shutil.copytree(BTCV, copy, ignore=shutil.ignore_patterns("models", "outputs", "__pycache__"))
    assert (copy / "custom").is_dir() and not (copy / "custom").is_symlink()
    assert not [p for p in copy.rglob("*") if p.is_symlink()]
    assert REPO not in copy.parents
    out = tmp_path / "seg"
    proc = run_bundle(
        "inference",
        ["configs/inference.json"],
        {**SMALL, "ckpt_dir": trained["ckpt_dir"], "input_dir": str(input_dir), "output_dir": str(out)},
        cwd=copy,
        report_custom=True,
    )
    assert (out / "slab_seg.nii.gz").is_file()
    modules = custom_of_child(proc)
    assert {"custom", "custom.data.inputs", "custom.networks.recipe"} <= set(modules), sorted(modules)
    own = (copy / "custom").resolve()
    elsewhere = {name: f for name, f in modules.items() if not f.resolve().is_relative_to(own)}
    assert not elsewhere, f"loaded from outside the copy's custom/ ({own}): {elsewhere}"


def test_multi_gpu_train_and_evaluate_on_two_cpu_processes(two_case_dataset, tmp_path):
    """DDP with gloo: 2 ranks train, validation is reduced over both, only rank 0 writes."""
    overrides = btcv_overrides(two_case_dataset, tmp_path, max_epochs=1, val_interval=1, warmup_epochs=0)
    run_bundle("training", ["configs/train.json", "configs/multi_gpu_train.json"], overrides, python_args=TORCHRUN)
    state = torch.load(tmp_path / "models" / "checkpoint.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 1  # 2 cases / 2 ranks = 1 step per rank
    assert not any(k.startswith("module.") for k in state["model"])  # saved unwrapped, loadable anywhere
    small_net().load_state_dict(torch.load(tmp_path / "models" / "model.pt", weights_only=True)["model"])

    configs = ["configs/train.json", "configs/evaluate.json", "configs/multi_gpu_evaluate.json"]
    run_bundle("evaluating", configs, overrides, python_args=TORCHRUN)
    metrics = json.loads((tmp_path / "outputs" / "metrics.json").read_text(encoding="utf-8"))
    assert [c["case"] for c in metrics["cases"]] == ["img0001", "img0002"]  # gathered from both ranks
    assert metrics["cases"][0]["dice"] == metrics["cases"][1]["dice"]  # same volume, same weights
