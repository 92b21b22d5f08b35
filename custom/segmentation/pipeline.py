"""The segmentation pipeline the BTCV and MSD bundles share: its transform chains, handlers and engines, once.

Each fine-tuning bundle's configs state what makes it that bundle (its recipe values at the top, its
data source, its classes: a :class:`~custom.segmentation.task.TaskRecipe` named ``task``) and hand the
task to the builders here, which return MONAI's own objects (``Compose`` chains of MONAI transforms,
``SupervisedTrainer``/``SupervisedEvaluator`` handlers). Why builders and not the chains spelt out in
JSON: the two bundles held the same 370 lines of chains and handlers, copied block by block, and they
drifted (``channels_last`` and ``cudnn_benchmark`` existed in one only); MONAI's multi-file configs
cannot help, because a bundle is run as ``--config_file configs/train.json`` alone and its ``%`` macros
read files relative to the working directory, which MONAI Label does not set to the bundle.

What varies by task is decided here, once, from the task: the intensity rule (CT window or MRI z-score),
BrainTumour's overlapping regions (sigmoid outputs, region labels), the crop (labelled-voxel centres or
uniform). The stage names the three places a chain is used: ``"train"`` (training and its validation,
on the resampled grid, cached), ``"evaluate"`` (scored on the label's own grid), ``"infer"`` (new images).

Every argument a user would tune is a named value of the bundle config (``pixdim``, ``roi_size``,
``num_samples``, ``flip_prob``, ``intensity_range``, ...), overridable on the command line; a whole
chain can still be replaced by a user's own list in an extra config file (``train#random_transforms``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from monai.transforms import (
    Activationsd,
    AsDiscreted,
    Compose,
    CropForegroundd,
    DeleteItemsd,
    EnsureTyped,
    FgBgToIndicesd,
    Invertd,
    LoadImaged,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SaveImaged,
    SpatialPadd,
)

from custom.data.cache_plan import CachePlan
from custom.data.inputs import checked_output_dir, output_name_formatter
from custom.data.transforms import Spacingd
from custom.engines.checkpoint_files import BestModelSaver, ModelLoader
from custom.engines.distributed import rank_handlers
from custom.engines.monitoring import StopOnNonFiniteLoss
from custom.inference.body_crop import body_crop_inferer
from custom.inference.dicom_seg import CaseDicomSeg
from custom.inference.ensemble import ensemble_predictor
from custom.inference.memory_plan import PlannedSlidingWindowInferer
from custom.inference.preview import CasePreview
from custom.inference.statistics import CaseStatistics
from custom.networks.weights import verified_path
from custom.segmentation.cv_summary import cv_summary_from_splits
from custom.segmentation.evaluation import CheckSameGridd, LabelDiceMetric
from custom.segmentation.msd import BRATS_LABELS, BRATS_REGIONS, MSDBrainTumourRegionsd, RegionsToLabelsd
from custom.segmentation.postprocess import KeepLargestComponentsd
from custom.segmentation.report import EvaluationReport
from custom.segmentation.task import TaskRecipe, intensity_transform, training_crop
from custom.utils import require_bool

__all__ = [
    "STAGES",
    "INDEX_KEYS",
    "load_transforms",
    "cache_transforms",
    "random_transforms",
    "cache_plan",
    "sliding_window",
    "validation_postprocessing",
    "validation_metric",
    "TrainingHandlers",
    "validation_handlers",
    "evaluation_postprocessing",
    "evaluation_metric",
    "inference_postprocessing",
    "predictor",
    "cv_summary",
    "model_handlers",
    "inference_handlers",
    "evaluation_handlers",
    "engine_options",
]

logger = logging.getLogger(__name__)

STAGES = ("train", "evaluate", "infer")
#: the foreground/background voxel indices the training cache holds for the labelled-voxel crop
INDEX_KEYS = ("label_fg_indices", "label_bg_indices")


def _nonzero(x: torch.Tensor) -> torch.Tensor:
    """The foreground of an intensity-normalised image: CT windows to 0..1 (air 0), MRI z-scores non-zero voxels."""
    return x != 0


def load_transforms(task: TaskRecipe, stage: str, device: str | torch.device | None = None) -> list:
    """Read, orient, resample and normalise: the deterministic chain of ``stage``.

    - ``"train"``: image and label to RAS, resampled to ``task.pixdim`` (label nearest), BrainTumour's
      labels turned into its three regions (after the nearest resampling), the intensity rule, the
      foreground box, padding to ``task.roi_size``. What the training cache holds, and what the
      validation during training scores (on this resampled grid).
    - ``"evaluate"``: image and label read; only the image is resampled and normalised, so that the
      prediction, inverted to the label's own grid, is scored there (:mod:`custom.segmentation.evaluation`).
    - ``"infer"``: the image alone, moved to ``device`` first (resampling runs there).

    Raises:
        ValueError: an unknown ``stage``.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if stage == "infer":
        return [
            LoadImaged("image", ensure_channel_first=True, image_only=True),
            EnsureTyped("image", device=device),
            Orientationd("image", axcodes="RAS"),
            Spacingd("image", pixdim=list(task.pixdim), mode="bilinear"),
            intensity_transform(task, "image"),
        ]
    keys = ["image", "label"]
    load = LoadImaged(keys, ensure_channel_first=True, image_only=True)
    if stage == "evaluate":
        return [
            load,
            Orientationd("image", axcodes="RAS"),
            Spacingd("image", pixdim=list(task.pixdim), mode="bilinear"),
            intensity_transform(task, "image"),
            EnsureTyped("image"),
        ]
    chain = [
        load,
        Orientationd(keys, axcodes="RAS"),
        Spacingd(keys, pixdim=list(task.pixdim), mode=["bilinear", "nearest"]),
    ]
    if task.region_based:
        chain.append(MSDBrainTumourRegionsd("label"))
    return chain + [
        intensity_transform(task, "image"),
        CropForegroundd(keys, source_key="image", allow_smaller=True, select_fn=_nonzero),
        SpatialPadd(keys, spatial_size=list(task.roi_size)),
        EnsureTyped(keys, track_meta=True),
    ]


def _indexed(task: TaskRecipe) -> bool:
    """Whether the training crop centres on labelled voxels (and the cache keeps their indices for it)."""
    return task.augmentation.crop == "pos_neg"


def cache_transforms(task: TaskRecipe, device: str | torch.device | None = None) -> list:
    """What the training cache adds to the deterministic chain: voxel indices for the crop, compact dtypes, device.

    The cache lives on ``device`` (the training GPU where it fits: :class:`custom.data.cache_plan.CachePlan`
    decides), so crops are drawn there; the label as uint8 and the indices as int32 make it 4x and 2x
    smaller. Metadata is dropped: the training loop needs none.
    """
    chain = []
    if _indexed(task):
        chain.append(FgBgToIndicesd("label", image_key="image", image_threshold=0))
    chain += [
        EnsureTyped("image", device=device, track_meta=False),
        EnsureTyped("label", dtype=torch.uint8, device=device, track_meta=False),
    ]
    if _indexed(task):
        chain.append(EnsureTyped(list(INDEX_KEYS), dtype=torch.int32, device=device, track_meta=False))
    return chain


def random_transforms(task: TaskRecipe) -> list:
    """The random part of training: ``task.num_samples`` crops of ``task.roi_size``, flips, rotation, intensity.

    Probabilities from ``task.augmentation`` (research BTCV: flips 0.2 per axis, rot90 0.2, intensity 0.1;
    BrainTumour, research BRATS21: uniform crops, flips 0.5, no rotation, intensity 1.0).
    """
    aug = task.augmentation
    keys = ["image", "label"]
    crop = training_crop(task, keys, list(task.roi_size), task.num_samples)
    chain: list = [crop]
    if isinstance(crop, RandCropByPosNegLabeld):
        crop.fg_indices_key, crop.bg_indices_key = INDEX_KEYS
        chain.append(DeleteItemsd(list(INDEX_KEYS)))
    chain += [RandFlipd(keys, spatial_axis=[axis], prob=aug.flip_prob) for axis in range(3)]
    return chain + [
        RandRotate90d(keys, prob=aug.rotate90_prob, max_k=3),
        RandScaleIntensityd("image", factors=0.1, prob=aug.intensity_augment_prob),
        RandShiftIntensityd("image", offsets=0.1, prob=aug.intensity_augment_prob),
    ]


def cache_plan(
    task: TaskRecipe,
    name: str,
    data: Sequence[Mapping[str, Any]],
    transform: Callable | Sequence[Callable],
    cache_rate: float,
    device: str | torch.device | None = "cpu",
) -> Any:
    """The :class:`~custom.data.cache_plan.CachePlan` of the training (``name="training"``) or validation cache.

    The training cache holds the output of :func:`cache_transforms`: float32 image, uint8 label, int32
    indices where the crop uses them; the validation cache the deterministic chain's output as it is.
    """
    extra: dict[str, Any] = {}
    if name == "training":
        extra = {"cached_bytes": {"image": 4, "label": 1}, "index_bytes": 4 if _indexed(task) else 0}
    return CachePlan(
        data,
        transform,
        device=device,
        cache_rate=cache_rate,
        pixdim=list(task.pixdim),
        roi_size=list(task.roi_size),
        index_threshold=0,
        name=name,
        **extra,
    )


def sliding_window(
    task: TaskRecipe, sw_batch_size: int, overlap: float, body_crop: bool = False, device: Any = "cpu"
) -> Any:
    """MONAI's sliding window over ``task.roi_size`` (gaussian blending), its memory planned, skipping air on request.

    Each case's stitching is planned before a window runs
    (:class:`custom.inference.memory_plan.PlannedSlidingWindowInferer`): on ``device`` where the
    output probabilities fit, else on the CPU (logged), else refused with the sizes. With ``body_crop`` the
    windows that lie wholly outside the body are not run and background is written there
    (:class:`custom.inference.body_crop.BodyCropInferer`): the body is what is above the CT window's
    floor, or the non-zero voxels of a z-scored MRI; the output inside the body's box is the uncropped
    one. BrainTumour's sigmoid regions get sigmoid background.
    """
    window = PlannedSlidingWindowInferer(
        roi_size=list(task.roi_size),
        num_classes=task.out_channels,
        network_device=device,
        in_channels=task.in_channels,
        sw_batch_size=sw_batch_size,
        overlap=overlap,
        mode="gaussian",
    )
    return body_crop_inferer(
        window,
        enabled=body_crop,
        mode="above" if task.intensity_range is not None else "nonzero",
        outside="sigmoid" if task.region_based else "softmax",
    )


def _discrete(task: TaskRecipe, keys: Sequence[str] = ("pred",)) -> list:
    """Network outputs to labels: argmax over classes, or BrainTumour's regions thresholded at sigmoid 0.5."""
    if task.region_based:
        return [Activationsd("pred", sigmoid=True), AsDiscreted(list(keys), threshold=[0.5] + [None] * (len(keys) - 1))]
    return [AsDiscreted(list(keys), argmax=[True] + [False] * (len(keys) - 1))]


def validation_postprocessing(task: TaskRecipe) -> Compose:
    """Validation during training, on the resampled grid: one-hot prediction and label for ``MeanDice``."""
    if task.region_based:
        return Compose(_discrete(task, ("pred", "label")))
    n = task.out_channels
    return Compose([AsDiscreted(["pred", "label"], argmax=[True, False], to_onehot=[n, n])])


def validation_metric(task: TaskRecipe) -> dict:
    """The key metric that picks ``model.pt``: mean Dice over the classes (the regions for BrainTumour)."""
    from monai.handlers import MeanDice, from_engine

    return {
        "val_mean_dice": MeanDice(include_background=task.region_based, output_transform=from_engine(["pred", "label"]))
    }


class TrainingHandlers:
    """The training engine's standard handlers, attached in the order they must run, on the ranks that need them.

    One entry of ``train#handlers`` (a list, because MONAI Label inserts its own checkpoint loader there
    and MONAI's property check reads it), so a user appends a handler after it. Attached: non-finite loss
    stops first (so such an iteration is never saved), then the LR schedule, the validation (which saves
    ``model.pt``), the resumable ``checkpoint`` (:class:`~custom.engines.training_checkpoint.TrainingCheckpoint`),
    then the logs (loss to the console and TensorBoard, a progress bar). Under DDP the other ranks skip
    the logs (:func:`custom.engines.distributed.rank_handlers`).

    Args:
        ckpt_dir: where the checkpoints are (named when the loss stops being a number).
        output_dir: TensorBoard's folder.
        lr_scheduler: stepped every iteration.
        validator: the validation evaluator, run every ``val_interval`` epochs.
        checkpoint: the resumable-state handler.
    """

    def __init__(
        self, ckpt_dir: str, output_dir: str, lr_scheduler: Any, validator: Any, val_interval: int, checkpoint: Any
    ) -> None:
        from ignite.handlers import ProgressBar
        from monai.handlers import (
            LrScheduleHandler,
            StatsHandler,
            TensorBoardStatsHandler,
            ValidationHandler,
            from_engine,
        )

        loss = from_engine(["loss"], first=True)
        self.handlers = [
            StopOnNonFiniteLoss(ckpt_dir),
            LrScheduleHandler(lr_scheduler, epoch_level=False, print_lr=False),
            ValidationHandler(validator=validator, epoch_level=True, interval=val_interval),
            checkpoint,
            StatsHandler(tag_name="train_loss", output_transform=loss),
            TensorBoardStatsHandler(log_dir=output_dir, tag_name="train_loss", output_transform=loss),
            ProgressBar(desc="train"),
        ]

    def attach(self, engine: Any) -> None:
        for handler in rank_handlers(self.handlers) or []:
            handler.attach(engine)


def validation_handlers(ckpt_dir: str, output_dir: str, network: torch.nn.Module, recipe: Mapping) -> list:
    """Validation during training: save the best ``model.pt`` (with its recipe), log the metric."""
    from monai.handlers import StatsHandler, TensorBoardStatsHandler

    return [
        BestModelSaver(ckpt_dir, network, filename="model.pt", recipe=recipe),
        StatsHandler(iteration_log=False),
        TensorBoardStatsHandler(log_dir=output_dir, iteration_log=False),
    ]


def evaluation_postprocessing(task: TaskRecipe, preprocessing: Compose, prediction_dir: str | None = None) -> Compose:
    """The label map inference would write (same steps), inverted to the label's own grid, checked to be on it.

    BrainTumour's regions become its label map first (as inference writes it), and after the inversion
    both prediction and label become the three regions again, which are what BraTS scores.
    With ``prediction_dir`` (the evaluation's output folder: ``@output_dir``, or ``@output_dir/fold_<F>``
    for a fold) the label map scored is also written there as inference names it (``run cv_summary``
    reads the folds' ones, and HD95 can be computed from it).
    """
    chain = _discrete(task)
    if task.region_based:
        chain.append(RegionsToLabelsd("pred"))
    chain += [
        Invertd(
            ["pred", "image"],
            transform=preprocessing,
            orig_keys="image",
            nearest_interp=[True, False],
            to_tensor=True,
        ),
        CheckSameGridd("pred", ref_key="label"),
    ]
    if prediction_dir is not None:
        chain.append(_writer(prediction_dir))
    if task.region_based:
        chain.append(MSDBrainTumourRegionsd(["pred", "label"]))
    return Compose(chain)


def evaluation_metric(task: TaskRecipe) -> dict:
    """Per-case, per-class Dice on the label's grid (false positives score 0), kept for ``metrics.json``."""
    from monai.handlers import IgniteMetricHandler, from_engine

    dice = LabelDiceMetric(
        num_classes=None if task.region_based else task.out_channels, include_background=task.region_based
    )
    return {
        "val_mean_dice": IgniteMetricHandler(
            metric_fn=dice, output_transform=from_engine(["pred", "label"]), save_details=True
        )
    }


def _writer(output_dir: str) -> SaveImaged:
    """``<case>_seg.nii.gz`` (uint8) on the grid the label map is on, named as inference names it."""
    import numpy as np

    return SaveImaged(
        "pred",
        output_dir=output_dir,
        output_postfix="seg",
        output_dtype=np.uint8,
        resample=False,
        separate_folder=False,
        output_name_formatter=output_name_formatter,
    )


def inference_postprocessing(
    task: TaskRecipe,
    preprocessing: Compose,
    output_dir: str,
    input_dir: str,
    postprocessing_file: str | None = None,
) -> Compose:
    """Label map, inverted to the input image's own grid, cleaned as cross-validation chose, written to ``output_dir``.

    ``<case>_seg.nii.gz`` (uint8); ``output_dir`` is refused when it is ``input_dir`` or inside it
    (:func:`custom.data.inputs.checked_output_dir`); names from :func:`custom.data.inputs.output_name_formatter`
    (DICOM series by folder). ``postprocessing_file`` (written by ``run cv_summary``) names the classes
    whose largest connected component alone is kept (:class:`custom.segmentation.postprocess.KeepLargestComponentsd`),
    on the grid the decision was scored on, the input's own.
    """
    chain = _discrete(task)
    if task.region_based:
        chain.append(RegionsToLabelsd("pred"))
    chain.append(Invertd("pred", transform=preprocessing, orig_keys="image", nearest_interp=True, to_tensor=True))
    if postprocessing_file is not None:
        chain.append(KeepLargestComponentsd("pred", decision_file=postprocessing_file))
    return Compose(chain + [_writer(checked_output_dir(output_dir, input_dir))])


def predictor(
    task: TaskRecipe,
    network: torch.nn.Module,
    runtime: torch.nn.Module | None = None,
    ensemble: Sequence[str] | None = None,
    tta: bool | Sequence[Sequence[int]] = False,
    device: Any = None,
) -> torch.nn.Module:
    """What the sliding window runs per window: the network (or its ONNX ``runtime``), or the mean of an
    ``ensemble`` of weight files and of mirrored copies (``tta``), in probabilities (softmax, or sigmoid for
    BrainTumour's regions): :func:`custom.inference.ensemble.ensemble_predictor`. With neither, the
    network itself, so the default path is unchanged."""
    activation = "sigmoid" if task.region_based else "softmax"
    return ensemble_predictor(network, ensemble, tta, activation=activation, device=device, predictor=runtime)


def cv_summary(
    task: TaskRecipe,
    cases: Sequence[Mapping[str, Any]],
    splits_file: str,
    num_folds: int,
    output_dir: str,
    nsd_tolerance_mm: float,
    decision_file: str,
    dataset_dir: str | None = None,
    class_names: Sequence[str] | None = None,
) -> dict:
    """``run cv_summary``: each fold's held-out predictions (``@output_dir/fold_<F>``) against their labels.

    Writes ``cv_summary.json``, ``cv_summary.md`` (Dice, HD95 in mm and NSD per class and mean, per fold
    and pooled) and the post-processing decision (``decision_file``); the classes are the task's, without
    background, or BrainTumour's three regions (:mod:`custom.segmentation.cv_summary`); ``class_names``
    (background first) where the task does not name them (BTCV: its metadata).
    """
    extra: dict[str, Any] = {}
    names = list(task.class_names if class_names is None else class_names)
    if task.region_based:
        extra["classes"] = list(BRATS_REGIONS.values())
    else:
        names = names[1:]
    return cv_summary_from_splits(
        cases,
        splits_file,
        num_folds,
        prediction_dir=f"{output_dir}/fold_{{fold}}",
        output_dir=output_dir,
        class_names=names,
        nsd_tolerance_mm=nsd_tolerance_mm,
        dataset_dir=dataset_dir,
        decision_file=decision_file,
        **extra,
    )


def model_handlers(
    model_file: str, bundle_root: str, network: torch.nn.Module, device: Any, desc: str, ensemble: Any = None
) -> list:
    """Evaluation and inference: load ``model_file`` (checksum checked, named errors), log, a progress bar.

    With an ``ensemble`` the predictor loads its own files, and ``network`` is left as it is.
    """
    from ignite.handlers import ProgressBar
    from monai.handlers import StatsHandler

    logs = [StatsHandler(iteration_log=False), ProgressBar(desc=desc)]
    if ensemble:
        return logs
    return [ModelLoader(verified_path(model_file, bundle_root=bundle_root), network, map_location=device), *logs]


def inference_handlers(
    task: TaskRecipe,
    model_file: str,
    bundle_root: str,
    network: torch.nn.Module,
    device: Any,
    output_dir: str,
    statistics: bool = True,
    preview: bool = True,
    dicom_seg: bool = True,
    ensemble: Any = None,
    class_names: Sequence[str] | None = None,
) -> list:
    """:func:`model_handlers` and the per-case outputs beside each label map (handlers, so MONAI Label never meets them):

    ``<case>_statistics.json`` and one ``statistics.csv`` (volume in ml, voxels, mean and std of the input
    intensity per class, border flag), ``<case>_preview.png`` (three views through the structures, legend),
    ``<case>_seg.dcm`` for a DICOM series input (needs highdicom). Class names: ``class_names``, else the
    task's; BrainTumour's label map holds MSD's label values, named as its dataset.json names them.
    """
    names = list(BRATS_LABELS if task.region_based else (task.class_names if class_names is None else class_names))
    outputs = [
        CaseStatistics(output_dir, class_names=names, enabled=statistics),
        CasePreview(output_dir, class_names=names, enabled=preview),
        CaseDicomSeg(output_dir, class_names=names, enabled=dicom_seg),
    ]
    return model_handlers(model_file, bundle_root, network, device, "segment", ensemble) + outputs


def evaluation_handlers(
    task: TaskRecipe,
    model_file: str,
    bundle_root: str,
    network: torch.nn.Module,
    device: Any,
    output_dir: str,
    ensemble: Any = None,
    class_names: Sequence[str] | None = None,
) -> list:
    """:func:`model_handlers` and the report: ``metrics.json`` by class name and a picture per case.

    The report runs on every DDP rank (it gathers the case names); the logs on rank 0 only
    (:func:`custom.engines.distributed.rank_handlers`).
    """
    *loader, stats, bar = model_handlers(model_file, bundle_root, network, device, "evaluate", ensemble)
    names = list(task.class_names if class_names is None else class_names)
    report = EvaluationReport(
        output_dir, class_names=names, metric_name="val_mean_dice", include_background=task.region_based
    )
    return [*loader, report, stats, bar]


def engine_options(amp_dtype: str, channels_last: bool = False) -> dict:
    """``amp_kwargs`` and ``to_kwargs`` of the engines: the AMP dtype by name, the memory format of the batch.

    >>> engine_options("bfloat16")["amp_kwargs"]["dtype"]
    torch.bfloat16
    """
    fmt = torch.channels_last_3d if require_bool(channels_last, "channels_last") else torch.contiguous_format
    return {"amp_kwargs": {"dtype": getattr(torch, amp_dtype)}, "to_kwargs": {"memory_format": fmt}}
