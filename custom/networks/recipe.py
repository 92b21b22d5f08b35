"""The recipe travels with the weights: what produced a ``model.pt``, saved inside it and read back.

Why this exists: MONAI saves weights without the settings they need (network arguments, spacing,
intensity window, ROI, class names, patch-merging order). Typed twice, in train and inference configs,
a ``feature_size`` mismatch fails at load, but a ``pixdim``, ``roi_size`` or window mismatch silently
degrades every segmentation. Here training writes them into the file, and evaluation, inference,
export and MONAI Label read them.

File layout (``torch.load(..., weights_only=True)`` reads it; only str/int/float/bool/list/dict
values in the recipe)::

    model.pt          {"model": state_dict, "recipe": {...}}       (CONTRACT: ``{"model": state_dict}``)
    checkpoint.pt     {"model": ..., "optimizer": ..., ..., "recipe": {...}}
    model_swinvit.pt  {"state_dict": {"module....": ...}, "recipe": {...}}   (the released layout)

One recipe format for every bundle (``"format": 2``)::

    {"format": 2, "bundle": <metadata name>, "version": <metadata version>,
     "network": {"in_channels", "out_channels", "feature_size", "legacy_merging"},
     "task": {<custom.segmentation.task.TaskRecipe fields>},        (the fine-tuning bundles)
     "pretraining": {"pixdim", "roi_size", "intensity_range", ...},  (the SSL bundle)
     "loss": <the loss's class name>}

:func:`read_recipe` also reads the first format (flat config ids; MSD nested its task with the window
named ``window``) and returns it in this one. MONAI's ``CheckpointLoader`` and MONAI Label
(``checkpoint.get("model", checkpoint)``) read ``{"model": ...}`` and ignore other keys;
``SwinUNETR.load_from`` reads ``["state_dict"]`` only. ``monai.bundle ckpt_export`` without
``--key_in_ckpt model`` loads the whole file into the network: :func:`loads_recipe_files` makes the
bundles' ``network_def`` accept that too.

A recipe value is known by its config id everywhere (:func:`recipe_values`: ``feature_size``,
``roi_size``, ``pixdim``, ``intensity_range``, ...), so a mismatch is named in the config's own words.
A config value is "set by the user" when it differs from the recipe: the bundles' defaults are the
recipe's values (inference.json's ``task_table`` is rebuilt from the recipe, ``weights_network`` holds
its network arguments), a command-line override replaces them, and :func:`check_recipe` refuses a
contradiction unless ``accept_recipe_mismatch`` is True.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets.swin_unetr import PatchMerging

from custom.networks.options import LegacyPatchMerging
from custom.networks.weight_files import read_weights
from custom.utils import require_bool

__all__ = [
    "RECIPE_KEY",
    "RECIPE_FORMAT",
    "DEFAULT_FEATURE_SIZE",
    "RESUME_KEYS",
    "RecipeMismatchError",
    "legacy_merging_of",
    "make_recipe",
    "with_recipe",
    "normalize_recipe",
    "read_recipe",
    "recipe_values",
    "network_of",
    "same_value",
    "check_recipe",
    "loads_recipe_files",
]

logger = logging.getLogger(__name__)

#: the key of the recipe inside every file this collection writes
RECIPE_KEY = "recipe"
#: bump when the meaning of a recipe key changes (1: flat config ids; 2: network / task / pretraining)
RECIPE_FORMAT = 2
#: the network width of weights that do not say theirs: the paper's Swin UNETR-B, the model zoo's BTCV model
#: and the research BTCV release (feature_size 48), the bundles' default
DEFAULT_FEATURE_SIZE = 48
#: the recipe values a resumed training must keep (the network, the data and the loss; the schedule and the
#: augmentation may change, and are logged when they do)
RESUME_KEYS = (
    "in_channels",
    "num_classes",
    "feature_size",
    "legacy_merging",
    "pixdim",
    "roi_size",
    "intensity_range",
    "region_based",
    "class_names",
    "loss",
)
#: config id -> (section of the recipe, key there)
_CONFIG_IDS = {
    "in_channels": ("network", "in_channels"),
    "num_classes": ("network", "out_channels"),
    "feature_size": ("network", "feature_size"),
    "legacy_merging": ("network", "legacy_merging"),
}
#: the values of the first format's flat BTCV and MSD recipes that describe the task
_FLAT_TASK_KEYS = ("pixdim", "roi_size", "intensity_range", "region_based", "class_names", "in_channels")


class RecipeMismatchError(ValueError):
    """The config contradicts the recipe saved with the weights."""


def legacy_merging_of(network: torch.nn.Module) -> bool | None:
    """The patch-merging order of ``network``: True for MONAI < 1.5's (``LegacyPatchMerging``), False for
    MONAI's ``"merging"``, None when it has neither (another downsample, or no Swin encoder).

    >>> from monai.networks.nets import SwinUNETR
    >>> legacy_merging_of(SwinUNETR(1, 2, feature_size=12))
    False
    """
    kinds = {type(m) for m in network.modules()}
    if LegacyPatchMerging in kinds:
        return True
    if PatchMerging in kinds:
        return False
    return None


def _plain(value: Any) -> Any:
    """``value`` as JSON-like data (tuples to lists, numpy scalars to numbers) for ``weights_only`` loading."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else list(v)))


def make_recipe(
    meta_file: str | os.PathLike,
    network: torch.nn.Module | None = None,
    network_args: Mapping[str, Any] | None = None,
    task: Mapping[str, Any] | None = None,
    pretraining: Mapping[str, Any] | None = None,
    loss: str | None = None,
) -> dict[str, Any]:
    """The recipe to save with the weights, in the one format of every bundle (see the module docstring).

    Args:
        meta_file: the bundle's ``configs/metadata.json`` (its name and version are recorded).
        network: the network being trained (``network_def``); its merging order is read from it, so the
            file records what the weights were trained with, not what a config said.
        network_args: ``in_channels``, ``out_channels``, ``feature_size`` (JSON-like values).
        task: the fine-tuning task (``TaskRecipe.as_dict()``).
        pretraining: the SSL bundle's pre-training values (spacing, ROI, window, loss weights, ...).
        loss: the loss's class name.

    Example:
        >>> import json, tempfile
        >>> with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        ...     json.dump({"name": "demo", "version": "0.1.0"}, f)
        >>> make_recipe(f.name, network_args={"feature_size": 12}, task={"roi_size": (64, 64, 64)})["task"]
        {'roi_size': [64, 64, 64]}
    """
    with open(meta_file, encoding="utf-8") as f:
        meta = json.load(f)
    net = _plain(dict(network_args or {}))
    if network is not None:
        net["legacy_merging"] = legacy_merging_of(network)
    recipe: dict[str, Any] = {"format": RECIPE_FORMAT, "bundle": meta.get("name"), "version": meta.get("version")}
    recipe["network"] = net
    if task is not None:
        recipe["task"] = _plain(dict(task))
    if pretraining is not None:
        recipe["pretraining"] = _plain(dict(pretraining))
    if loss is not None:
        recipe["loss"] = loss
    return recipe


def with_recipe(payload: Any, recipe: Mapping[str, Any] | None) -> Any:
    """``payload`` (a state_dict, or the released ``{"state_dict": ...}`` layout) with ``recipe`` added.

    A plain state_dict becomes ``{"model": state_dict, "recipe": recipe}``; a mapping that already nests
    its tensors (``"state_dict"`` or ``"model"``) gets a ``"recipe"`` key beside them.
    """
    if recipe is None:
        return payload
    if isinstance(payload, Mapping) and ("state_dict" in payload or "model" in payload):
        return {**payload, RECIPE_KEY: dict(recipe)}
    return {"model": payload, RECIPE_KEY: dict(recipe)}


def normalize_recipe(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """``recipe`` in the current format, whichever format wrote it (``{}`` stays ``{}``).

    The first format held flat config ids: BTCV's ``in_channels``, ``num_classes``, ``feature_size``,
    ``legacy_merging``, ``pixdim``, ``roi_size``, ``intensity_range``, ``class_names``; MSD's the same (no
    window) plus its whole task under ``task`` (the window named ``window``); the SSL bundle's its
    pre-training values. The task's own names are left to ``custom.segmentation.task.task_from_recipe``.

    >>> normalize_recipe({"format": 1, "num_classes": 14, "feature_size": 12, "pixdim": [3, 3, 3]})["network"]
    {'out_channels': 14, 'feature_size': 12}
    """
    if not recipe:
        return {}
    if recipe.get("format", 1) >= 2 or any(isinstance(recipe.get(k), Mapping) for k in ("network", "pretraining")):
        return json.loads(json.dumps(dict(recipe)))
    flat = dict(recipe)
    out: dict[str, Any] = {"format": RECIPE_FORMAT, "bundle": flat.get("bundle"), "version": flat.get("version")}
    out["network"] = {key: flat[cid] for cid, (_, key) in _CONFIG_IDS.items() if cid in flat and flat[cid] is not None}
    if "loss_weights" in flat or "temperature" in flat:  # the SSL bundle's
        out["pretraining"] = {k: v for k, v in flat.items() if k not in {"format", "bundle", "version", "loss"}}
        out["pretraining"] = {k: v for k, v in out["pretraining"].items() if k not in _CONFIG_IDS}
    elif isinstance(flat.get("task"), Mapping):  # MSD's: the task, with the values the training actually used
        out["task"] = {**flat["task"], **{k: flat[k] for k in _FLAT_TASK_KEYS if k in flat}}
        out["task"].pop("out_channels", None)
    elif any(k in flat for k in ("pixdim", "roi_size", "intensity_range")):  # BTCV's: its task was BTCV
        out["task"] = {"name": "BTCV", **{k: flat[k] for k in _FLAT_TASK_KEYS if k in flat}}
        if "num_classes" in flat:
            out["task"]["num_labels"] = flat["num_classes"]
    if "loss" in flat:
        out["loss"] = flat["loss"]
    return out


def read_recipe(path: str | os.PathLike | None) -> dict[str, Any]:
    """The recipe saved in the weight file ``path``, in the current format (:func:`normalize_recipe`); ``{}``
    (with a log line saying why) when there is none.

    Reads the file memory-mapped where it can, so the tensors are not read just to get the recipe.
    A missing file gives ``{}`` too (``verify_net_in_out`` and the property checks run without weights;
    loading the weights then fails on the missing file itself).
    """
    if path is None or not os.path.isfile(path):
        logger.info(f"no weight file at {path}: the config's values are used (no recipe to read)")
        return {}
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a legacy (non-zip) file cannot be memory-mapped; a damaged one is named in one line
        checkpoint = read_weights(Path(path))
    recipe = checkpoint.get(RECIPE_KEY) if isinstance(checkpoint, Mapping) else None
    if not isinstance(recipe, Mapping):
        logger.warning(
            f"{path} carries no recipe (saved before recipes were recorded, or not by this collection): "
            "the config's values are used for sizes, spacing and intensity; make sure they are the training's"
        )
        return {}
    return normalize_recipe(recipe)


def recipe_values(recipe: Mapping[str, Any], keys: Sequence[str] | None = None) -> dict[str, Any]:
    """The recipe's values by config id (``feature_size``, ``num_classes``, ``pixdim``, ...), whichever format.

    Network arguments come from ``recipe["network"]`` (``out_channels`` is the configs' ``num_classes``),
    task values from ``recipe["task"]`` (the window under its one name, ``intensity_range``), or from
    ``recipe["pretraining"]``. ``keys`` keeps only those ids.

    >>> recipe_values({"format": 2, "network": {"out_channels": 14}, "task": {"window": [-175, 250]}})
    {'num_classes': 14, 'intensity_range': [-175, 250]}
    """
    recipe = normalize_recipe(recipe)
    values: dict[str, Any] = {}
    for cid, (section, key) in _CONFIG_IDS.items():
        if key in recipe.get(section, {}):
            values[cid] = recipe[section][key]
    for section in ("task", "pretraining"):
        for key, value in (recipe.get(section) or {}).items():
            cid = "intensity_range" if key == "window" else key
            values.setdefault(cid, value)
    if "loss" in recipe:
        values["loss"] = recipe["loss"]
    if keys is not None:
        values = {k: values[k] for k in keys if k in values}
    return values


def network_of(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """The network arguments inference and evaluation build: the recipe's, or for weights without one
    ``feature_size`` :data:`DEFAULT_FEATURE_SIZE` and MONAI's merging order (``legacy_merging`` False).

    >>> network_of({})
    {'feature_size': 48, 'legacy_merging': False}
    """
    saved = normalize_recipe(recipe).get("network", {})
    return {
        "feature_size": saved.get("feature_size", DEFAULT_FEATURE_SIZE),
        "legacy_merging": saved.get("legacy_merging", False),
    }


def same_value(a: Any, b: Any) -> bool:
    """Whether two recipe values are the same: numbers compared as numbers (``2 == 2.0``), sequences item
    by item (a list equals a tuple), mappings key by key.

    >>> same_value([1.5, 1.5, 2], (1.5, 1.5, 2.0)), same_value({"a": [1]}, {"a": (1,)}), same_value(True, 1)
    (True, True, False)
    """
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, Sequence) and not isinstance(a, str) and isinstance(b, Sequence) and not isinstance(b, str):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if a is None or b is None:
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
    return a == b


def check_recipe(
    recipe: Mapping[str, Any],
    config: Mapping[str, Any],
    accept_mismatch: bool = False,
    path: str | os.PathLike = "the weights",
) -> dict[str, Any]:
    """Refuse a config value that contradicts the recipe saved with the weights; log what is used.

    Args:
        recipe: from :func:`read_recipe` (``{}``: no recipe, the config's values are used and logged).
        config: config id -> the value this run uses (the recipe's own value unless the user overrode it).
        accept_mismatch: ``--accept_recipe_mismatch True``: warn instead of refusing.
        path: named in the messages.

    Returns:
        ``recipe`` (so that a config can ``_requires_`` this check before building the network).

    Raises:
        TypeError: ``accept_mismatch`` is not a bool (``--accept_recipe_mismatch true`` arrives as a string).
        RecipeMismatchError: a value differs from the recipe's; the message names both values.

    Example:
        >>> check_recipe({"network": {"feature_size": 12}}, {"feature_size": 12})["network"]
        {'feature_size': 12}
        >>> check_recipe({"network": {"feature_size": 12}}, {"feature_size": 48}, path="model.pt")
        Traceback (most recent call last):
        ...
        custom.networks.recipe.RecipeMismatchError: model.pt was trained with feature_size=12, the config says feature_size=48...
    """
    require_bool(accept_mismatch, "accept_recipe_mismatch")
    if not recipe:
        logger.info(
            f"{path}: no recipe; using the config's values: " + ", ".join(f"{k}={v!r}" for k, v in config.items())
        )
        return dict(recipe)
    saved = recipe_values(recipe)
    diffs = [(k, saved[k], v) for k, v in config.items() if k in saved and not same_value(saved[k], v)]
    if diffs:
        said = "; ".join(f"{k}={r!r}, the config says {k}={v!r}" for k, r, v in diffs)
        text = f"{path} was trained with {said}"
        if not accept_mismatch:
            raise RecipeMismatchError(
                f"{text}. Drop those overrides to use the weights' recipe, or pass --accept_recipe_mismatch True "
                "to run with the config's values deliberately."
            )
        logger.warning(f"{text}; --accept_recipe_mismatch True: using the config's values")
    used = ", ".join(f"{k}={v!r}" for k, v in config.items())
    logger.info(f"{path}: recipe of {recipe.get('bundle')} {recipe.get('version')}; using {used}")
    return dict(recipe)


def _unwrap_recipe_file(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    """``load_state_dict`` pre-hook: ``{"model": sd, "recipe": ...}`` (or ``{"state_dict": ...}``) -> ``sd``."""
    if prefix or "model" not in state_dict or not isinstance(state_dict["model"], Mapping):
        return
    inner = state_dict.pop("model")
    state_dict.pop(RECIPE_KEY, None)
    state_dict.update(inner)


def loads_recipe_files(network: torch.nn.Module) -> torch.nn.Module:
    """``network``, whose ``load_state_dict`` also takes a whole ``model.pt`` of this collection.

    ``python -m monai.bundle ckpt_export network_def --ckpt_file models/model.pt`` (the contract's export
    command, without ``--key_in_ckpt model``) loads the whole file into ``network_def``; this unwraps
    ``{"model": state_dict, "recipe": ...}`` first. Plain state_dicts load as before (strictly).

    Example:
        >>> from monai.networks.nets import SwinUNETR
        >>> net = loads_recipe_files(SwinUNETR(1, 2, feature_size=12))
        >>> net.load_state_dict({"model": net.state_dict(), "recipe": {"feature_size": 12}})
        <All keys matched successfully>
    """
    network.register_load_state_dict_pre_hook(_unwrap_recipe_file)
    return network
