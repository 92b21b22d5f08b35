"""What makes a segmentation task itself: its classes, channels, spacing, intensity rule, crop and loss.

The BTCV and MSD bundles run one pipeline (:mod:`custom.segmentation.pipeline`); a :class:`TaskRecipe`
is everything it needs to know about the task. BTCV builds one in its ``configs/train.json`` from its
top-level values; MSD reads one from its table (:mod:`custom.segmentation.msd`) and the task folder's
``dataset.json``, then sets the same top-level values into it. MONAI has no such object: its bundles
spell the chain out per task, which is how the BTCV and MSD configs drifted apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = [
    "Augmentation",
    "BTCV_AUGMENTATION",
    "BRATS21_AUGMENTATION",
    "MIN_ITERATIONS",
    "TaskRecipe",
    "with_values",
    "intensity_transform",
    "training_crop",
    "task_loss",
]

#: the fewest iterations a task trains (our choice: a quarter of the research BTCV recipe's 5000 epochs x 24
#: cases = 120,000 steps, so that the tasks with 16-50 training cases still get a long cosine schedule)
MIN_ITERATIONS = 30_000


@dataclass(frozen=True)
class Augmentation:
    """The random part of a task's training transforms (read by ``configs/train.json``).

    ``crop`` is ``"pos_neg"`` (``RandCropByPosNegLabeld``, pos 1 neg 1: half the crops centred on a
    labelled voxel) or ``"random"`` (``RandSpatialCropSamplesd``: uniform position). Flips are per axis,
    each with ``flip_prob``; ``rotate90_prob`` 0 leaves out the 90-degree rotation; intensity scale and
    shift (factor and offset 0.1) each with ``intensity_prob``.
    """

    crop: str = "pos_neg"
    flip_prob: float = 0.2
    rotate90_prob: float = 0.2
    intensity_prob: float = 0.1

    def __post_init__(self) -> None:
        if self.crop not in ("pos_neg", "random"):
            raise ValueError(f"Augmentation.crop must be 'pos_neg' or 'random', got {self.crop!r}")


#: research BTCV (``SwinUNETR/BTCV/main.py`` defaults: RandFlipd_prob 0.2, RandRotate90d_prob 0.2,
#: RandScale/ShiftIntensityd_prob 0.1; ``utils/data_utils.py``: RandCropByPosNegLabeld pos 1 neg 1)
BTCV_AUGMENTATION = Augmentation()
#: research BRATS21 (``SwinUNETR/BRATS21/utils/data_utils.py``): RandSpatialCropd, flips p 0.5 per axis,
#: intensity scale/shift p 1.0, no rotation
BRATS21_AUGMENTATION = Augmentation("random", flip_prob=0.5, rotate90_prob=0.0, intensity_prob=1.0)


@dataclass(frozen=True)
class TaskRecipe:
    """How one segmentation task is trained (an MSD task, or BTCV).

    ``window`` is set for CT (HU range to 0..1), None for z-score (MRI).

    ``roi_size`` entries are multiples of 32 (Swin UNETR needs it); volumes smaller than the ROI are
    zero-padded before cropping. ``max_iterations`` is the training length in optimizer steps (the
    bundle derives ``max_epochs`` from it); the learning rate warms up over ``warmup_fraction`` of it,
    then follows a cosine to 0 at its end.
    """

    name: str
    modality: str  # "CT" or "MRI"
    pixdim: tuple[float, float, float]
    roi_size: tuple[int, int, int]
    window: tuple[float, float] | None = None
    num_samples: int = 2
    region_based: bool = False
    ssl_weights_suit: bool = False
    in_channels: int = 1
    class_names: tuple[str, ...] = field(default=())
    num_labels: int = 0  # label values in the files (dataset.json "labels"), background included
    max_iterations: int = MIN_ITERATIONS
    warmup_fraction: float = 0.01  # research BTCV: 50 warm-up epochs of 5000
    augmentation: Augmentation = BTCV_AUGMENTATION

    @property
    def out_channels(self) -> int:
        """Network outputs: one per region (sigmoid), or one per class, background first (softmax).

        From ``class_names`` where the task names them (MSD, from dataset.json), else ``num_labels``
        (BTCV: its names are in the bundle's metadata, read where they are needed).
        """
        return len(self.class_names) if self.class_names else self.num_labels

    def __post_init__(self) -> None:
        # a config gives lists (JSON) and an Augmentation as a dict; the recipe keeps tuples, hashable and frozen
        for name in ("pixdim", "roi_size", "window", "class_names"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.augmentation, Mapping):
            object.__setattr__(self, "augmentation", Augmentation(**self.augmentation))
        if not self.region_based and self.num_labels and self.class_names and len(self.class_names) != self.num_labels:
            raise ValueError(
                f"task {self.name}: {len(self.class_names)} class names {list(self.class_names)} but "
                f"num_labels (num_classes) {self.num_labels}: the network's outputs and the class names must agree"
            )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "out_channels": self.out_channels}


def with_values(task: TaskRecipe, augmentation: Mapping[str, Any] | None = None, **values: Any) -> TaskRecipe:
    """``task`` with the bundle's top-level values put in (``pixdim``, ``roi_size``, ``num_samples``, ...).

    This is how a command-line override reaches the pipeline: MSD's ``configs/train.json`` defaults each
    top-level id to the task table's value (``"pixdim": "$list(@task_table.pixdim)"``) and builds the
    task the pipeline reads from them, so ``--pixdim "[2, 2, 2]"`` changes what is resampled. ``None``
    values are left as the task has them; ``augmentation`` entries replace the task's one by one.

    >>> t = TaskRecipe("Spleen", "CT", (1.5, 1.5, 2.0), (96, 96, 96), (-57.0, 164.0))
    >>> with_values(t, pixdim=[2, 2, 2], augmentation={"flip_prob": 0.5}).pixdim
    (2, 2, 2)
    """
    changes = {k: v for k, v in values.items() if v is not None}
    if augmentation:
        changes["augmentation"] = replace(task.augmentation, **{k: v for k, v in augmentation.items() if v is not None})
    return replace(task, **changes)


def intensity_transform(recipe: TaskRecipe, keys: KeysCollection = "image") -> MapTransform:
    """CT: window ``recipe.window`` HU to 0..1, clipped. MRI: z-score over non-zero voxels, per channel."""
    from monai.transforms import NormalizeIntensityd, ScaleIntensityRanged

    if recipe.window is not None:
        return ScaleIntensityRanged(
            keys, a_min=recipe.window[0], a_max=recipe.window[1], b_min=0.0, b_max=1.0, clip=True
        )
    return NormalizeIntensityd(keys, nonzero=True, channel_wise=True)


def training_crop(
    recipe: TaskRecipe, keys: KeysCollection, roi_size: list[int], num_samples: int, label_key: str = "label"
) -> MapTransform:
    """The random crop of ``recipe.augmentation``: ``num_samples`` crops of ``roi_size`` per volume.

    ``"pos_neg"``: ``RandCropByPosNegLabeld`` (pos 1, neg 1, centres on voxels of the image above 0);
    ``"random"``: ``RandSpatialCropSamplesd`` at a fixed size (``RandSpatialCropd`` of the research
    BRATS21 code, as a list of ``num_samples`` crops).
    """
    from monai.transforms import RandCropByPosNegLabeld, RandSpatialCropSamplesd

    if recipe.augmentation.crop == "random":
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

    >>> import torch
    >>> recipe = TaskRecipe("BrainTumour", "MRI", (1.0, 1.0, 1.0), (128, 128, 128), region_based=True)
    >>> type(task_loss(recipe)).__name__
    'DiceLoss'
    """
    from monai.losses import DiceCELoss, DiceLoss

    if recipe.region_based:
        return DiceLoss(to_onehot_y=False, sigmoid=True)
    return DiceCELoss(to_onehot_y=True, softmax=True)
