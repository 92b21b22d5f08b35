"""The bundle's files agree with each other and with the collection's contract."""

from __future__ import annotations

import json

import pytest
from helpers import BTCV, REPO

from ci.zoo_checks import json_format_problem

CONFIGS = sorted(REPO.glob("swin_unetr_*/configs/*.json"))
#: values inference.json takes from the weights' recipe (``custom.networks.recipe``), else the training default
FROM_THE_RECIPE = ["num_classes", "pixdim", "intensity_range", "roi_size", "feature_size", "legacy_merging"]
#: values inference.json must repeat from train.json (MONAI Label and users run inference.json alone)
SHARED_WITH_INFERENCE = [
    "sw_batch_size",
    "overlap",
    "amp",
    "bundle_root",
    "ckpt_dir",
    "dataset_dir",
    "device",
]
CONTRACT_TRAIN_IDS = [
    "bundle_root",
    "device",
    "dataset_dir",
    "datalist",
    "output_dir",
    "ckpt_dir",
    "roi_size",
    "feature_size",
    "max_epochs",
    "epoch_length",
    "batch_size",
    "num_samples",
    "learning_rate",
    "val_interval",
    "amp",
    "num_workers",
    "cache_rate",
    "pretrained_path",
]
CONTRACT_INFER_IDS = [
    "input_dir",
    "output_dir",
    "ckpt_dir",
    "roi_size",
    "feature_size",
    "sw_batch_size",
    "overlap",
    "amp",
]


def load(name: str, bundle=BTCV) -> dict:
    return json.loads((bundle / "configs" / name).read_text(encoding="utf-8"))


@pytest.mark.parametrize("bundle", ["swin_unetr_btcv", "swin_unetr_ssl", "swin_unetr_msd"])
def test_every_bundle_has_the_files_the_contract_names(bundle):
    root = REPO / bundle
    for f in (
        "configs/train.json",
        "configs/multi_gpu_train.json",
        "configs/metadata.json",
        "configs/logging.conf",
        "docs/README.md",
        "LICENSE",
    ):
        assert (root / f).is_file(), f"{bundle}/{f} missing"
    assert (root / "custom").resolve() == (REPO / "custom").resolve()
    meta = load("metadata.json", root)
    assert meta["version"] in meta["changelog"]


def parsed(bundle, name: str, ids: list[str], **overrides) -> dict:
    """``ids`` of ``configs/<name>`` as the bundle resolves them, without weights (no ``model.pt``)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / name))
    parser.update({"bundle_root": str(bundle), "ckpt_dir": "/nonexistent", **overrides})
    return {k: parser.get_parsed_content(k) for k in ids}


def test_msd_inference_repeats_its_training_recipe(tmp_path):
    from bundles.msd_tasks import make_task

    msd = REPO / "swin_unetr_msd"
    train, infer = load("train.json", msd), load("inference.json", msd)
    shared = list(SHARED_WITH_INFERENCE) + ["in_channels", "region_based", "pixdim", "roi_size", "num_classes"]
    drift = {k: (train[k], infer[k]) for k in shared if train[k] != infer[k]}
    assert not drift, f"MSD train.json and inference.json disagree: {drift}"
    # without a recipe in the weights, inference falls back on the task folder and the training defaults
    task = {"dataset_dir": str(make_task(tmp_path, "Task09_Spleen"))}
    ids = ["feature_size", "pixdim", "roi_size", "in_channels", "num_classes"]
    assert parsed(msd, "inference.json", ids + ["legacy_merging"], **task) == {
        **parsed(msd, "train.json", ids, **task),
        "legacy_merging": False,  # train.json's null without pretrained_path: MONAI's order
    }


@pytest.mark.parametrize("path", CONFIGS, ids=[f"{p.parents[1].name}/{p.name}" for p in CONFIGS])
def test_json_is_formatted_the_model_zoo_way(path):
    assert json_format_problem(path) is None  # the zoo check's own rule (ci/zoo_checks.py)


def test_inference_repeats_the_training_recipe_exactly():
    train, infer = load("train.json"), load("inference.json")
    drift = {k: (train[k], infer[k]) for k in SHARED_WITH_INFERENCE if train[k] != infer[k]}
    assert not drift, f"train.json and inference.json disagree: {drift}"
    # the sizes come from the weights' recipe; without one, inference's fallbacks are the training defaults
    ids = [k for k in FROM_THE_RECIPE if k != "legacy_merging"]
    assert parsed(BTCV, "inference.json", FROM_THE_RECIPE) == {
        **parsed(BTCV, "train.json", ids),
        "legacy_merging": False,
    }
    assert train["legacy_merging"] is None  # from pretrained_path; none: MONAI's order (custom.networks.weights)


def test_contract_ids_present():
    train, infer = load("train.json"), load("inference.json")
    assert [k for k in CONTRACT_TRAIN_IDS if k not in train] == []
    assert [k for k in CONTRACT_INFER_IDS if k not in infer] == []
    assert train["ckpt_dir"] == infer["ckpt_dir"] == "$@bundle_root + '/models'"
    assert {"training", "run", "check_data"} <= set(train) and {"inference", "run"} <= set(infer)
    assert {"evaluating", "run"} <= set(load("evaluate.json"))


def test_metadata_matches_the_network():
    meta, train = load("metadata.json"), load("train.json")
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["num_channels"] == train["num_classes"] == len(pred["channel_def"])
    assert pred["channel_def"]["0"] == "background" and pred["channel_def"]["13"] == "left adrenal gland"
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == train["roi_size"]
    assert all(s % 32 == 0 for s in train["roi_size"])
    assert meta["version"] in meta["changelog"]
