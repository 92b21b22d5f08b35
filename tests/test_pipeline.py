"""The one segmentation pipeline: BTCV and MSD build their chains from the same source, overridable by name."""

from __future__ import annotations

import json

import pytest
from helpers import BTCV, REPO
from monai.bundle import ConfigParser

from bundles.msd_tasks import make_task
from custom.engines.distributed import rank_handlers
from custom.segmentation.pipeline import TrainingHandlers

MSD = REPO / "swin_unetr_msd"


def parser_of(bundle, files, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / f) for f in files])
    parser.update({"bundle_root": str(bundle), "ckpt_dir": "/nonexistent", **overrides})
    return parser


def described(transforms) -> list:
    """Each transform as (class name, its arguments that set the recipe), for comparing two chains."""
    out = []
    for t in transforms:
        args = {}
        for name in ("keys", "pixdim", "mode", "a_min", "a_max", "b_min", "b_max", "clip", "spatial_size", "prob"):
            for holder in (t, getattr(t, "spacing_transform", None), getattr(t, "scaler", None)):
                if holder is not None and hasattr(holder, name):
                    value = getattr(holder, name)
                    args[name] = value.tolist() if hasattr(value, "tolist") else value
                    break
        out.append((type(t).__name__, args))
    return out


@pytest.fixture
def liver(tmp_path):
    """MSD Liver: the same CT window, spacing and ROI as BTCV, so the two bundles must build the same chains."""
    return {"dataset_dir": str(make_task(tmp_path, "Task03_Liver", cases=2, tests=0))}


def test_btcv_and_msd_build_the_same_chains_for_the_same_ct_recipe(liver):
    btcv = parser_of(BTCV, ["train.json"], num_samples=2)
    msd = parser_of(MSD, ["train.json"], **liver)
    assert list(btcv.get_parsed_content("pixdim")) == list(msd.get_parsed_content("pixdim")) == [1.5, 1.5, 2.0]
    for section in ("train#deterministic_transforms", "train#random_transforms"):
        a, b = described(btcv.get_parsed_content(section)), described(msd.get_parsed_content(section))
        assert a == b, section
    names = [n for n, _ in described(btcv.get_parsed_content("train#deterministic_transforms"))]
    assert names == [
        "LoadImaged",
        "Orientationd",
        "Spacingd",
        "ScaleIntensityRanged",
        "CropForegroundd",
        "SpatialPadd",
        "EnsureTyped",
    ]
    # the cache tail (its device comes from the cache plan, which reads the data) is the same builder call
    assert btcv["train#cache_tail"] == msd["train#cache_tail"]
    assert type(btcv.get_parsed_content("loss")) is type(msd.get_parsed_content("loss"))
    # inference and evaluation: the same chain from the same builder, in both bundles
    infer_b = parser_of(BTCV, ["inference.json"]).get_parsed_content("preprocessing").transforms
    infer_m = parser_of(MSD, ["inference.json"], **liver).get_parsed_content("preprocessing").transforms
    assert described(infer_b) == described(infer_m)


def test_one_transform_argument_is_overridden_by_its_name(liver):
    btcv = parser_of(BTCV, ["train.json"], flip_prob=0.5, intensity_range=[-100, 200], pixdim=[2.0, 2.0, 2.0])
    chain = btcv.get_parsed_content("train#deterministic_transforms")
    scale = next(t for t in chain if type(t).__name__ == "ScaleIntensityRanged").scaler
    assert (scale.a_min, scale.a_max) == (-100, 200)
    spacing = next(t for t in chain if type(t).__name__ == "Spacingd")
    assert list(spacing.spacing_transform.pixdim) == [2.0, 2.0, 2.0]
    flips = [t for t in btcv.get_parsed_content("train#random_transforms") if type(t).__name__ == "RandFlipd"]
    assert [f.prob for f in flips] == [0.5, 0.5, 0.5]
    assert btcv.get_parsed_content("recipe")["task"]["intensity_range"] == [-100, 200]  # and the weights record it
    msd = parser_of(MSD, ["train.json"], **liver, rotate90_prob=0.0, roi_size=[64, 64, 64])
    rot = next(t for t in msd.get_parsed_content("train#random_transforms") if type(t).__name__ == "RandRotate90d")
    assert rot.prob == 0.0
    pad = next(t for t in msd.get_parsed_content("train#deterministic_transforms") if type(t).__name__ == "SpatialPadd")
    assert list(pad.padder.spatial_size) == [64, 64, 64]


class Appended:
    """A handler a user adds to the list: it must run on every rank."""

    def attach(self, engine):
        pass


def test_handlers_are_selected_per_rank_by_what_they_are_not_their_place(tmp_path):
    from ignite.handlers import ProgressBar
    from monai.handlers import StatsHandler, TensorBoardStatsHandler

    from custom.engines.monitoring import StopOnNonFiniteLoss

    stop, stats, user, tb, bar = (
        StopOnNonFiniteLoss(),
        StatsHandler(),
        Appended(),
        TensorBoardStatsHandler(log_dir=str(tmp_path / "runs")),  # not MONAI's default ./runs
        ProgressBar(),
    )
    handlers = [stop, stats, user, tb, bar]
    assert rank_handlers(handlers, rank=0) == handlers
    assert rank_handlers(handlers, rank=1) == [stop, user]  # the user's handler kept, wherever it stands
    assert rank_handlers([stats, bar], rank=3) is None  # MONAI's engines take None for "no handlers"


def test_training_handlers_attach_in_order_and_skip_the_logs_on_other_ranks(tmp_path, monkeypatch):
    import torch
    from ignite.engine import Engine

    net = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")  # its TensorBoard writer creates the output folder
    composite = TrainingHandlers(ckpt, out, sched, validator=None, val_interval=1, checkpoint=Appended())
    names = [type(h).__name__ for h in composite.handlers]
    assert names == [
        "StopOnNonFiniteLoss",
        "LrScheduleHandler",
        "ValidationHandler",
        "Appended",
        "StatsHandler",
        "TensorBoardStatsHandler",
        "ProgressBar",
    ]
    attached = []
    for h in composite.handlers:
        monkeypatch.setattr(h, "attach", lambda engine, h=h: attached.append(type(h).__name__), raising=False)
    monkeypatch.setattr("custom.engines.distributed._rank", lambda: 1)
    composite.attach(Engine(lambda e, b: None))
    assert attached == ["StopOnNonFiniteLoss", "LrScheduleHandler", "ValidationHandler", "Appended"]


@pytest.mark.parametrize("bundle", ["swin_unetr_btcv", "swin_unetr_msd", "swin_unetr_ssl"])
def test_multi_gpu_configs_select_nothing_by_list_position(bundle):
    for path in (REPO / bundle / "configs").glob("multi_gpu_*.json"):
        text = path.read_text(encoding="utf-8")
        assert "[:" not in text and "[-" not in text, path  # e.g. the old "@train#handlers[: -3 ...]"
        assert "custom.engines.distributed.start" in text, path


def test_braintumour_regions_are_a_variant_of_the_task_not_threaded_through_the_configs():
    """Sigmoid outputs, region labels and the region metric are decided by the pipeline from ``task``."""
    for path in MSD.glob("configs/*.json"):
        for key, value in _leaves(json.loads(path.read_text(encoding="utf-8"))):
            if isinstance(value, str) and "@region_based" in value:
                assert value == "@region_based" and key.endswith("region_based"), (path.name, key, value)


def _leaves(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{path}#{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, f"{path}#{i}")
    else:
        yield path, node


def test_braintumour_builds_sigmoid_regions_from_the_same_builders(tmp_path):
    task = {"dataset_dir": str(make_task(tmp_path, "Task01_BrainTumour", cases=2, tests=0))}
    parser = parser_of(MSD, ["train.json"], **task)
    post = [type(t).__name__ for t in parser.get_parsed_content("validate#postprocessing").transforms]
    assert post == ["Activationsd", "AsDiscreted"]
    chain = [type(t).__name__ for t in parser.get_parsed_content("train#deterministic_transforms")]
    assert chain.index("MSDBrainTumourRegionsd") == chain.index("Spacingd") + 1  # regions after nearest resampling
    assert "FgBgToIndicesd" not in [type(t).__name__ for t in parser.get_parsed_content("train#cache_tail")]
    infer = parser_of(MSD, ["inference.json"], **task)
    names = [type(t).__name__ for t in infer.get_parsed_content("postprocessing").transforms]
    assert names == ["Activationsd", "AsDiscreted", "RegionsToLabelsd", "Invertd", "SaveImaged"]
