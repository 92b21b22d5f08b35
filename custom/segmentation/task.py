"""One task vocabulary: what a segmentation task is, the table of the tasks this collection knows, and how
each value becomes a MONAI object.

Every recipe value has one name, the same as a field of :class:`TaskRecipe`, as a top-level id of both
fine-tuning bundles' ``configs/train.json`` and as a key of the recipe saved in ``model.pt``
(``custom.networks.recipe``): ``pixdim``, ``roi_size``, ``intensity_range``, ``num_samples``, ``crop``,
``flip_prob``, ``rotate90_prob``, ``intensity_augment_prob``, ``max_iterations``, ``warmup_fraction``.
How a value reaches the pipeline, the same way in both bundles:

1. :data:`TASKS` (this file) holds each task's defaults, each with its source (BTCV and the ten
   Decathlon tasks; a task folder's ``dataset.json`` adds its channels and class names:
   ``custom.segmentation.msd.load_task``);
2. the bundle's top-level ids default to them (``"intensity_range": "$@task_table.intensity_range"``),
   and the command line overrides them (``--intensity_range "[-100, 240]"``);
3. ``task`` (:func:`with_values`) puts them back into the :class:`TaskRecipe` the pipeline builders read
   (``custom.segmentation.pipeline``);
4. the functions below turn each into its MONAI object: ``intensity_range`` into ``ScaleIntensityRanged``
   (:func:`intensity_transform`), the crop into ``RandCropByPosNegLabeld`` (:func:`training_crop`), the
   outputs into the loss (:func:`task_loss`).

Each bundle's ``docs/README.md`` carries the table of these values (config id, default and source,
the MONAI object it reaches), generated from :data:`RECIPE_VALUES` and :data:`TASKS` and kept in
agreement with the configs by a test. MONAI has no such object: its bundles spell the chain out per
task, which is how the model zoo's BTCV and spleen configs drifted apart.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from monai.config import KeysCollection
from monai.losses import DiceCELoss, DiceLoss
from monai.transforms import (
    MapTransform,
    NormalizeIntensityd,
    RandCropByPosNegLabeld,
    RandSpatialCropSamplesd,
    ScaleIntensityRanged,
)

__all__ = [
    "Augmentation",
    "BTCV_AUGMENTATION",
    "BRATS21_AUGMENTATION",
    "MIN_ITERATIONS",
    "TaskRecipe",
    "TASKS",
    "RECIPE_VALUES",
    "RecipeValue",
    "task_for",
    "task_from_recipe",
    "task_from_metadata",
    "with_values",
    "intensity_transform",
    "training_crop",
    "task_loss",
]

#: the fewest iterations a task trains (our choice: a quarter of the research BTCV recipe's 5000 epochs x 24
#: cases = 120,000 steps, so that the tasks with 16-50 training cases still get a long cosine schedule)
MIN_ITERATIONS = 30_000


@dataclass(frozen=True, kw_only=True)
class Augmentation:
    """The random part of a task's training transforms.

    ``crop`` is ``"pos_neg"`` (``RandCropByPosNegLabeld``, pos 1 neg 1: half the crops centred on a
    labelled voxel) or ``"random"`` (``RandSpatialCropSamplesd``: uniform position). Flips are per axis,
    each with ``flip_prob``; ``rotate90_prob`` 0 leaves out the 90-degree rotation; intensity scale and
    shift (factor and offset 0.1) each with ``intensity_augment_prob``.
    """

    crop: str = "pos_neg"
    flip_prob: float = 0.2
    rotate90_prob: float = 0.2
    intensity_augment_prob: float = 0.1

    def __post_init__(self) -> None:
        if self.crop not in ("pos_neg", "random"):
            raise ValueError(f"Augmentation.crop must be 'pos_neg' or 'random', got {self.crop!r}")


#: research BTCV (``SwinUNETR/BTCV/main.py`` defaults: RandFlipd_prob 0.2, RandRotate90d_prob 0.2,
#: RandScale/ShiftIntensityd_prob 0.1; ``utils/data_utils.py``: RandCropByPosNegLabeld pos 1 neg 1)
BTCV_AUGMENTATION = Augmentation()
#: research BRATS21 (``SwinUNETR/BRATS21/utils/data_utils.py``): RandSpatialCropd, flips p 0.5 per axis,
#: intensity scale/shift p 1.0, no rotation
BRATS21_AUGMENTATION = Augmentation(crop="random", flip_prob=0.5, rotate90_prob=0.0, intensity_augment_prob=1.0)


@dataclass(frozen=True, kw_only=True)
class TaskRecipe:
    """How one segmentation task is trained (BTCV, a Decathlon task, or a task folder of the user's).

    Args:
        name: the task's name (a key of :data:`TASKS` for the known ones).
        modality: ``"CT"`` or ``"MRI"`` (anything not CT is normalised as MRI).
        pixdim: the spacing every image is resampled to, in mm.
        roi_size: training crop and sliding-window size; multiples of 32 (Swin UNETR needs it); volumes
            smaller than the ROI are zero-padded before cropping.
        intensity_range: CT: the HU window scaled to 0..1, clipped; None: z-score over non-zero voxels,
            per channel (MRI).
        num_samples: training crops per volume.
        region_based: overlapping regions (BrainTumour: one sigmoid output each) instead of exclusive classes.
        ssl_weights_suit: whether the SSL encoder (pre-trained on one-channel CT) suits the task.
        in_channels: input channels (image modalities).
        class_names: the network's outputs by index (background first for exclusive classes).
        num_labels: label values in the files, background included (differs from the outputs for regions).
        max_iterations: training length in optimizer steps (the bundles derive ``max_epochs`` from it).
        warmup_fraction: the learning rate warms up over this fraction of ``max_iterations``, then
            follows a cosine to 0 at its end.
        augmentation: the random transforms of training.
        sources: where each default comes from, by field name (shown in the docs; not saved).
    """

    name: str
    modality: str
    pixdim: tuple[float, float, float]
    roi_size: tuple[int, int, int]
    intensity_range: tuple[float, float] | None = None
    num_samples: int = 2
    region_based: bool = False
    ssl_weights_suit: bool = False
    in_channels: int = 1
    class_names: tuple[str, ...] = ()
    num_labels: int = 0
    max_iterations: int = MIN_ITERATIONS
    warmup_fraction: float = 0.01  # research BTCV: 50 warm-up epochs of 5000
    augmentation: Augmentation = BTCV_AUGMENTATION
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def out_channels(self) -> int:
        """Network outputs: one per region (sigmoid), or one per class, background first (softmax)."""
        return len(self.class_names) if self.class_names else self.num_labels

    def __post_init__(self) -> None:
        # a config gives lists (JSON) and an Augmentation as a dict; the recipe keeps tuples, hashable and frozen
        for name in ("pixdim", "roi_size", "intensity_range", "class_names"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.augmentation, Mapping):
            object.__setattr__(self, "augmentation", Augmentation(**self.augmentation))
        for name, size in (("pixdim", 3), ("roi_size", 3), ("intensity_range", 2)):
            value = getattr(self, name)
            if value is not None and len(value) != size:
                raise ValueError(f"task {self.name}: {name} must have {size} values, got {list(value)}")
        if not self.region_based and self.num_labels and self.class_names and len(self.class_names) != self.num_labels:
            raise ValueError(
                f"task {self.name}: {len(self.class_names)} class names {list(self.class_names)} but "
                f"num_labels (num_classes) {self.num_labels}: the network's outputs and the class names must agree"
            )

    def as_dict(self) -> dict[str, Any]:
        """The task as JSON-like data (what ``model.pt`` saves under ``recipe["task"]``), its sources left out."""
        values = asdict(self)
        values.pop("sources")
        return json.loads(json.dumps(values))


#: field names of :class:`TaskRecipe` (the keys of a saved task)
_TASK_FIELDS = tuple(f.name for f in fields(TaskRecipe) if f.name != "sources")
#: field names of :class:`Augmentation`
_AUGMENTATION_FIELDS = tuple(f.name for f in fields(Augmentation))

# -- the table -----------------------------------------------------------------------------------------------
#: "research BTCV" and "research BRATS21" name the paper's code, Project-MONAI/research-contributions
#: ``SwinUNETR/BTCV`` and ``SwinUNETR/BRATS21`` (``main.py`` defaults and README commands, ``utils/data_utils.py``)
_BTCV_SOURCES = {
    "pixdim": "research BTCV (`--space_x/y/z` 1.5, 1.5, 2.0)",
    "roi_size": "research BTCV (`--roi_x/y/z` 96)",
    "intensity_range": "research BTCV (`--a_min -175 --a_max 250`)",
    "num_samples": "research BTCV (`RandCropByPosNegLabeld(num_samples=4)`)",
    "crop": "research BTCV (`RandCropByPosNegLabeld`, pos 1, neg 1)",
    "flip_prob": "research BTCV (`--RandFlipd_prob 0.2`)",
    "rotate90_prob": "research BTCV (`--RandRotate90d_prob 0.2`)",
    "intensity_augment_prob": "research BTCV (`--RandScaleIntensityd_prob`, `--RandShiftIntensityd_prob` 0.1)",
    "max_iterations": "research BTCV: 5000 epochs x 24 training cases, batch 1",
    "warmup_fraction": "research BTCV: 50 warm-up epochs of 5000",
    "class_names": "BTCV's 13 organs (the bundle's metadata, which MONAI Label reads)",
}
#: what the ten Decathlon tasks share, and what differs (the MSD bundle's docs list every value)
_MSD_CT = {
    "roi_size": "research BTCV (`--roi_x/y/z` default 96)",
    "num_samples": "our choice: research BTCV takes 4 crops per volume; 2 is not measured",
    "crop": "research BTCV (`RandCropByPosNegLabeld`, pos 1, neg 1)",
    "flip_prob": "research BTCV",
    "rotate90_prob": "research BTCV",
    "intensity_augment_prob": "research BTCV",
    "max_iterations": "our choice: max(30,000, 300 x fold 0's training cases), 300 passes as research BRATS21",
    "warmup_fraction": "research BTCV's proportion (50 of 5000 epochs)",
    "pixdim": "our choice: near the task's usual voxel size, not a measured optimum",
    "class_names": "the task folder's dataset.json `labels`",
}
_MSD_MRI = {
    **_MSD_CT,
    "intensity_range": "research BRATS21: z-score over non-zero voxels per channel (no window)",
    "roi_size": "our choice, not measured: each side a multiple of 32",
}
_ABDOMINAL = "our choice: research BTCV's abdominal window, reused for this abdominal task"


def _msd(name: str, modality: str, sources: Mapping[str, str], **values: Any) -> TaskRecipe:
    base = _MSD_CT if modality == "CT" else _MSD_MRI
    return TaskRecipe(
        name=name, modality=modality, ssl_weights_suit=modality == "CT", sources={**base, **sources}, **values
    )


#: BTCV and the ten Decathlon tasks, by name. A Decathlon task's channels and class names come from its folder's
#: dataset.json (``custom.segmentation.msd.load_task``); BTCV's are its 13 organs.
TASKS: dict[str, TaskRecipe] = {
    "BTCV": TaskRecipe(
        name="BTCV",
        modality="CT",
        pixdim=(1.5, 1.5, 2.0),
        roi_size=(96, 96, 96),
        intensity_range=(-175.0, 250.0),
        num_samples=4,
        ssl_weights_suit=True,
        class_names=(
            "background",
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
        ),
        num_labels=14,
        max_iterations=120_000,
        warmup_fraction=0.01,
        sources=_BTCV_SOURCES,
    ),
    "BrainTumour": _msd(
        "BrainTumour",
        "MRI",
        {
            "pixdim": "our choice: MSD Task01 is already at 1 mm (research BRATS21 does not resample)",
            "roi_size": "research BRATS21 (`--roi_x/y/z=128`)",
            "num_samples": "research BRATS21 (`RandSpatialCropd`, batch 1)",
            "crop": "research BRATS21 (`RandSpatialCropd`, `random_size=False`)",
            "flip_prob": "research BRATS21",
            "rotate90_prob": "research BRATS21 (no rotation)",
            "intensity_augment_prob": "research BRATS21",
            "max_iterations": "research BRATS21: 300 epochs x 387 training cases of fold 0",
            "warmup_fraction": "research BRATS21 (`--warmup_epochs 50` of 300)",
            "class_names": "the BraTS evaluation regions (tumour core, whole tumour, enhancing tumour)",
        },
        pixdim=(1.0, 1.0, 1.0),
        roi_size=(128, 128, 128),
        num_samples=1,
        region_based=True,
        max_iterations=116_100,
        warmup_fraction=50 / 300,
        augmentation=BRATS21_AUGMENTATION,
    ),
    "Heart": _msd("Heart", "MRI", {}, pixdim=(1.25, 1.25, 1.37), roi_size=(128, 128, 96)),
    "Liver": _msd(
        "Liver",
        "CT",
        {"intensity_range": _ABDOMINAL},
        pixdim=(1.5, 1.5, 2.0),
        roi_size=(96, 96, 96),
        intensity_range=(-175.0, 250.0),
        max_iterations=31_200,
    ),
    "Hippocampus": _msd(
        "Hippocampus",
        "MRI",
        {"roi_size": "our choice: the smallest crop the network takes (the volumes are about 35 x 50 x 35)"},
        pixdim=(1.0, 1.0, 1.0),
        roi_size=(64, 64, 64),
        max_iterations=62_400,
    ),
    "Prostate": _msd("Prostate", "MRI", {}, pixdim=(0.6, 0.6, 3.6), roi_size=(160, 160, 32)),
    "Lung": _msd(
        "Lung",
        "CT",
        {"intensity_range": "our choice: a lung window"},
        pixdim=(1.0, 1.0, 1.5),
        roi_size=(96, 96, 96),
        intensity_range=(-1000.0, 500.0),
    ),
    "Pancreas": _msd(
        "Pancreas",
        "CT",
        {"intensity_range": _ABDOMINAL},
        pixdim=(1.0, 1.0, 1.5),
        roi_size=(96, 96, 96),
        intensity_range=(-175.0, 250.0),
        max_iterations=67_200,
    ),
    "HepaticVessel": _msd(
        "HepaticVessel",
        "CT",
        {"intensity_range": "our choice: a window on contrast-enhanced liver vessels"},
        pixdim=(0.8, 0.8, 1.5),
        roi_size=(96, 96, 96),
        intensity_range=(-100.0, 300.0),
        max_iterations=72_600,
    ),
    "Spleen": _msd(
        "Spleen",
        "CT",
        {"intensity_range": "MONAI's spleen tutorials (`ScaleIntensityRanged(a_min=-57, a_max=164)`)"},
        pixdim=(1.5, 1.5, 2.0),
        roi_size=(96, 96, 96),
        intensity_range=(-57.0, 164.0),
    ),
    "Colon": _msd(
        "Colon",
        "CT",
        {"intensity_range": _ABDOMINAL},
        pixdim=(1.0, 1.0, 1.5),
        roi_size=(96, 96, 96),
        intensity_range=(-175.0, 250.0),
    ),
}


@dataclass(frozen=True)
class RecipeValue:
    """One row of the recipe table in the bundles' docs: a config id, the task field it sets, what it reaches."""

    config_id: str
    meaning: str
    reaches: str


#: every recipe value a user may change: the top-level id (the same in both fine-tuning bundles and in the saved
#: recipe), its meaning, and the MONAI object it reaches. The docs' recipe table is generated from this and TASKS.
RECIPE_VALUES: tuple[RecipeValue, ...] = (
    RecipeValue("pixdim", "spacing every image is resampled to (mm), after orientation to RAS", "`Spacingd(pixdim)`"),
    RecipeValue(
        "intensity_range",
        "CT window in HU, scaled to 0..1 and clipped; null: z-score (MRI)",
        "`ScaleIntensityRanged(a_min, a_max, b_min=0, b_max=1, clip=True)`; null: "
        "`NormalizeIntensityd(nonzero=True, channel_wise=True)`",
    ),
    RecipeValue(
        "roi_size",
        "training crop and sliding-window size (multiples of 32)",
        "`SpatialPadd`, the training crop, `SlidingWindowInferer(roi_size)`",
    ),
    RecipeValue("num_samples", "training crops per volume", "the training crop's `num_samples`"),
    RecipeValue(
        "crop",
        '`"pos_neg"`: half the crops centred on a labelled voxel; `"random"`: uniform',
        "`RandCropByPosNegLabeld(pos=1, neg=1)` or `RandSpatialCropSamplesd`",
    ),
    RecipeValue("flip_prob", "flip probability, each axis", "`RandFlipd(spatial_axis=[a], prob)` for a = 0, 1, 2"),
    RecipeValue("rotate90_prob", "90-degree rotation probability", "`RandRotate90d(prob, max_k=3)`"),
    RecipeValue(
        "intensity_augment_prob",
        "intensity scale and shift by 0.1, each with this probability",
        "`RandScaleIntensityd(factors=0.1, prob)`, `RandShiftIntensityd(offsets=0.1, prob)`",
    ),
    RecipeValue(
        "max_iterations",
        "training length in optimizer steps",
        "`SupervisedTrainer(max_epochs=ceil(max_iterations / steps per epoch))`, `WarmupCosineSchedule(t_total)`",
    ),
    RecipeValue(
        "warmup_fraction", "linear warm-up, as a fraction of the training", "`WarmupCosineSchedule(warmup_steps)`"
    ),
)


def task_for(name: str) -> TaskRecipe:
    """The table's task ``name`` (:data:`TASKS`).

    Raises:
        KeyError: an unknown name; the message lists the known ones.

    >>> task_for("BTCV").intensity_range
    (-175.0, 250.0)
    """
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}: the table knows {sorted(TASKS)}")
    return TASKS[name]


def task_from_recipe(saved: Mapping[str, Any]) -> TaskRecipe:
    """The task saved with the weights (``recipe["task"]``), as a :class:`TaskRecipe`.

    Values the file does not hold (files written before a field existed) are the table's for a known task
    name, else the dataclass defaults. Reads every format this collection has written: the first one
    named the window ``window`` and the augmentation's intensity probability ``intensity_prob``.

    >>> task_from_recipe({"name": "BTCV", "pixdim": [3, 3, 3], "window": [-100, 200]}).intensity_range
    (-100, 200)
    """
    values = dict(saved)
    if "window" in values and "intensity_range" not in values:
        values["intensity_range"] = values.pop("window")
    augmentation = dict(values.get("augmentation") or {})
    if "intensity_prob" in augmentation:
        augmentation.setdefault("intensity_augment_prob", augmentation.pop("intensity_prob"))
    values = {k: v for k, v in values.items() if k in _TASK_FIELDS}
    base = TASKS.get(str(values.get("name")))
    if base is not None:
        augmentation = {**asdict(base.augmentation), **augmentation}
        values = {**{k: getattr(base, k) for k in _TASK_FIELDS}, **values}
        values["sources"] = base.sources
    values["augmentation"] = {k: v for k, v in augmentation.items() if k in _AUGMENTATION_FIELDS}
    return TaskRecipe(**values)


def task_from_metadata(meta_file: str | os.PathLike) -> TaskRecipe:
    """The task a bundle's ``configs/metadata.json`` declares: its ``task`` names a task of the table
    (``"MSD Spleen segmentation"``), its ``network_data_format`` gives the channels and class names.

    What the model zoo's checks and ``verify_net_in_out`` build when there are neither weights nor data.

    Raises:
        ValueError: the metadata names no task of the table, or its channels are not 0..N-1.
    """
    with open(meta_file, encoding="utf-8") as f:
        meta = json.load(f)
    text = str(meta.get("task", ""))
    names = [n for n in TASKS if n in text.split() or f"({n}," in text]
    if not names:
        raise ValueError(f"{meta_file}: its task {text!r} names none of the table's tasks {sorted(TASKS)}")
    fmt = meta["network_data_format"]
    channel_def = fmt["outputs"]["pred"]["channel_def"]
    if sorted(int(k) for k in channel_def) != list(range(len(channel_def))):
        raise ValueError(f"{meta_file}: channel_def keys must be 0..{len(channel_def) - 1}, got {list(channel_def)}")
    base = TASKS[names[0]]
    class_names = tuple(channel_def[str(i)] for i in range(len(channel_def)))
    return replace(
        base,
        in_channels=int(fmt["inputs"]["image"]["num_channels"]),
        class_names=class_names,
        num_labels=base.num_labels if base.region_based else len(class_names),
    )


def with_values(task: TaskRecipe, augmentation: Mapping[str, Any] | None = None, **values: Any) -> TaskRecipe:
    """``task`` with the bundle's top-level values put in (``pixdim``, ``roi_size``, ``intensity_range``, ...).

    This is how a command-line override reaches the pipeline: each top-level id defaults to the table's value
    (``"pixdim": "$list(@task_table.pixdim)"``) and the bundle builds the task the pipeline reads from them,
    so ``--pixdim "[2, 2, 2]"`` changes what is resampled. ``None`` values are left as the task has them;
    ``augmentation`` entries replace the task's one by one.

    >>> t = task_for("Spleen")
    >>> with_values(t, pixdim=[2, 2, 2], augmentation={"flip_prob": 0.5}).pixdim
    (2, 2, 2)
    """
    changes = {k: v for k, v in values.items() if v is not None}
    if augmentation:
        changes["augmentation"] = replace(task.augmentation, **{k: v for k, v in augmentation.items() if v is not None})
    return replace(task, **changes)


# -- from the values to MONAI's objects -----------------------------------------------------------------------
def intensity_transform(task: TaskRecipe, keys: KeysCollection = "image") -> MapTransform:
    """``task.intensity_range`` (CT): HU window to 0..1, clipped. None (MRI): z-score over non-zero voxels, per channel."""
    if task.intensity_range is not None:
        a_min, a_max = task.intensity_range
        return ScaleIntensityRanged(keys, a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=True)
    return NormalizeIntensityd(keys, nonzero=True, channel_wise=True)


def training_crop(
    task: TaskRecipe, keys: KeysCollection, roi_size: list[int], num_samples: int, label_key: str = "label"
) -> MapTransform:
    """The random crop of ``task.augmentation``: ``num_samples`` crops of ``roi_size`` per volume.

    ``"pos_neg"``: ``RandCropByPosNegLabeld`` (pos 1, neg 1, centres on voxels of the image above 0);
    ``"random"``: ``RandSpatialCropSamplesd`` at a fixed size (``RandSpatialCropd`` of the research
    BRATS21 code, as a list of ``num_samples`` crops).
    """
    if task.augmentation.crop == "random":
        return RandSpatialCropSamplesd(keys, roi_size=roi_size, num_samples=num_samples, random_size=False)
    return RandCropByPosNegLabeld(
        keys,
        label_key=label_key,
        spatial_size=roi_size,
        pos=1,
        neg=1,
        num_samples=num_samples,
        image_key="image",
        image_threshold=0,
    )


def task_loss(recipe: TaskRecipe) -> torch.nn.Module:
    """The training loss for ``recipe``'s outputs (network logits ``(B, C, X, Y, Z)``).

    - Overlapping regions (BrainTumour TC/WT/ET, one sigmoid channel each): ``DiceLoss(sigmoid=True)``,
      Dice per region, smooth 1e-5 (research BRATS21 ``main.py`` default). Not ``DiceCELoss``: in MONAI
      1.6 its cross entropy with several channels is softmax over the channels, which does not change when
      every logit shifts by a constant and is zero on background voxels, so it never penalises a wrong
      sigmoid probability.
    - Exclusive classes (all other tasks): ``DiceCELoss(to_onehot_y=True, softmax=True)`` on a label map
      ``(B, 1, X, Y, Z)``, smooth 1e-5 (research BTCV ``main.py`` default; its README command does not
      pass ``--squared_dice``).

    >>> type(task_loss(task_for("BrainTumour"))).__name__
    'DiceLoss'
    """
    if recipe.region_based:
        return DiceLoss(to_onehot_y=False, sigmoid=True)
    return DiceCELoss(to_onehot_y=True, softmax=True)
