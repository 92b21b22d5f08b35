"""Medical Segmentation Decathlon: one table of task recipes, read together with each task's dataset.json.

MONAI reads the decathlon datalist (``load_decathlon_datalist``) and its properties
(``load_decathlon_properties``) but has no notion of a task's recipe, nor of the MSD BrainTumour
label numbering: MONAI's ``ConvertToMultiChannelBasedOnBratsClassesd`` assumes the BraTS challenge
labels (1 necrosis, 2 edema, 4 enhancing), while MSD Task01 numbers them 1 edema, 2 non-enhancing
tumour, 3 enhancing tumour. :class:`MSDBrainTumourRegionsd` converts the MSD numbering into the three
BraTS evaluation regions and :class:`RegionsToLabelsd` converts predicted regions back.

What comes from ``dataset.json``: the task name, input channels (``modality``), class names
(``labels``), the training list. What comes from :data:`TASK_RECIPES`: target spacing, ROI, intensity
normalisation (CT window or per-channel z-score over non-zero voxels), crops per volume, whether the
outputs are overlapping regions (sigmoid) or exclusive classes (softmax), whether SSL encoder
weights (pre-trained on CT, one input channel) suit the task, the training length in iterations with
its warm-up, and the augmentation (:class:`Augmentation`). The spacings, windows and ROIs are this
collection's choices, close to each task's typical voxel size; every one can be overridden. The
sources of every value are listed in the bundle's ``docs/README.md``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Hashable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform

from custom.data.inputs import read_datalist
from custom.networks.recipe import RecipeMismatchError, normalize_recipe
from custom.segmentation.folds import case_id, fold_datalist, round_robin_splits
from custom.segmentation.task import MIN_ITERATIONS, TASKS, TaskRecipe, task_from_metadata, task_from_recipe

__all__ = [
    "TASK_RECIPES",
    "BRATS_REGIONS",
    "BRATS_LABELS",
    "TaskError",
    "load_task",
    "msd_datalist",
    "MSDBrainTumourRegionsd",
    "RegionsToLabelsd",
    "MSD_TRAINING_CASES",
    "default_max_iterations",
    "metadata_for_task",
    "task_from_weights",
]

logger = logging.getLogger(__name__)

#: BraTS evaluation regions from MSD Task01 labels (1 edema, 2 non-enhancing tumour, 3 enhancing tumour)
BRATS_REGIONS: dict[str, tuple[int, ...]] = {
    "tumour core": (2, 3),
    "whole tumour": (1, 2, 3),
    "enhancing tumour": (3,),
}


#: what MSD Task01's label values are (its dataset.json ``labels``): the label map inference writes for BrainTumour
BRATS_LABELS: tuple[str, ...] = ("background", "edema", "non-enhancing tumour", "enhancing tumour")

#: labelled cases per task, MSD's ``numTraining`` (Antonelli et al., Nature Communications 13, 4128, 2022)
MSD_TRAINING_CASES: dict[str, int] = {
    "BrainTumour": 484,
    "Heart": 20,
    "Liver": 131,
    "Hippocampus": 260,
    "Prostate": 32,
    "Lung": 63,
    "Pancreas": 281,
    "HepaticVessel": 303,
    "Spleen": 41,
    "Colon": 126,
}
#: passes over the training cases: the research BRATS21 recipe's 300 epochs
#: (Project-MONAI/research-contributions ``SwinUNETR/BRATS21/main.py``, ``--max_epochs`` default)
TRAINING_PASSES = 300


def default_max_iterations(num_cases: int, num_folds: int = 5) -> int:
    """Training length in iterations for a task of ``num_cases`` labelled cases (our rule, see the docs).

    ``max(MIN_ITERATIONS, TRAINING_PASSES x training cases)``, the training cases being those of fold 0
    of :func:`msd_datalist` (``num_cases`` minus every ``num_folds``-th case).

    >>> default_max_iterations(484), default_max_iterations(41)
    (116100, 30000)
    """
    training_cases = num_cases - math.ceil(num_cases / num_folds)
    return max(MIN_ITERATIONS, TRAINING_PASSES * training_cases)


class TaskError(ValueError):
    """The task folder or its dataset.json cannot be used; the message names the file."""


#: the ten official tasks (:data:`custom.segmentation.task.TASKS` less BTCV); class names and channels are filled
#: in from dataset.json by :func:`load_task`. ``max_iterations`` = :func:`default_max_iterations` of the task's
#: :data:`MSD_TRAINING_CASES` (a test keeps them so).
TASK_RECIPES: dict[str, TaskRecipe] = {name: TASKS[name] for name in MSD_TRAINING_CASES}


def _task_name(meta: Mapping, folder: Path) -> str:
    """``dataset.json`` "name" (``BRATS``, ``Spleen``, ...) or the folder's ``TaskNN_Name``."""
    m = re.match(r"Task\d+_(\w+)$", folder.name)
    if m and m.group(1) in TASK_RECIPES:
        return m.group(1)
    name = str(meta.get("name", ""))
    aliases = {"BRATS": "BrainTumour", "LeftAtrium": "Heart", "HepaticVessels": "HepaticVessel"}
    name = aliases.get(name, name)
    return name if name in TASK_RECIPES else (m.group(1) if m else name)


def _read_dataset_json(dataset_dir: Path) -> dict:
    path = dataset_dir / "dataset.json"
    if not path.is_file():
        raise TaskError(f"{path}: not found (point --dataset_dir at an unpacked MSD task folder, e.g. Task09_Spleen)")
    try:
        meta = read_datalist(path, "training")
    except ValueError as e:
        raise TaskError(str(e)) from e
    missing = [k for k in ("modality", "labels", "training") if k not in meta]
    if missing:
        raise TaskError(f"{path}: missing {missing}: every MSD dataset.json declares modality, labels and training")
    return meta


def _derived_recipe(name: str, meta: dict, dataset_dir: Path) -> TaskRecipe:
    """Defaults for a task not in the table: CT window or z-score by modality, median spacing, ROI 96^3,
    the training length of :func:`default_max_iterations` for its number of training cases."""
    import nibabel as nib

    ct = any("CT" in str(v).upper() for v in meta["modality"].values())
    spacings = []
    for item in meta["training"][:20]:
        try:
            spacings.append(nib.load(str(dataset_dir / str(item["image"]).lstrip("./"))).header.get_zooms()[:3])
        except Exception:  # unreadable files are reported by check_data, not here
            continue
    pixdim = tuple(float(v) for v in np.median(spacings, axis=0)) if spacings else (1.0, 1.0, 1.0)
    return TaskRecipe(
        name=name or dataset_dir.name,
        modality="CT" if ct else "MRI",
        pixdim=pixdim,
        roi_size=(96, 96, 96),
        intensity_range=(-175.0, 250.0) if ct else None,
        ssl_weights_suit=ct,
        max_iterations=default_max_iterations(len(meta["training"])),
        sources={
            "pixdim": "the median spacing of the task folder's training images",
            "roi_size": "our default for a task not in the table",
            "intensity_range": "research BTCV's abdominal window for CT; z-score otherwise",
            "max_iterations": "our rule: max(30,000, 300 x fold 0's training cases)",
        },
    )


def load_task(dataset_dir: str | os.PathLike) -> TaskRecipe:
    """The recipe for the MSD task folder ``dataset_dir``, with channels and class names from its dataset.json.

    Raises:
        TaskError: dataset.json missing, not JSON, or lacking modality/labels/training; labels not 0..N.
    """
    folder = Path(dataset_dir)
    meta = _read_dataset_json(folder)
    name = _task_name(meta, folder)
    recipe = TASK_RECIPES.get(name) or _derived_recipe(name, meta, folder)
    labels = {int(k): str(v) for k, v in meta["labels"].items()}
    if sorted(labels) != list(range(len(labels))):
        raise TaskError(f"{folder / 'dataset.json'}: labels must be numbered 0..N, got {sorted(labels)}")
    if recipe.region_based:
        class_names = tuple(BRATS_REGIONS)
    else:
        class_names = tuple(labels[i] for i in range(len(labels)))
    return replace(recipe, in_channels=len(meta["modality"]), class_names=class_names, num_labels=len(labels))


def msd_datalist(
    dataset_dir: str | os.PathLike,
    section: str = "training",
    num_folds: int = 5,
    fold: int | None = 0,
    splits_file: str | os.PathLike | None = None,
) -> list[dict]:
    """Training or validation cases of an MSD task: dataset.json's ``training`` list split by folds.

    MSD ships no validation list; case i (sorted by image name) is validation when ``i % num_folds ==
    fold`` (:func:`custom.segmentation.folds.round_robin_splits`). With ``splits_file`` the split is
    written there on first use and read back afterwards (:func:`custom.segmentation.folds.fold_datalist`:
    a changed dataset.json is refused by name). ``fold=None`` is fold 0 (the bundle's default, whose
    checkpoints stay in ``ckpt_dir``). ``section="labelled"`` gives every case of ``training`` (all folds),
    ``"test"`` the unlabelled ``test`` images. Paths become absolute.
    """
    folder = Path(dataset_dir)
    meta = _read_dataset_json(folder)
    if section == "test":
        return [{"image": str(folder / str(p).lstrip("./"))} for p in meta.get("test", [])]
    if section not in ("training", "validation", "labelled"):
        raise ValueError(f"section must be training, validation, labelled or test, got {section!r}")
    items = [{k: str(folder / str(v).lstrip("./")) for k, v in d.items()} for d in meta["training"]]
    if section == "labelled":
        return items
    fold = 0 if fold is None else fold
    if splits_file is not None:
        return fold_datalist(items, splits_file, num_folds, fold, section, folder)
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < num_folds:
        raise ValueError(f"fold must be an integer in 0..{num_folds - 1} (num_folds {num_folds}), got {fold!r}")
    by_id = {case_id(d, folder): d for d in items}
    split = round_robin_splits(list(by_id), num_folds)[fold]
    return [by_id[c] for c in split["val" if section == "validation" else "train"]]


class MSDBrainTumourRegionsd(MapTransform):
    """MSD Task01 label map ``(1, X, Y, Z)`` -> three region channels: tumour core, whole tumour, enhancing.

    >>> import torch
    >>> out = MSDBrainTumourRegionsd("label")({"label": torch.tensor([0, 1, 2, 3]).view(1, 4, 1, 1)})["label"]
    >>> out[:, :, 0, 0].int().tolist()
    [[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1]]
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            regions = [sum((label == v) for v in values) > 0 for values in BRATS_REGIONS.values()]
            d[key] = (
                torch.cat([torch.as_tensor(r) for r in regions]).float()
                if isinstance(label, torch.Tensor)
                else np.concatenate(regions).astype(np.float32)
            )
            if hasattr(label, "meta") and hasattr(d[key], "meta"):
                d[key].meta = label.meta
        return d


class RegionsToLabelsd(MapTransform):
    """Three binary region channels (TC, WT, ET) -> one MSD Task01 label map: 3 where ET, 2 where TC but
    not ET, 1 where WT but not TC, 0 elsewhere (the inverse of :class:`MSDBrainTumourRegionsd`).

    >>> import torch
    >>> regions = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1]]).view(3, 4, 1, 1)
    >>> RegionsToLabelsd("pred")({"pred": regions})["pred"].flatten().tolist()
    [0, 1, 2, 3]
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            tc, wt, et = (d[key][i : i + 1] > 0.5 for i in range(3))
            label = torch.zeros_like(d[key][:1])
            label[wt] = 1
            label[tc] = 2
            label[et] = 3
            d[key] = label
        return d


def metadata_for_task(meta: dict, recipe: TaskRecipe) -> dict:
    """``meta`` (a bundle metadata.json) with ``network_data_format`` set to ``recipe``'s channels and names."""
    meta = json.loads(json.dumps(meta))
    inputs = meta["network_data_format"]["inputs"]["image"]
    outputs = meta["network_data_format"]["outputs"]["pred"]
    inputs.update(
        num_channels=recipe.in_channels,
        spatial_shape=list(recipe.roi_size),
        modality=recipe.modality,
        format="hounsfield" if recipe.modality == "CT" else "magnitude",
        value_range=[0, 1] if recipe.intensity_range else [-5, 5],
        channel_def={str(i): f"channel {i}" for i in range(recipe.in_channels)},
    )
    outputs.update(
        num_channels=recipe.out_channels,
        spatial_shape=list(recipe.roi_size),
        channel_def={str(i): n for i, n in enumerate(recipe.class_names)},
    )
    meta["task"] = f"MSD {recipe.name} segmentation"
    return meta


def _describes_task(path: Path) -> bool:
    """Whether ``path`` is a task folder's dataset.json (it names the labels), not some other file of that name."""
    try:
        with open(path, encoding="utf-8") as f:
            return "labels" in json.load(f)
    except (OSError, ValueError):
        return False


def task_from_weights(
    recipe: Mapping[str, Any],
    dataset_dir: str | os.PathLike | None = None,
    meta_file: str | os.PathLike | None = None,
    check_dataset: bool = False,
) -> TaskRecipe:
    """The task to run trained weights with (inference, evaluation, export, MONAI Label), the same way for
    every bundle: from the weights' recipe, else the task folder, else the bundle's metadata.

    1. The recipe saved with the weights (``custom.networks.recipe.read_recipe``) holds the task the
       training used (channels, classes, spacing, ROI, intensity range): a trained model deploys with
       no task folder. Files of the first recipe format are read too (``task_from_recipe``).
    2. Without a recipe, a task folder's ``dataset.json`` (:func:`load_task`), where ``dataset_dir`` holds one.
    3. Without either, the task ``meta_file`` (the bundle's ``configs/metadata.json``) declares: BTCV for
       the BTCV bundle, the Decathlon task of the MSD bundle's metadata (what the model zoo's checks build).

    Args:
        recipe: from ``read_recipe`` (``{}``: none).
        dataset_dir: a task folder; read without a recipe, or with ``check_dataset``.
        meta_file: the bundle's metadata.
        check_dataset: with a recipe and a task folder, refuse when the folder holds another task (channels,
            class names): evaluation scores the weights on that data.

    Raises:
        TaskError: nothing to build the task from (no recipe, no task folder, no usable metadata).
        RecipeMismatchError: ``check_dataset`` and the folder holds another task.
    """
    saved = normalize_recipe(recipe).get("task") if recipe else None
    folder = Path(dataset_dir) if dataset_dir is not None else None
    has_folder = folder is not None and _describes_task(folder / "dataset.json")
    if isinstance(saved, Mapping):
        task = task_from_recipe(saved)
        logger.info(f"task {task.name} from the weights' recipe (no task folder needed)")
        if check_dataset and has_folder:
            data = load_task(folder)  # type: ignore[arg-type]
            diffs = [
                (k, getattr(task, k), getattr(data, k))
                for k in ("name", "in_channels", "class_names")
                if getattr(task, k) != getattr(data, k)
            ]
            if diffs:
                said = "; ".join(f"{k} {a!r}, the data's dataset.json {b!r}" for k, a, b in diffs)
                raise RecipeMismatchError(f"the weights were trained on another task: {said} ({dataset_dir})")
        return task
    if has_folder:
        return load_task(folder)  # type: ignore[arg-type]
    if meta_file is not None and os.path.isfile(meta_file):
        try:
            task = task_from_metadata(meta_file)
        except (ValueError, KeyError) as e:
            raise TaskError(f"{meta_file}: no task to build ({e})") from e
        logger.info(
            f"task {task.name} as {meta_file} declares it (no recipe in the weights, no dataset.json in {dataset_dir})"
        )
        return task
    return load_task(dataset_dir)  # type: ignore[arg-type]  # raises TaskError naming the missing dataset.json
