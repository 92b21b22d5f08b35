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
    drift = {k: (train[k], infer[k]) for k in SHARED_WITH_INFERENCE if train[k] != infer[k]}
    assert not drift, f"MSD train.json and inference.json disagree: {drift}"
    # without a recipe in the weights, inference falls back on the task folder and the training defaults
    task = {"dataset_dir": str(make_task(tmp_path, "Task09_Spleen"))}
    ids = ["feature_size", "pixdim", "roi_size", "in_channels", "num_classes", "intensity_range"]
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
    # the sizes come from the weights' recipe; without one, inference's values are the training defaults
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
    meta = load("metadata.json")
    train = parsed(BTCV, "train.json", ["num_classes", "roi_size", "task"])
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["num_channels"] == train["num_classes"] == len(pred["channel_def"])
    assert pred["channel_def"]["0"] == "background" and pred["channel_def"]["13"] == "left adrenal gland"
    # MONAI Label names the classes from the metadata, the pipeline from the task: they must be the same names
    assert [pred["channel_def"][str(i)] for i in range(len(pred["channel_def"]))] == list(train["task"].class_names)
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == list(train["roi_size"])
    assert all(s % 32 == 0 for s in train["roi_size"])
    assert meta["version"] in meta["changelog"]


# -- the wiring both fine-tuning bundles share ---------------------------------------------------------------
#: config files both fine-tuning bundles have
SHARED_FILES = [
    p.name for p in sorted((REPO / "swin_unetr_btcv" / "configs").glob("*.json")) if p.name != "metadata.json"
]
#: (file, config path) -> why the two bundles legitimately differ there. Everything else (the engines, handlers,
#: inferer, predictor, dataset and cache wiring, the recipe values' flow, the multi-GPU and leaderboard overrides)
#: must be identical: MONAI Label and MONAI's property checker address those blocks by id, and users' overrides
#: (``--train#trainer#epoch_length``) must mean the same in both bundles.
ALLOWED_DIFFERENCES = {
    ("train.json", "dataset_dir"): "each bundle's default data folder",
    ("inference.json", "dataset_dir"): "each bundle's default data folder",
    ("train.json", "datalist"): "BTCV reads dataset_0.json; MSD the task folder's dataset.json",
    ("train.json", "task_table"): "BTCV is a task of the table; an MSD task is read from its task folder",
    ("train.json", "train#dataset#data"): "the data source: BTCV's datalist, MSD's dataset.json split by folds",
    ("train.json", "validate#dataset#data"): "the data source: BTCV's datalist, MSD's dataset.json split by folds",
    ("evaluate.json", "cv_summary#cases"): "the labelled cases: BTCV's datalist, MSD's dataset.json",
}


def config_differences(a, b, path: str = "") -> list[str]:
    """The config paths (``train#trainer#max_epochs``) where ``a`` and ``b`` differ, at the first level that
    differs below an allowed block."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in list(a) + [k for k in b if k not in a]:
            sub = f"{path}#{key}" if path else key
            if key not in a or key not in b:
                out.append(sub)
            else:
                out += config_differences(a[key], b[key], sub)
        return out
    return [] if a == b else [path]


@pytest.mark.parametrize("name", SHARED_FILES)
def test_the_fine_tuning_bundles_share_their_wiring_exactly(name):
    """A block both fine-tuning bundles share cannot change in one bundle only; the test names the block."""
    msd = REPO / "swin_unetr_msd"
    assert (msd / "configs" / name).is_file(), f"swin_unetr_msd lacks configs/{name}, which swin_unetr_btcv has"
    diffs = config_differences(load(name), load(name, msd))
    allowed = {path for f, path in ALLOWED_DIFFERENCES if f == name}
    unexplained = [d for d in diffs if not any(d == p or d.startswith(p + "#") for p in allowed)]
    assert not unexplained, (
        f"configs/{name} differs between swin_unetr_btcv and swin_unetr_msd at {unexplained}: change both bundles "
        "together, or list the block in ALLOWED_DIFFERENCES with the reason"
    )
    stale = [p for p in allowed if not any(d == p or d.startswith(p + "#") for d in diffs)]
    assert not stale, f"ALLOWED_DIFFERENCES lists {stale} for configs/{name}, which no longer differ: remove them"


def test_the_wiring_guard_names_a_changed_block():
    btcv = load("train.json")
    changed = json.loads(json.dumps(btcv))
    changed["train"]["trainer"]["amp"] = False
    assert config_differences(btcv, changed) == ["train#trainer#amp"]
    assert config_differences(btcv, {**btcv, "extra": 1}) == ["extra"]
